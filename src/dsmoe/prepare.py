"""`dsmoe prepare`: a corpus of any size into token shards (raw ids, readable with np.memmap or pread).

Sources are text files, folders, JSON Lines (`.jsonl`, `.jsonl.gz`: one document per line) and Parquet files.
Documents stream through in a fixed order (each source's files in hash order of their paths), are split into
train and validation by a hash of their name (a file, or FILE:LINE), tokenized in worker processes, and
written as chunks: chunk k is `train-0000k.bin` and `val-0000k.bin`, raw token ids (uint16 where the vocabulary
fits, else uint32) with documents joined by the tokenizer's EOS, `.idx` (int64 offsets of each document's first
token) and, where a chunk holds fine-tuning data, `.mask` (uint8, 1 = a token the loss trains on).

`manifest.json` records the tokenizer (its files are saved beside it) and its hash, the settings, every source
file's size, and each chunk's token and document counts and SHA-256s. It is rewritten (atomically) after each
chunk with where the next one starts, so an interrupted run resumes there, and a finished run again on the same
sources does nothing. Memory stays that of a few batches of text, whatever the corpus' size.

Fine-tuning records (`{"prompt": ..., "completion": ...}`, or `{"messages": [{"role", "content"}, ...]}`
rendered with the tokenizer's chat template where it has one) are segments: only the completion, or the
assistant's turns, are trained on.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import gzip
import hashlib
import json
import multiprocessing
import os
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dsmoe.runtime import RunLock, optional_import
from dsmoe.tokenizer import BPETokenizer, Tokenizer, load_tokenizer

FORMAT = 1
MANIFEST = "manifest.json"
SHARD_TOKENS = 1 << 27     # tokens per chunk (256 MB of uint16): a chunk is the unit of resumption
BATCH_CHARS = 1 << 20      # text per work item sent to a worker
ENCODE_CHARS = 1 << 18     # text per call of the tokenizer: `tokenizers` holds ~500 bytes per token while it encodes
PIECE_BYTES = 1 << 18      # a text file longer than this is read in pieces (cut at a newline)
SPLITS = ("train", "val")
BAD_LINE = "bad lines"                 # what the readers report besides units, counted in the manifest
REPLACED = "text pieces with bytes that are not UTF-8 (replaced by U+FFFD)"
JSONL = (".jsonl", ".ndjson")          # JSON Lines, lower-cased names
JSONL_GZ = (".jsonl.gz", ".ndjson.gz")


class PrepareError(ValueError):
    """A source or prepared folder that cannot be used: names the file and what to do."""


# ---- sources ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """A document, or one piece of a long text file: segments (text, trained), and where the document starts
    (a new one begins at this unit) and ends (EOS follows)."""

    segments: tuple[tuple[str, bool], ...]
    split: str
    first: bool = True
    last: bool = True


@dataclass
class Settings:
    """What decides the prepared tokens (the worker count does not)."""

    sources: list[str]
    tokenizer: str                 # the tokenizer's cache key (kind and hash)
    field: str = "text"
    val_fraction: float = 0.2
    shard_tokens: int = SHARD_TOKENS
    skip_bad: bool = False
    max_bytes: int | None = None   # stop after this many bytes of files (the built-in default corpus' cap)
    max_doc_chars: int | None = None
    files: list[list[Any]] = dataclasses.field(default_factory=list)  # [path, bytes, mtime_ns] of every file read


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py files, sorted (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "__pycache__")]  # not the stdlib
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def _path_hash(rel: str) -> float:
    """A stable number in [0, 1) per document path: decides order and split, independent of the machine."""
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2**64


def _text_files(root: Path) -> list[Path]:
    """A file, or a folder's files: not hidden ones, and not those of a prepared corpus inside it."""
    if root.is_file():
        return [root]
    prepared = {p.parent for p in root.rglob(MANIFEST)}
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
                  and not any(folder in p.parents for folder in prepared))


