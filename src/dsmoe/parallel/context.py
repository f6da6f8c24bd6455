"""The distributed context of a run: one object that the training loop and evaluation talk to.

`SingleProcess` does nothing (every method is the identity or the plain single-device call), so the loop
has no `if distributed:` branches; `ExpertParallelContext` shards the routed experts over every process
of a torchrun launch (dsmoe.parallel.expert_parallel), averages the replicated gradients, clips by the
whole model's norm, splits batches over the ranks and gathers checkpoints whole.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from dsmoe.parallel import state
from dsmoe.parallel.comm import init_distributed
from dsmoe.parallel.expert_parallel import apply_expert_parallel, expert_parameter_names

_M = TypeVar("_M", bound=nn.Module)


class SingleProcess:
    """One process holds the whole model: nothing to split, reduce or gather."""

    rank, world = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, model: _M) -> _M:
        """Apply this context's parallelism to a built model (with its full weights loaded)."""
        return model

    def local_batch(self, *tensors_B: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's share of a global batch that every rank drew alike (same seed)."""
        return tensors_B

    def all_reduce_(self, tensor: torch.Tensor, mean: bool = False) -> torch.Tensor:
        """In place: the sum (or mean) over the ranks."""
        return tensor

    def reduce_grads(self, model: nn.Module) -> None:
        """After backward: make the gradients those of the mean loss over the global batch."""

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's tensors, for a checkpoint (a collective under expert parallelism)."""
        return model.state_dict()

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(sd)

    def full_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> None:
        optimizer.load_state_dict(check_optimizer_state(optimizer, full))

    def run_dir(self, run_dir: Path) -> Path:
        """Where this rank writes: the run directory on rank 0, a scratch folder elsewhere."""
        return run_dir


class ExpertParallelContext(SingleProcess):
    """Every process of the default group holds 1/world of each MoE layer's routed experts and a replica of
    everything else; each rank trains on its contiguous share of the global batch."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def shard(self, model: _M) -> _M:
        return apply_expert_parallel(model, self.group)

    def local_batch(self, *tensors_B: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B = len(tensors_B[0])
        if B % self.world:
            raise ValueError(f"batch_size={B} (the global batch) must be divisible by the {self.world} ranks")
        return tuple(t.chunk(self.world)[self.rank] for t in tensors_B)

    def all_reduce_(self, tensor: torch.Tensor, mean: bool = False) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.group)
        return tensor.div_(self.world) if mean else tensor

    @torch.no_grad()
    def reduce_grads(self, model: nn.Module) -> None:
        """Replicated parameters: gradients averaged over the group (one flat all-reduce per dtype). Expert
        parameters: their gradient already sums every rank's loss (the combine's backward brings it home),
        so it is divided by the world size to match the mean of the ranks' losses; no communication."""
        experts = expert_parameter_names(model)
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name in experts:
                if p.grad is not None:
                    p.grad.div_(self.world)
                continue
            if p.grad is None:  # every rank must contribute the same buffers
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for params in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
            self.all_reduce_(flat, mean=True)
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))  # type: ignore[union-attr]

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole model's gradient: replicated parameters once, every rank's experts
        (call after reduce_grads, which makes the replicated gradients equal on every rank)."""
        experts = expert_parameter_names(model)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        device = next(iter(grads.values())).device

        def sq(names) -> torch.Tensor:
            return sum((grads[n].float().square().sum() for n in names), torch.zeros((), device=device))

        expert_sq = self.all_reduce_(sq([n for n in grads if n in experts]))
        total = (sq([n for n in grads if n not in experts]) + expert_sq).sqrt()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads.values():
            g.mul_(scale.to(g.dtype))
        return total

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return state.full_state_dict(model)

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        state.load_full_state_dict(model, sd)

    def full_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return state.full_optimizer_state_dict(model, optimizer)

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> None:
        optimizer.load_state_dict(check_optimizer_state(optimizer, state.shard_optimizer_state(model, optimizer, full)))

    def run_dir(self, run_dir: Path) -> Path:
        if self.is_main:
            return run_dir
        scratch = tempfile.mkdtemp(prefix="dsmoe-rank")  # what rank 0 keeps, the others write and drop
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        return Path(scratch)


def check_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> dict:
    """The optimizer state to load, refused with the first parameter whose moments do not fit it (fused AdamW
    would read past the end of a smaller tensor instead of raising)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = sd.get("state", {})
    if len(sd.get("param_groups", [])) != len(optimizer.param_groups) or \
            sum(len(g["params"]) for g in sd["param_groups"]) != len(params):
        raise ValueError("state.pt's optimizer state holds another set of parameters than this model")
    for i, p in enumerate(params):
        for key, value in saved.get(i, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                raise ValueError(f"state.pt's optimizer {key} of parameter {i} has shape {tuple(value.shape)}, "
                                 f"the model's parameter {tuple(p.shape)}: the state belongs to another model")
    return sd


def init_context(expert_parallel: int, global_batch: int, timeout_s: float = 300.0) -> SingleProcess:
    """The context of a run: SingleProcess, or for `--expert-parallel N` (launched by
    `torchrun --nproc_per_node N`) the process group and an ExpertParallelContext over it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not expert_parallel and world > 1:  # each process would train its own copy into the same folder
        raise ValueError(f"{world} processes were launched (torchrun) but --expert-parallel is not set: plain data "
                         "parallelism is not supported yet; run one process, or shard the experts with "
                         f"--expert-parallel {world}")
    if not expert_parallel:
        return SingleProcess()
    if "RANK" not in os.environ and not dist.is_initialized():
        raise ValueError(f"--expert-parallel {expert_parallel} needs one process per rank: launch with "
                         f"`torchrun --nproc_per_node {expert_parallel} -m dsmoe train ...`")
    init_distributed(timeout_s=timeout_s)
    world = dist.get_world_size()
    if world != expert_parallel:
        raise ValueError(f"--expert-parallel {expert_parallel} does not match the {world} processes launched; "
                         "expert parallelism spans every process")
    if global_batch % world:
        raise ValueError(f"batch_size={global_batch} (the global batch) must be divisible by --expert-parallel {world}")
    return ExpertParallelContext()
