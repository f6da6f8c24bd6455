"""Checkpoints: safetensors weights + JSON config + a torch file of training state, written atomically.

Layout of a checkpoint directory:
    model.safetensors   every tensor of model.state_dict(), the fp32 balancing biases (gate.bias) included;
                        with tied embeddings the output matrix is stored once, as embed.weight
    config.json         {"model": ModelConfig dict, "train": TrainConfig dict, "step": int,
                        "files_sha256": {file: SHA-256} of every other file, each verified when it is read}
    state.pt            optimizer, scheduler, torch / data RNG states, step, and loop bookkeeping
    tokenizer.json      which tokenizer (plus bpe.json for a trained BPE)

A run on several processes writes a sharded checkpoint instead: `shards/` (torch.distributed.checkpoint:
each rank's own file of model and AdamW tensors under their global names and shapes, so it loads at any
(dp, ep) layout or in one process; dsmoe.parallel.fsdp.training_tensors), config.json, state.pt without the
optimizer's tensors, and the tokenizer. Weights are checked finite when they are loaded: a checkpoint is
never resumed, evaluated or sampled from with a NaN in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dsmoe.config import ModelConfig, TrainConfig
from dsmoe.model import MoETransformer
from dsmoe.parallel.fsdp import local
from dsmoe.paths import FolderPathError, folder_file
from dsmoe.pretrained import from_pretrained, has_non_finite, read_json
from dsmoe.tokenizer import Tokenizer, load_tokenizer

FILES = ("model.safetensors", "config.json", "state.pt")
SHARDS = "shards"  # a sharded checkpoint's DCP folder, in place of model.safetensors
TIED = "head.weight"  # dropped from the file when tied: safetensors refuses tensors that share memory


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model it is loaded into."""


def _is_checkpoint(directory: Path) -> bool:
    """Every file a checkpoint needs is there."""
    weights = (directory / FILES[0]).is_file() or is_sharded(directory)
    return weights and all((directory / f).is_file() for f in FILES[1:])


def is_sharded(directory) -> bool:
    """A checkpoint written by several processes (DCP shards)."""
    return (Path(directory) / SHARDS / ".metadata").is_file()


