"""Checkpoints: safetensors weights + JSON config + a torch file of training state, written atomically.

Layout of a checkpoint directory:
    model.safetensors   every tensor of model.state_dict(), the fp32 balancing biases (gate.bias) included;
                        with tied embeddings the output matrix is stored once, as embed.weight
    config.json         {"model": ModelConfig dict, "train": TrainConfig dict, "step": int}
    state.pt            optimizer, scheduler, torch / data RNG states, step, and loop bookkeeping
    tokenizer.json      which tokenizer (plus bpe.json for a trained BPE)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dsmoe.config import ModelConfig, TrainConfig
from dsmoe.data import Tokenizer, load_tokenizer
from dsmoe.model import MoETransformer

FILES = ("model.safetensors", "config.json", "state.pt")
TIED = "head.weight"  # dropped from the file when tied: safetensors refuses tensors that share memory


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model it is loaded into."""


def resolve(path) -> Path:
    """A checkpoint directory from either itself or a run directory holding `checkpoint/`."""
    path = Path(path)
    for candidate in (path / "checkpoint", path, path / "checkpoint.old"):
        if (candidate / "config.json").exists() or (candidate / "model.safetensors").exists():
            return candidate
    raise CheckpointError(f"no checkpoint at {str(path)!r}: expected a directory with {', '.join(FILES)} "
                          f"(or a run directory holding checkpoint/)")


def save(directory, model, config: dict, state: dict, tokenizer=None, tensors: dict | None = None) -> Path:
    """Write the checkpoint to a temporary directory, then swap it in, so a crash never leaves half a file.

    `tensors`: the weights to write instead of model.state_dict() (expert parallel: the gathered experts).
    """
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = dict(model.state_dict() if tensors is None else tensors)
    if model.cfg.tie_embeddings:
        tensors.pop(TIED)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(state, tmp / "state.pt")
    if tokenizer is not None:
        tokenizer.save(tmp)
    # os.replace cannot overwrite a non-empty directory: move the old one aside, swap, then delete it
    old = directory.with_name(directory.name + ".old")
    if directory.exists():  # else `old` may be the only checkpoint left by a crash mid-swap: keep it until now
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


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


def load_weights(directory, model) -> None:
    """Load model.safetensors into `model`, every tensor checked for presence and shape."""
    directory = resolve(directory)
    path = directory / "model.safetensors"
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(directory)!r} is incomplete: model.safetensors is missing")
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
    model.load_state_dict(tensors)


def load_state(directory, device="cpu") -> dict:
    directory = resolve(directory)
    path = directory / "state.pt"
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(directory)!r} is incomplete: state.pt is missing (needed to resume)")
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


def load_checkpoint(directory, device: str = "cpu") -> tuple[MoETransformer, ModelConfig, TrainConfig, Tokenizer]:
    """(model, model_cfg, train_cfg, tokenizer) from a checkpoint or run directory, in eval mode."""
    ckpt = resolve(directory)
    model_cfg, train_cfg = configs_from_checkpoint(ckpt)
    model = MoETransformer(model_cfg)
    load_weights(ckpt, model)
    model.to(resolve_device(device)).eval()
    return model, model_cfg, train_cfg, load_tokenizer(ckpt)