def source_files(sources: list[str | None], max_bytes: int | None = None) -> list[tuple[Path, Path]]:
    """(file, base) of every source in reading order: a folder's files (not hidden ones) in hash order of their
    path below it; None = the standard library. max_bytes: stop once the files so far hold that many bytes."""
    out: list[tuple[Path, Path]] = []
    for src in sources:
        if src is None:
            root, files = Path(sysconfig.get_paths()["stdlib"]), stdlib_files()
        else:
            root = Path(src).expanduser()
            _not_a_prepared_folder(root)
            if not root.exists():
                raise FileNotFoundError(f"source {str(root)!r} does not exist (give text files, folders, .jsonl, "
                                        ".jsonl.gz or .parquet files)")
            files = _text_files(root)
            if not files or (root.is_file() and root.stat().st_size == 0):
                raise PrepareError(f"source {str(root)!r} is empty: it holds no files with text")
        base = root if root.is_dir() else root.parent
        files.sort(key=lambda p: _path_hash("order:" + str(p.relative_to(base))))
        seen = {p.resolve() for p, _ in out}
        out += [(p, base) for p in files if p.resolve() not in seen]  # a file given twice is read once
    if max_bytes is not None:
        kept, total = [], 0
        for p, base in out:
            if total >= max_bytes:
                break
            kept.append((p, base))
            total += p.stat().st_size
        out = kept
    return out


def _not_a_prepared_folder(root: Path) -> None:
    """A prepared folder, a file inside one, or a folder of shards that lost its manifest is not text."""
    folder = root if root.is_dir() else root.parent
    if (folder / MANIFEST).is_file():
        where = "is" if folder == root else f"is part of the prepared corpus {folder}, which is"
        raise PrepareError(f"{root} {where} prepared already: give it to train/eval/inspect as --data {folder}")
    if root.is_dir() and any(root.glob("train-[0-9]*.bin")):
        raise PrepareError(f"{root} holds token shards but no {MANIFEST}: it is a prepared corpus that lost its "
                           "manifest; prepare it again from its sources")


def _split(name: str, val_fraction: float) -> str:
    return "val" if _path_hash(name) < val_fraction else "train"


def _text_units(path: Path, name: str, settings: Settings) -> Iterator[Unit | str]:
    """A text file as one document (nothing when it is binary or not UTF-8), in pieces cut after a newline (or,
    in a line longer than a piece, between characters)."""
    split = _split(name, settings.val_fraction)
    with path.open("rb") as f:
        raw = f.read(PIECE_BYTES)
        if not raw or b"\0" in raw:
            return
        first = True
        while raw:
            more = f.read(PIECE_BYTES)
            if more:  # cut after the last newline (else between characters); the rest starts the next piece
                cut = raw.rindex(b"\n") + 1 if b"\n" in raw else _char_boundary(raw)
                raw, more = raw[:cut], raw[cut:] + more
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                if first:
                    return  # not a UTF-8 text file: skipped, as binary files are
                text = raw.decode("utf-8", errors="replace")
                yield REPLACED
            if settings.max_doc_chars is not None:
                text, more = text[:settings.max_doc_chars], b""
            yield Unit(((text, True),), split, first, not more)
            first, raw = False, more


def _char_boundary(raw: bytes) -> int:
    """The largest cut <= len(raw) that does not split a UTF-8 character."""
    start = len(raw) - 1  # the last character's first byte (continuation bytes are 0b10xxxxxx)
    while start > 0 and raw[start] & 0xC0 == 0x80 and len(raw) - start < 4:
        start -= 1
    lead = raw[start]
    length = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return len(raw) if start + length <= len(raw) else start


def _record_segments(record: Any, where: str, settings: Settings, template: Callable | None
                     ) -> tuple[tuple[str, bool], ...]:
    """The (text, trained) segments of one JSON record, or a PrepareError naming the line."""
    if not isinstance(record, dict):
        raise PrepareError(f"{where}: a {type(record).__name__}, not a JSON object")
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise PrepareError(f"{where}: 'prompt' and 'completion' must be strings")
        return ((prompt, False), (completion, True))
    if "messages" in record:
        segments = _chat_segments(record["messages"], where, template)
        if not any(trained for _, trained in segments):
            roles = sorted({m["role"] for m in record["messages"]})
            raise PrepareError(f"{where}: no 'assistant' turn (roles {roles}): nothing in it would be trained on")
        return segments
    if settings.field not in record:
        raise PrepareError(f"{where}: no field {settings.field!r} (the record has {sorted(record)[:8]}); choose "
                           "it with --field, or give prompt/completion or messages records")
    text = record[settings.field]
    if not isinstance(text, str):
        raise PrepareError(f"{where}: field {settings.field!r} is a {type(text).__name__}, not text")
    return ((text, True),)


