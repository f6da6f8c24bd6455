"""Files read from a folder a user gives (a HuggingFace model, a checkpoint), which may come from anywhere: every
name dsmoe reads from it, its own or one that a file in it lists, must stay inside it. An index naming
`../../x.safetensors` or `/etc/x`, or a link out of the folder, is refused before anything is opened, with an
error that names the entry and never says whether the path outside exists."""

from __future__ import annotations

import os
from pathlib import Path


class FolderPathError(ValueError):
    """A file name or link in a folder (a HuggingFace model, a checkpoint) that leads outside it."""


def _hub_blobs(folder: Path) -> Path | None:
    """huggingface_hub's cache folder REPO/snapshots/REVISION holds links into REPO/blobs: there, and only
    there, a link may leave the folder."""
    return folder.parent.parent / "blobs" if folder.parent.name == "snapshots" else None


def folder_file(folder: str | Path, name: str, entry: str | None = None) -> Path:
    """folder/name, refused (FolderPathError naming `entry`, by default the name) unless it stays inside the
    folder: a relative name without '..' out of it, and no link (followed by resolve()) that leads out."""
    folder = Path(folder)
    entry, root = entry or name, folder.resolve()
    try:
        lexical = Path(os.path.normpath(root / name))
        target = (root / name).resolve()
    except (OSError, RuntimeError, ValueError):  # a NUL byte in the name, a loop of links
        target = lexical = Path("/")  # refused below, in the same words
    roots = [root] if (blobs := _hub_blobs(root)) is None else [root, blobs.resolve()]
    if not lexical.is_relative_to(root) or not any(target.is_relative_to(r) for r in roots):
        raise FolderPathError(f"{folder}: {entry} leads outside the folder; dsmoe reads only files inside the "
                              "folder it is given (relative names, no '..' out of it, no link out of it)")
    return folder / name
