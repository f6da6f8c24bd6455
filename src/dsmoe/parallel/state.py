"""Checkpoint state of an expert-parallel model: every expert gathered whole for saving, and a full state
cut down to this rank's experts for loading, so a checkpoint loads at any rank count (optimizer moments
included)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from dsmoe.parallel.expert_parallel import EXPERT_WEIGHTS, ExpertParallel, expert_parallel_modules


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded expert weight gathered whole ([E, ...], each expert once).

    A collective: every rank of each expert-parallel group must call it; every rank gets the result.
    Without expert parallelism this is model.state_dict().
    """
    sd = model.state_dict()
    for prefix, m in expert_parallel_modules(model).items():
        for w in EXPERT_WEIGHTS:
            local = getattr(m, w).detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(m.world)]
            dist.all_gather(parts, local, group=m.group)
            sd[f"{prefix}.{w}" if prefix else w] = torch.cat(parts)
    return sd


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
                         ) -> _IncompatibleKeys:
    """Load a full state dict (from any number of ranks, or a single process) into a sharded model.

    Each rank takes its own block of experts; no communication.
    """
    sd = dict(state_dict)
    for prefix, m in expert_parallel_modules(model).items():
        for w in EXPERT_WEIGHTS:
            key = f"{prefix}.{w}" if prefix else w
            if key not in sd:
                continue
            full = sd[key]
            if full.shape[0] != m.n_experts:
                raise ValueError(f"{key} has {full.shape[0]} experts, the model has {m.n_experts}")
            sd[key] = full[m.expert_range.start:m.expert_range.stop]
    keys: _IncompatibleKeys = model.load_state_dict(sd, strict=strict)  # (missing, unexpected)
    return keys


def _expert_state(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]
                  ) -> Iterator[tuple[ExpertParallel, dict[str, Any], str, torch.Tensor]]:
    """(module, state, key, tensor) for every per-expert tensor (AdamW's moments) of an optimizer state dict.

    Parameters are numbered in model.parameters() order, which sharding keeps.
    """
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for m in expert_parallel_modules(model).values():
        for w in EXPERT_WEIGHTS:
            state = sd["state"].get(index[id(getattr(m, w))], {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    yield m, state, key, value


@torch.no_grad()
def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with the per-expert state gathered whole. A collective.

    The result loads into a full model's optimizer or, through shard_optimizer_state, into one sharded at
    another world size.
    """
    sd = optimizer.state_dict()
    sd["state"] = {i: dict(s) for i, s in sd["state"].items()}  # state_dict() shares these with the optimizer
    for m, state, key, value in _expert_state(model, optimizer, sd):
        parts = [torch.empty_like(value) for _ in range(m.world)]
        dist.all_gather(parts, value.contiguous(), group=m.group)
        state[key] = torch.cat(parts)
    return sd


def shard_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict cut down to this rank's experts (for optimizer.load_state_dict)."""
    sd = {"state": {i: dict(s) for i, s in full["state"].items()}, "param_groups": full["param_groups"]}
    for m, state, key, value in _expert_state(model, optimizer, sd):
        state[key] = value[m.expert_range.start:m.expert_range.stop]
    return sd