def _chat_segments(messages: Any, where: str, template: Callable | None) -> tuple[tuple[str, bool], ...]:
    """A conversation rendered turn by turn (the chat template's, else `role: content` lines): each turn is
    the text the rendering of the conversation up to it adds; the assistant's turns are trained on."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise PrepareError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    segments, before = [], ""
    for i, message in enumerate(messages):
        if template is None:
            text = before + f"{message['role']}: {message['content']}\n"
        else:
            try:
                text = template(messages=messages[:i + 1], add_generation_prompt=False)
            except PrepareError as e:
                raise PrepareError(f"{where}: {e}") from None
        if not text.startswith(before):
            raise PrepareError(f"{where}: the chat template renders the conversation differently turn by turn, "
                               "so its turns cannot be masked; render the text yourself (a 'text' field)")
        segments.append((text[len(before):], message["role"] == "assistant"))
        before = text
    return tuple(segments)


def _jsonl_units(path: Path, name: str, settings: Settings, template: Callable | None) -> Iterator[Unit | str]:
    """One unit per record; BAD_LINE for a bad line skipped under --skip-bad (units() counts it)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        line_no = 0
        while True:
            try:
                raw = f.readline()
            except (EOFError, OSError) as e:  # a truncated or corrupt gzip stream
                raise PrepareError(f"{path}: unreadable after line {line_no} ({type(e).__name__}: {e})") from None
            if not raw:
                return
            line_no += 1
            if not raw.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                segments = _record_segments(_json(raw, where), where, settings, template)
            except PrepareError as e:
                if not settings.skip_bad:
                    raise PrepareError(f"{e}; fix the line, or pass --skip-bad to count and skip bad lines") from None
                yield BAD_LINE
                continue
            yield Unit(segments, _split(f"{name}:{line_no}", settings.val_fraction))