def _looks_like_checkpoint(directory: Path) -> bool:
    """A (possibly damaged) checkpoint: its weights, or a config.json that names a step (a run directory's
    config.json has none)."""
    if (directory / "model.safetensors").exists() or (directory / SHARDS).exists():
        return True
    try:
        return "step" in json.loads((directory / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return (directory / "config.json").exists() and directory.name.startswith("checkpoint")


def resolve(path) -> Path:
    """A checkpoint directory from either itself or a run directory holding `checkpoint/`.

    A complete checkpoint wins: after a crash between save's two renames only `checkpoint.old` is whole, and
    the run directory's own config.json is not a checkpoint.
    """
    path = Path(path)
    candidates = (path / "checkpoint", path / "checkpoint.old", path)
    for candidate in candidates:
        if _is_checkpoint(candidate):
            return candidate
    for candidate in candidates:  # damaged: the loaders name what is missing or corrupt
        if _looks_like_checkpoint(candidate):
            return candidate
    raise CheckpointError(f"no checkpoint at {str(path)!r}: expected a directory with {', '.join(FILES)} "
                          f"(or a run directory holding checkpoint/)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary folders of saves that crashed (their process is gone), so a full disk does not stay full."""
    for tmp in directory.parent.glob(f".{directory.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save(directory, model, config: dict, state: dict, tokenizer=None) -> Path:
    """Write the checkpoint to a temporary directory, then swap it in, so a crash never leaves half a file.

    config.json records the weights' SHA-256, which load_weights verifies. A write that fails (a full disk)
    removes its temporary folder and raises a CheckpointError; the previous checkpoint is kept.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = dict(model.state_dict())
    if model.cfg.tie_embeddings:
        tensors.pop(TIED)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        _write_beside(tmp, config, state, tokenizer)
    except (OSError, SafetensorError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(directory, e) from None
    _swap(tmp, directory)
    return directory


def _write_beside(tmp: Path, config: dict, state: dict, tokenizer) -> None:
    """What a checkpoint holds beside its tensors: state.pt, the tokenizer, and last config.json, with the
    SHA-256 of every other file (the tensors' too)."""
    torch.save(state, tmp / "state.pt")
    if tokenizer is not None:
        tokenizer.save(tmp)
    files = sorted(f for f in tmp.rglob("*") if f.is_file() and f.name != "config.json")
    sums = {f.relative_to(tmp).as_posix(): _sha256(f) for f in files}
    (tmp / "config.json").write_text(json.dumps({**config, "files_sha256": sums}, indent=2))


def _recorded_sums(directory: Path) -> dict[str, str]:
    """{file: SHA-256} as config.json recorded them (older checkpoints: the weights' or the shards' only)."""
    config = _read_json_quietly(directory / "config.json")
    sums = config.get("files_sha256")
    if isinstance(sums, dict):
        return sums
    legacy = {f"{SHARDS}/{name}": sha for name, sha in (config.get("shards_sha256") or {}).items()}
    if config.get("weights_sha256"):
        legacy["model.safetensors"] = config["weights_sha256"]
    return legacy


def verify(directory, which=lambda name: True, missing_ok: bool = False) -> None:
    """Compare the files `which` selects with the SHA-256 config.json recorded when they were written; a
    CheckpointError names every file that is missing (unless `missing_ok`: its loader names it better) or
    differs (a flipped bit, a truncated copy, another file in its place)."""
    directory = Path(directory)
    bad = []
    for name, sha in _recorded_sums(directory).items():
        if which(name):
            path = folder_file(directory, name, f"config.json's checksum entry {name!r}")  # nothing outside it
            if path.is_file() and _sha256(path) != sha or not path.is_file() and not missing_ok:
                bad.append(name)
    if bad:
        raise CheckpointError(f"checkpoint {str(directory)!r}: {', '.join(bad)} "
                              f"{'is' if len(bad) == 1 else 'are'} corrupt or missing (the SHA-256 differs from the "
                              "one config.json recorded when the checkpoint was written)")


def _tokenizer_file(name: str) -> bool:
    """tokenizer.json, bpe.json: what a checkpoint holds besides its tensors and state.pt."""
    return name not in FILES and not name.startswith(f"{SHARDS}/")


def _first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The key of the first tensor with a NaN or inf, or None."""
    return next((k for k, t in tensors.items() if has_non_finite(t)), None)


def _non_finite_error(directory: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(directory)!r}: {what} holds NaN or inf; such weights cannot be trained, "
                           "evaluated or sampled from (restore an earlier checkpoint)")


def _write_failed(directory: Path, e: BaseException) -> CheckpointError:
    previous = "the previous checkpoint is kept" if _is_checkpoint(directory) else "no earlier checkpoint exists"
    return CheckpointError(f"could not write the checkpoint in {str(directory.parent)!r} ({e}); {previous}. "
                           "Is the disk full?")


def _swap(tmp: Path, directory: Path) -> None:
    """Put the finished `tmp` in place of `directory`. os.replace cannot overwrite a non-empty directory: move
    the old one aside, swap, then delete it."""
    old = directory.with_name(directory.name + ".old")
    if directory.exists():  # else `old` may be the only checkpoint left by a crash mid-swap: keep it until now
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def save_sharded(directory, tensors: dict[str, torch.Tensor], config: dict, state: dict, tokenizer=None) -> Path:
    """A collective of every rank: each writes its own shards of `tensors` (global views, dsmoe.parallel.fsdp
    .training_tensors) with DCP into a temporary folder on the shared filesystem, rank 0 the SHA-256 of every
    shard, config.json, state.pt and the tokenizer; then rank 0 swaps it in. A failed write on any rank
    removes the temporary folder and raises a CheckpointError on every rank; the previous checkpoint is kept."""
    directory = Path(directory)
    main = dist.get_rank() == 0
    pid = [os.getpid()]
    dist.broadcast_object_list(pid, src=0)  # every rank writes into rank 0's temporary folder
    tmp = directory.with_name(f".{directory.name}.tmp{pid[0]}")
    if main:
        directory.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(directory)
        shutil.rmtree(tmp, ignore_errors=True)
    error: BaseException | None = None
    try:
        dcp.save(tensors, checkpoint_id=tmp / SHARDS)  # a collective: a failure on one rank raises on all
        if main:
            _check_every_shard_is_here(tmp / SHARDS)
            _write_beside(tmp, config, state, tokenizer)
    except Exception as e:  # DCP wraps a rank's OSError in a CheckpointException
        error = e
    failed = torch.tensor(float(error is not None))
    dist.all_reduce(failed)
    if failed.item():
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(directory, error or RuntimeError("another rank failed to write its shards"))
    if main:
        _swap(tmp, directory)
    dist.barrier()  # nobody goes on (to a next save, or to read it) before the swap
    return directory


def _check_every_shard_is_here(shards: Path) -> None:
    """Every rank's file that DCP's metadata lists is in rank 0's folder: on a filesystem the ranks do not share,
    the others' shards land in their own copies of the path, and rank 0 would keep a checkpoint without them."""
    listed = {item.relative_path for item in dcp.FileSystemReader(shards).read_metadata().storage_data.values()}
    missing = sorted(name for name in listed if not (shards / name).is_file())
    if missing:
        raise OSError(f"the shards {', '.join(missing)} that other ranks wrote are not in {shards}: the run directory "
                      "must be on a filesystem every rank shares")


def load_sharded(directory, tensors: dict[str, torch.Tensor], alone: bool = False) -> None:
    """Load a sharded checkpoint into `tensors` (global views of a model and optimizer, or plain tensors in
    one process), in place, whatever layout wrote it. Its shards' SHA-256 are verified first (by rank 0).
    A collective in a process group, unless `alone` (this process reads whole tensors on its own)."""
    directory = resolve(directory)
    distributed = dist.is_available() and dist.is_initialized() and not alone
    error = ""
    if not distributed or dist.get_rank() == 0:
        try:
            verify(directory, lambda name: name.startswith(f"{SHARDS}/"))
        except CheckpointError as e:
            error = str(e)
    if distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CheckpointError(error)
    try:
        with warnings.catch_warnings():  # one process reading on its own is what no_dist says
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(tensors, checkpoint_id=directory / SHARDS, no_dist=not distributed)
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(directory)!r} does not match the model config: {e}") from None
    key = _first_non_finite({k: local(v) for k, v in tensors.items() if k.startswith("model.")})
    bad = torch.tensor(float(key is not None))
    if distributed:
        dist.all_reduce(bad)  # every rank refuses together, whichever holds the NaN
    if bad.item():
        raise _non_finite_error(directory, f"tensor {key!r}" if key else "another rank's shard of the weights")


def read_config(directory) -> dict:
    directory = resolve(directory)
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(directory)!r} is incomplete: config.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {str(directory)!r}: config.json is corrupt ({e})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"checkpoint {str(directory)!r}: config.json has no 'model' section")
    return config


def load_weights(directory, model, alone: bool = False) -> None:
    """Load model.safetensors (or a sharded checkpoint's model tensors: see load_sharded for `alone`) into
    `model`, every tensor checked for presence and shape."""
    directory = resolve(directory)
    if is_sharded(directory):
        load_sharded(directory, {f"model.{k}": v for k, v in model.state_dict().items()}, alone)
        return
    path = directory / "model.safetensors"
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(directory)!r} is incomplete: model.safetensors is missing")
    verify(directory, lambda name: name == "model.safetensors")  # bit flips load silently otherwise
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {str(directory)!r}: model.safetensors is corrupt or truncated "
                              f"({e})") from None
    if model.cfg.tie_embeddings and "embed.weight" in tensors:
        tensors[TIED] = tensors["embed.weight"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = (([f"missing {missing[:5]}"] if missing else [])
                 + ([f"unexpected {unexpected[:5]}"] if unexpected else []))
        raise CheckpointError(f"checkpoint {str(directory)!r} does not match the model config: "
                              + "; ".join(parts + wrong[:5]))
    key = _first_non_finite(tensors)
    if key is not None:
        raise _non_finite_error(directory, f"tensor {key!r}")
    model.load_state_dict(tensors)


def _read_json_quietly(path: Path) -> dict:
    """A JSON object, or {} when it cannot be read (read_config reports a damaged config.json)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def load_state(directory, device="cpu") -> dict:
    directory = resolve(directory)
    path = directory / "state.pt"
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(directory)!r} is incomplete: state.pt is missing (needed to resume)")
    # state.pt, and the tokenizer a resume has read by now (its loader's errors first: they say more)
    verify(directory, lambda name: name == "state.pt" or _tokenizer_file(name), missing_ok=True)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(directory)!r}: state.pt is corrupt or truncated ({e})") from None


def configs_from_checkpoint(directory) -> tuple[ModelConfig, TrainConfig]:
    """The configs saved with a checkpoint, or a CheckpointError saying why they are not valid."""
    config = read_config(directory)
    try:
        return ModelConfig(**config["model"]), TrainConfig(**config.get("train", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(directory)!r}: config.json is not a valid config ({e})") from None


def resolve_device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return name


def is_hf_folder(directory) -> bool:
    """A HuggingFace folder: its config.json names a model_type (dsmoe's holds a "model" section instead). A
    config.json that links out of the folder is an error (FolderPathError), not a "no"."""
    try:
        config = read_json(directory, "config.json")
    except FolderPathError:
        raise
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config and "model" not in config


def load_checkpoint(directory, device: str = "cpu") -> tuple[MoETransformer, ModelConfig, TrainConfig, Tokenizer]:
    """(model, model_cfg, train_cfg, tokenizer) from a checkpoint or run directory, or from a HuggingFace
    DeepSeek-V2/V3 folder (dsmoe.pretrained; with the default run settings, sequences of at most 512
    tokens), in eval mode."""
    if is_hf_folder(directory):
        model = from_pretrained(directory, device=resolve_device(device))
        run_cfg = TrainConfig(seq_len=min(model.cfg.max_seq_len, 512), batch_size=8)
        return model, model.cfg, run_cfg, load_tokenizer(directory)
    ckpt = resolve(directory)
    model_cfg, train_cfg = configs_from_checkpoint(ckpt)
    model = MoETransformer(model_cfg)
    load_weights(ckpt, model)
    model.to(resolve_device(device)).eval()
    tokenizer = load_tokenizer(ckpt)
    verify(ckpt, _tokenizer_file, missing_ok=True)  # after its loader, whose errors say more
    return model, model_cfg, train_cfg, tokenizer