def _json(raw: bytes, where: str) -> Any:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{where}: not UTF-8 (byte {raw[e.start]:#x} at column {e.start + 1}); re-encode the "
                           "file as UTF-8") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise PrepareError(f"{where}: not JSON ({e.msg}, column {e.colno})") from None


def _parquet_units(path: Path, name: str, settings: Settings) -> Iterator[Unit]:
    pq = optional_import("pyarrow.parquet", "reading Parquet files")
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own error types
        raise PrepareError(f"{path}: not a readable Parquet file ({str(e)[:200]})") from None
    schema = file.schema_arrow
    if settings.field not in schema.names:
        raise PrepareError(f"{path}: no column {settings.field!r} (it has {schema.names[:8]}); choose it with --field")
    kind = str(schema.field(settings.field).type)
    if kind.removeprefix("dictionary<values=").split(",")[0].rstrip(">") not in ("string", "large_string",
                                                                                 "string_view"):
        raise PrepareError(f"{path}: column {settings.field!r} holds {kind}, not text; choose a text column "
                           "with --field")
    row = 0
    for batch in file.iter_batches(columns=[settings.field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if text:
                yield Unit(((text, True),), _split(f"{name}:{row}", settings.val_fraction))


def units(files: list[tuple[Path, Path]], settings: Settings, template: Callable | None,
          skipped: collections.Counter, start: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, int, Unit]]:
    """(file index, unit index in the file, unit) of every document piece from `start` on; what is skipped from
    there on is counted in `skipped` (what was skipped before `start` was counted by the run that got there)."""
    for i in range(start[0], len(files)):
        path, base = files[i]
        name, suffix = str(path.relative_to(base)), path.name.lower()
        if suffix.endswith((".gz", ".xz", ".bz2", ".zst", ".zip", ".7z")) and not suffix.endswith(JSONL_GZ):
            raise PrepareError(f"{path}: a compressed file dsmoe does not read (only {', '.join(JSONL_GZ)}); "
                               "decompress it, or move it out of the source")
        if suffix.endswith(JSONL + JSONL_GZ):
            stream: Iterator[Unit | str] = _jsonl_units(path, name, settings, template)
        elif suffix.endswith(".parquet"):
            stream = _parquet_units(path, name, settings)
        else:
            stream = _text_units(path, name, settings)
        n = 0
        for unit in stream:
            if isinstance(unit, str):  # something skipped or mended, counted once
                skipped[unit] += (i, n) >= start
                continue
            if (i, n) >= start:
                yield i, n, unit
            n += 1
        if n == 0:
            skipped["files without text"] += 1


# ---- tokenizing (in worker processes) --------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def encode_units(batch: list[Unit], tokenizer: Tokenizer | None = None) -> dict[str, tuple[np.ndarray, np.ndarray,
                                                                                           np.ndarray | None]]:
    """Per split: (tokens int64, offsets of documents starting in the batch, loss mask uint8 or None = all
    trained). Every document ends with EOS (when the tokenizer has one), trained on if its last segment is."""
    tok = tokenizer or _worker_tokenizer
    assert tok is not None
    encoded = _encode_in_parts(tok, [text for unit in batch for text, _ in unit.segments])
    eos = np.array([] if tok.eos_id is None else [tok.eos_id], dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    masks: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    starts: dict[str, list[int]] = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for unit in batch:
        if unit.first:
            starts[unit.split].append(sizes[unit.split])
        for (_, trained), ids in zip(unit.segments, encoded):
            parts[unit.split].append(ids.astype(np.int64))
            masks[unit.split].append(np.full(len(ids), trained, dtype=np.uint8))
            sizes[unit.split] += len(ids)
        tail = parts[unit.split][-1] if parts[unit.split] else eos[:0]
        if unit.last and len(eos) and not (len(tail) and tail[-1] == tok.eos_id):  # a chat template's own EOS
            parts[unit.split].append(eos)
            masks[unit.split].append(np.full(1, unit.segments[-1][1], dtype=np.uint8))
            sizes[unit.split] += 1
    out = {}
    for s in SPLITS:
        tokens = np.concatenate(parts[s]) if parts[s] else np.zeros(0, np.int64)
        mask = np.concatenate(masks[s]) if masks[s] else np.zeros(0, np.uint8)
        out[s] = (tokens, np.asarray(starts[s], dtype=np.int64), None if mask.all() else mask)
    return out


def _encode_in_parts(tok: Tokenizer, texts: list[str]) -> Iterator[np.ndarray]:
    """tok.encode_many over groups of about ENCODE_CHARS: the tokenizer's memory stays that of one group."""
    group: list[str] = []
    size = 0
    for text in texts:
        group.append(text)
        size += len(text)
        if size >= ENCODE_CHARS:
            yield from tok.encode_many(group)
            group, size = [], 0
    yield from tok.encode_many(group)


# ---- writing ----------------------------------------------------------------------------------------

class _File:
    """A file written through a .tmp name with its SHA-256 kept as it grows; renamed when done."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.f = self.tmp.open("wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, array: np.ndarray) -> None:
        data = array.tobytes()
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)

    def finish(self) -> str:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.sha.hexdigest()

    def discard(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


class _SplitWriter:
    """One split of one chunk: tokens, document offsets, and the loss mask once a token is not trained on."""

    def __init__(self, out: Path, split: str, chunk: int, dtype: np.dtype):
        self.stem, self.dtype = out / f"{split}-{chunk:05d}", dtype
        self.bin, self.idx = _File(self.stem.with_suffix(".bin")), _File(self.stem.with_suffix(".idx"))
        self.mask: _File | None = None
        self.tokens = self.docs = self.max_id = 0

    def write(self, tokens: np.ndarray, starts: np.ndarray, mask: np.ndarray | None) -> None:
        if mask is not None and self.mask is None:  # the tokens so far were all trained on
            self.mask = _File(self.stem.with_suffix(".mask"))
            self.mask.write(np.ones(self.tokens, dtype=np.uint8))
        self.bin.write(tokens.astype(self.dtype))
        self.idx.write(starts + self.tokens)
        if self.mask is not None:
            self.mask.write(np.ones(len(tokens), np.uint8) if mask is None else mask)
        self.tokens += len(tokens)
        self.docs += len(starts)
        self.max_id = max(self.max_id, int(tokens.max()) if len(tokens) else 0)

    def files(self) -> list[_File]:
        return [f for f in (self.bin, self.idx, self.mask) if f is not None]

    def finish(self) -> dict[str, Any]:
        sha = {f.path.name: f.finish() for f in self.files()}
        return {"file": self.bin.path.name, "tokens": self.tokens, "docs": self.docs, "max_id": self.max_id,
                "mask": self.mask is not None, "sha256": sha}

    def discard(self) -> None:
        for f in self.files():
            f.discard()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ---- the job ----------------------------------------------------------------------------------------

@dataclass
class Result:
    out: Path
    manifest: dict[str, Any]
    already: bool       # it was prepared already: nothing was done


def prepare(sources: list[str | None], out: str | Path, tokenizer: Tokenizer, *, field: str = "text",
            val_fraction: float = 0.2, workers: int = 1, skip_bad: bool = False, shard_tokens: int = SHARD_TOKENS,
            max_bytes: int | None = None, max_doc_chars: int | None = None, progress: bool = True,
            wait: bool = False) -> Result:
    """Tokenize sources into `out` (see the module's docstring). Resumes an interrupted run; on the same sources
    and settings as a finished one it does nothing. `wait`: wait for another prepare of `out` to finish (the
    on-the-fly cache of raw paths) instead of refusing."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    if workers < 1 or shard_tokens < 1:
        raise ValueError(f"workers={workers} and shard_tokens={shard_tokens} must be >= 1")
    files = source_files(sources, max_bytes)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file: give a folder (new, or one to resume)")
    out.mkdir(parents=True, exist_ok=True)
    ours = not (out / ".lock").exists()
    lock = RunLock(out, what="dsmoe prepare", wait=wait)
    try:
        names = [None if s is None else str(Path(s).expanduser().resolve()) for s in sources]
        settings = Settings([str(s) for s in names], tokenizer.cache_key(), field, val_fraction, shard_tokens,
                            skip_bad, max_bytes, max_doc_chars,
                            [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p, _ in files])
        try:
            manifest = _start(out, settings, tokenizer)
        except PrepareError:
            if ours:  # a folder refused keeps nothing of this run
                (out / ".lock").unlink(missing_ok=True)
            raise
        if manifest.get("complete"):
            return Result(out, manifest, already=True)
        _run(out, files, settings, tokenizer, manifest, workers, progress)
        return Result(out, manifest, already=False)
    finally:
        lock.release()


def _start(out: Path, settings: Settings, tokenizer: Tokenizer) -> dict[str, Any]:
    """The manifest to continue: the folder's own when it was prepared with these settings, else a new one (the
    folder must then hold no prepared set)."""
    path = out / MANIFEST
    if path.exists():
        manifest = read_manifest(out)
        for stray in out.glob("*.tmp"):  # the chunk an interrupted run was writing
            stray.unlink()
        if manifest["settings"] == asdict(settings):
            return manifest
        if not manifest["chunks"] and not manifest["complete"]:  # a run that wrote nothing: start again
            return _new_manifest(out, settings, tokenizer)
        old = manifest["settings"]
        diff = [k for k in old if old[k] != asdict(settings).get(k)]
        if "files" in diff:
            before, now = ({f[0]: f[1:] for f in files} for files in (old["files"], settings.files))
            changed = sorted(set(before) ^ set(now) | {f for f in before.keys() & now.keys() if before[f] != now[f]})
            diff[diff.index("files")] = f"files: {', '.join(changed[:3])}{' ...' * (len(changed) > 3)} added, " \
                                        "removed or changed (size or time)"
        raise PrepareError(f"{out} holds tokens prepared from other sources or settings (they differ in "
                           f"{'; '.join(diff)}); choose another --out, or delete the folder to prepare it again")
    if any(p.name != ".lock" for p in out.iterdir()):
        raise PrepareError(f"{out} is not empty and holds no {MANIFEST}: choose an empty or new --out folder")
    return _new_manifest(out, settings, tokenizer)


def _new_manifest(out: Path, settings: Settings, tokenizer: Tokenizer) -> dict[str, Any]:
    tokenizer.save(out)
    manifest = {"format": FORMAT, "complete": False, "settings": asdict(settings),
                "tokenizer": {"kind": tokenizer.kind, "key": tokenizer.cache_key()},
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "dtype": token_dtype(tokenizer.vocab_size).name, "chunks": [], "next": [0, 0], "skipped": {}}
    _write_manifest(out, manifest)  # from here on the folder resumes
    return manifest


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / (MANIFEST + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)


Position = tuple[tuple[int, int], dict[str, int]]  # where the next unit starts, and the skip counts up to it


def _batches(stream: Iterator[tuple[int, int, Unit]], skipped: collections.Counter
             ) -> Iterator[tuple[list[Unit], Position]]:
    """Units grouped into work items of about BATCH_CHARS, each with the position after it."""
    batch: list[Unit] = []
    chars, at = 0, (0, 0)
    for i, n, unit in stream:
        batch.append(unit)
        chars += sum(len(t) for t, _ in unit.segments)
        at = (i, n + 1)
        if chars >= BATCH_CHARS:
            yield batch, (at, dict(skipped))
            batch, chars = [], 0
    if batch:
        yield batch, (at, dict(skipped))


def _encoded(batches: Iterator[tuple[list[Unit], Position]], tokenizer: Tokenizer, out: Path,
             workers: int) -> Iterator[tuple[dict[str, Any], Position]]:
    """(encoded batch, position after it) in order: in this process, or by `workers` processes with at most
    2 x workers batches in flight (memory stays bounded)."""
    if workers == 1:
        for batch, position in batches:
            yield encode_units(batch, tokenizer), position
        return
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or tokenizer state
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(out),)) as pool:
        pending: collections.deque = collections.deque()
        for batch, position in batches:
            pending.append((pool.apply_async(encode_units, (batch,)), position))
            if len(pending) >= 2 * workers:
                job, pos = pending.popleft()
                yield job.get(), pos
        while pending:
            job, pos = pending.popleft()
            yield job.get(), pos


def _run(out: Path, files: list[tuple[Path, Path]], settings: Settings, tokenizer: Tokenizer,
         manifest: dict[str, Any], workers: int, progress: bool) -> None:
    template = chat_template(tokenizer)
    skipped: collections.Counter = collections.Counter(manifest["skipped"])
    start: tuple[int, int] = (manifest["next"][0], manifest["next"][1])
    total = sum(size for _, size, _ in settings.files)
    done_bytes = sum(size for _, size, _ in settings.files[:start[0]])
    bar = tqdm(total=total, initial=done_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress,
               dynamic_ncols=True)
    dtype = np.dtype(manifest["dtype"])
    writers: dict[str, _SplitWriter] | None = None
    t0, tokens, docs, file_index = time.perf_counter(), 0, 0, start[0]
    try:
        stream = _batches(units(files, settings, template, skipped, start), skipped)
        for encoded, position in _encoded(stream, tokenizer, out, workers):
            if writers is None:
                writers = {s: _SplitWriter(out, s, len(manifest["chunks"]), dtype) for s in SPLITS}
            for s in SPLITS:
                writers[s].write(*encoded[s])
                tokens += len(encoded[s][0])
                docs += len(encoded[s][1])
            if position[0][0] > file_index:
                bar.update(sum(size for _, size, _ in settings.files[file_index:position[0][0]]))
                file_index = position[0][0]
            bar.set_postfix_str(f"{docs:,} docs, {tokens / (time.perf_counter() - t0):,.0f} tokens/s")
            if sum(w.tokens for w in writers.values()) >= settings.shard_tokens:
                _commit(out, manifest, writers, position)
                writers = None
        if writers is not None:
            _commit(out, manifest, writers, ((len(files), 0), dict(skipped)))
            writers = None
        manifest["skipped"] = dict(skipped)  # everything is read: the counts stand, chunk or not
        bar.update(bar.total - bar.n)
    except BaseException as e:
        if writers is not None:
            for w in writers.values():
                w.discard()
        if isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                                       or str(e.filename or "").startswith(str(out))):
            raise OSError(f"writing {e.filename or out} failed ({e.strerror or e}); the {len(manifest['chunks'])} "
                          "chunks written before are complete: free space or fix the folder and run the same "
                          "command to go on") from None
        raise
    finally:
        bar.close()
    _finish(out, manifest, settings)


def _commit(out: Path, manifest: dict[str, Any], writers: dict[str, _SplitWriter], position: Position) -> None:
    """Files renamed first, then the manifest that names them: a crash between leaves unlisted files that the
    next run overwrites."""
    chunk = {s: writers[s].finish() for s in SPLITS}
    _write_manifest(out, {**manifest, "chunks": [*manifest["chunks"], chunk], "next": list(position[0]),
                          "skipped": position[1]})
    manifest["chunks"].append(chunk)
    manifest["next"], manifest["skipped"] = list(position[0]), position[1]


def split_sizes(manifest: dict[str, Any]) -> dict[str, int]:
    """Tokens per split of a prepared folder, the held-out tail counted as validation."""
    sizes = {s: sum(c[s]["tokens"] for c in manifest["chunks"]) for s in SPLITS}
    if "held_out" in manifest:
        total = sum(sizes.values())
        sizes = {"train": manifest["held_out"]["at"], "val": total - manifest["held_out"]["at"]}
    return sizes


def _finish(out: Path, manifest: dict[str, Any], settings: Settings) -> None:
    """Check the result, hold out the tail of the tokens when no document fell into one split (no file is
    rewritten: the manifest says where the split falls), and mark it complete."""
    sizes = split_sizes(manifest)  # nothing held out yet
    if not any(sizes.values()):
        what = ", ".join(f"{n} {k}" for k, n in manifest["skipped"].items()) or "no documents"
        raise PrepareError(f"sources {settings.sources} hold no text to train on ({what})")
    if not sizes["val"] or not sizes["train"]:  # too few documents to split by document: the stream's tail
        full = "train" if sizes["train"] else "val"
        at = sizes[full] - max(1, int(sizes[full] * max(settings.val_fraction, 0.1)))
        # dsmoe.data.TokenSet splits there when it reads: the head trains, the tail is held out
        manifest["held_out"] = {"from": full, "at": at}
    manifest["complete"] = True
    _write_manifest(out, manifest)


def train_bpe(sources: list[str | None], vocab_size: int, field: str = "text", val_fraction: float = 0.2,
              budget: int = 4_000_000, max_bytes: int | None = None, max_doc_chars: int | None = None) -> Tokenizer:
    """A byte-level BPE tokenizer trained on the first `budget` characters of the sources' training documents
    (read as prepare reads them; fine-tuning records contribute their text). A few MB learn a small vocabulary
    well and keep training to seconds."""
    settings = Settings([str(s) for s in sources], "", field, val_fraction, skip_bad=True,
                        max_doc_chars=max_doc_chars)
    texts: list[str] = []
    for _, _, unit in units(source_files(sources, max_bytes), settings, None, collections.Counter()):
        if unit.split == "train":
            texts += [text[:budget] for text, _ in unit.segments]
            budget -= sum(len(t) for t in texts[-len(unit.segments):])
            if budget <= 0:
                break
    if not texts:
        raise PrepareError(f"sources {sources} hold no training text to learn a BPE vocabulary from")
    return BPETokenizer.train(texts, vocab_size)


def chat_template(tokenizer: Tokenizer) -> Callable | None:
    """The tokenizer's chat template (tokenizer_config.json's `chat_template`) as a function of messages, or
    None (conversations are then rendered as `role: content` lines)."""
    source = getattr(tokenizer, "config", {}).get("chat_template")
    if not isinstance(source, str):
        return None
    jinja2 = optional_import("jinja2", "rendering the tokenizer's chat template")
    sandbox = optional_import("jinja2.sandbox", "rendering the tokenizer's chat template")

    def raise_exception(message: str) -> None:  # what HuggingFace templates call on a conversation they refuse
        raise jinja2.TemplateError(message)

    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(source)
    except jinja2.TemplateError as e:
        raise PrepareError(f"the tokenizer's chat_template (tokenizer_config.json) does not parse: {e}") from None
    specials = {k: v if isinstance(v, str) else (v or {}).get("content", "")
                for k, v in tokenizer.config.items() if k.endswith("_token")}  # type: ignore[union-attr]

    def render(**kw: Any) -> str:
        try:
            return template.render(**specials, **kw)
        except jinja2.TemplateError as e:
            raise PrepareError(f"the chat template refuses this conversation: {e}") from None
    return render


# ---- reading ----------------------------------------------------------------------------------------

def read_manifest(folder: str | Path) -> dict[str, Any]:
    """A prepared folder's manifest, or a PrepareError saying what is wrong with it."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise PrepareError(f"{folder} is not a prepared corpus: it has no {MANIFEST} (make one with "
                           f"`dsmoe prepare SOURCES --out {folder}`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrepareError(f"{path} is corrupt ({e}); prepare the corpus again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PrepareError(f"{path} is not a dsmoe prepared-corpus manifest of format {FORMAT}; prepare it again")
    expected = {"settings": dict, "tokenizer": dict, "chunks": list, "next": list, "skipped": dict,
                "complete": bool, "vocab_size": int}
    wrong = [k for k, kind in expected.items() if not isinstance(manifest.get(k), kind)]
    if wrong or manifest.get("dtype") not in ("uint16", "uint32"):
        raise PrepareError(f"{path} is corrupt ({', '.join(wrong) or 'dtype'} missing or of the wrong type); "
                           "prepare the corpus again")
    return manifest


def is_prepared(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()

