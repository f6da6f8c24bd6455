"""The distributed context of a run (`Context`): one object that the training loop and evaluation talk to.

`SingleProcess` does nothing (every method is the identity or the plain single-device call), so the loop
has no `if distributed:` branches; `MeshContext` lays the model out on a (dp, ep) DeviceMesh with expert
parallelism and FSDP2 (dsmoe.parallel.fsdp), scales the experts' gradients, clips by the whole model's
norm, splits batches over the ranks, and loads a single-process checkpoint's optimizer state piecewise.
"""

from __future__ import annotations

import abc
import atexit
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from dsmoe.config import ModelConfig, TrainConfig
from dsmoe.memory import check_step_memory
from dsmoe.model import Block, MoETransformer
from dsmoe.parallel.comm import end_process_groups, init_distributed
from dsmoe.parallel.expert_parallel import expert_parameter_names
from dsmoe.parallel.fsdp import build_meshes, global_view, init_optimizer_state, local, shard_model

_M = TypeVar("_M", bound=nn.Module)


class Context(abc.ABC):
    """What a run asks of its parallelism, so that the training loop and evaluation have no `if distributed:`
    branches. SingleProcess implements it as the identity, MeshContext on a (dp, ep) DeviceMesh."""

    rank: int
    world: int
    ep: int           # expert-parallel degree (1: every rank holds every expert)
    sharded: bool     # checkpoints: whole tensors (safetensors) in one process, DCP shards under a mesh
    mesh: DeviceMesh | None  # the (dp, ep) mesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_ranks(self) -> int:
        """The ranks that each take their own share of a batch (all of them, but under pipeline parallelism)."""
        return self.world

    # ---- what a step computes: the plain forward and backward, which pipeline parallelism replaces -----------

    def forward_backward(self, model: MoETransformer, x: torch.Tensor, y: torch.Tensor, docs: torch.Tensor | None,
                         weight: float, aux_weight: float,
                         amp: Callable[[], AbstractContextManager[Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch's forward and backward of (loss * weight + aux * aux_weight); returns the weighted
        loss and the auxiliary loss, detached (no host sync)."""
        with amp():
            _, loss = model(x, y, docs_BS=docs)
            aux = model.aux_loss()
        (loss * weight + aux * aux_weight).backward()
        return loss.detach() * weight, aux.detach()

    def forward_loss(self, model: MoETransformer, x: torch.Tensor, y: torch.Tensor, docs: torch.Tensor | None,
                     amp: Callable[[], AbstractContextManager[Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: (the loss summed over the batch's trained targets, their count) of this rank."""
        with amp():
            _, loss = model(x, y, docs_BS=docs)
        targets = (y != -1).sum()
        return loss.float() * targets.to(loss.device), targets

    def routing_stats(self, model: MoETransformer) -> dict[str, torch.Tensor]:
        """The last step's per-layer load [L, E] and MaxVio [L] of every MoE layer of the model (not only this
        rank's stage)."""
        return model.routing_stats()

    def layer_mean_(self, t_L: torch.Tensor) -> torch.Tensor:
        """A per-layer statistic as the log shows it: this rank's own (every rank has every layer)."""
        return t_L

    def check_memory(self, model_cfg: ModelConfig, train_cfg: TrainConfig, available: int | None) -> None:
        """Refuse a run whose training step would not fit in `available` bytes on each rank (dsmoe.memory)."""
        check_step_memory(model_cfg, train_cfg, available, world=self.world, ep=self.ep)

    def all_reduce_layers_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the sum over the ranks that hold the same layers (the loss-free balancing counts)."""
        return self.all_reduce_(tensor)

    @abc.abstractmethod
    def shard(self, model: _M) -> _M:
        """Apply this context's parallelism to a built model (with its full weights loaded)."""

    @abc.abstractmethod
    def reshard(self, model: nn.Module) -> None:
        """After a forward without backward (evaluation): give back the gathered weights, so that the parameters
        are the shards again (what the optimizer and checkpoints hold)."""

    @abc.abstractmethod
    def local_batch(self, *tensors_B: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's share of a global batch that every rank drew alike (same seed)."""

    @abc.abstractmethod
    def all_reduce_(self, tensor: torch.Tensor, mean: bool = False) -> torch.Tensor:
        """In place: the sum (or mean) over the ranks."""

    @abc.abstractmethod
    def least(self, value: int | None) -> int | None:
        """The smallest of the ranks' values (None: unknown, larger than any), so that every rank decides alike."""

    @abc.abstractmethod
    def reduce_grads(self, model: nn.Module) -> None:
        """After backward: make the gradients those of the mean loss over the global batch."""

    @abc.abstractmethod
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the whole model's gradient to `max_norm`; returns the norm before clipping."""

    @abc.abstractmethod
    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  full: dict[str, Any]) -> None:
        """A single-process checkpoint's optimizer state (whole tensors, by parameter index)."""

    @abc.abstractmethod
    def run_dir(self, run_dir: Path) -> Path:
        """Where this rank writes: the run directory on rank 0, a scratch folder elsewhere."""

    @abc.abstractmethod
    def close(self) -> None:
        """After a run's last collective, on every rank: end the process groups this context started."""


class SingleProcess(Context):
    """One process holds the whole model: nothing to split, reduce or gather."""

    rank, world, ep = 0, 1, 1
    sharded = False
    mesh = None

    def shard(self, model: _M) -> _M:
        return model

    def reshard(self, model: nn.Module) -> None:
        pass

    def local_batch(self, *tensors_B: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tensors_B

    def all_reduce_(self, tensor: torch.Tensor, mean: bool = False) -> torch.Tensor:
        return tensor

    def least(self, value: int | None) -> int | None:
        return value

    def reduce_grads(self, model: nn.Module) -> None:
        pass

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  full: dict[str, Any]) -> None:
        optimizer.load_state_dict(check_optimizer_state(optimizer, full))

    def run_dir(self, run_dir: Path) -> Path:
        return run_dir

    def close(self) -> None:
        pass


class MeshContext(Context):
    """N = dp x ep processes of a torchrun launch on a (dp, ep) DeviceMesh (dsmoe.parallel.fsdp): routed experts
    split over ep and FSDP2-sharded over dp, everything else FSDP2-sharded over all N; each rank trains on its
    contiguous share of the global batch. Checkpoints are DCP: each rank writes its own shards."""

    sharded = True
    owns_group = False  # whether close() ends the process groups (init_context started them)

    def __init__(self, dp: int, ep: int, device_type: str = "cpu"):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp, self.ep = dp, ep
        self.mesh: DeviceMesh
        self.mesh, self.flat = build_meshes(dp, ep, device_type)

    def shard(self, model: _M) -> _M:
        blocks: list[nn.Module] = [m for m in model.modules() if isinstance(m, Block)]  # MTP's blocks too
        return shard_model(model, self.mesh, self.flat, blocks)

    def reshard(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def local_batch(self, *tensors_B: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B = len(tensors_B[0])
        if B % self.world:
            raise ValueError(f"batch_size={B} (the global batch) must be divisible by the {self.world} ranks")
        return tuple(t.chunk(self.world)[self.rank] for t in tensors_B)

    def all_reduce_(self, tensor: torch.Tensor, mean: bool = False) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor.div_(self.world) if mean else tensor

    @torch.no_grad()
    def reduce_grads(self, model: nn.Module) -> None:
        """FSDP2 reduce-scattered every gradient during backward, averaged over its mesh: over all N ranks for
        the non-expert weights, the mean loss already. An expert's gradient arrives summed over the ep ranks
        whose tokens it computed (the combine's backward brings them home), then averaged over dp: divided
        here by ep, it is the gradient of the mean loss too. No communication."""
        names = expert_parameter_names(model)
        for name, p in model.named_parameters():
            if name in names and p.grad is not None:
                p.grad.div_(self.ep)

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole model's gradient: every element lives on exactly one rank (FSDP2
        shards, experts split over ep), so one all-reduce of the local sums of squares gives it."""
        grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
        total = self.all_reduce_(torch.stack([g.float().square().sum() for g in grads]).sum()).sqrt()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
        return total

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  full: dict[str, Any]) -> None:
        """A single-process checkpoint's optimizer state (whole tensors, by parameter index): each rank copies
        its own piece of every moment, no communication."""
        names = {id(p): n for n, p in model.named_parameters()}
        experts = expert_parameter_names(model)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        wholes = [global_view(p, experts.get(names[id(p)]), self.mesh).shape for p in params]
        check_optimizer_state(optimizer, full, wholes)
        init_optimizer_state(optimizer)
        for i, p in enumerate(params):
            for key, whole in full["state"].get(i, {}).items():
                view = global_view(optimizer.state[p][key], experts.get(names[id(p)]), self.mesh)
                if isinstance(view, DTensor):
                    whole = distribute_tensor(whole, view.device_mesh, view.placements, src_data_rank=None).to_local()
                local(view).copy_(whole)

    def run_dir(self, run_dir: Path) -> Path:
        if self.is_main:
            return run_dir
        scratch = tempfile.mkdtemp(prefix="dsmoe-rank")  # what rank 0 keeps, the others write and drop
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        return Path(scratch)

    def least(self, value: int | None) -> int | None:
        t = torch.tensor(math.inf if value is None else float(value), dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return None if math.isinf(t.item()) else int(t.item())

    def close(self) -> None:
        """End the process groups init_context started (comm.end_process_groups), this context's meshes first;
        the caller drops the model and optimizer before, since a group ends with the last reference to it. Only
        where every rank gets here: after a run, a coordinated stop, or a refusal every rank makes alike."""
        if self.owns_group and dist.is_initialized():
            del self.mesh, self.flat
            end_process_groups()


def check_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any],
                          shapes: list[torch.Size] | None = None) -> dict[str, Any]:
    """The optimizer state to load, refused with the first parameter whose moments do not fit it (fused AdamW
    would read past the end of a smaller tensor instead of raising). `shapes`: each parameter's whole shape,
    where it differs from the parameter's own (an expert block of a layer)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    shapes = shapes or [p.shape for p in params]
    saved = sd.get("state", {})
    if len(sd.get("param_groups", [])) != len(optimizer.param_groups) or \
            sum(len(g["params"]) for g in sd["param_groups"]) != len(params):
        raise ValueError("state.pt's optimizer state holds another set of parameters than this model")
    for i, shape in enumerate(shapes):
        for key, value in saved.get(i, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != shape:
                raise ValueError(f"state.pt's optimizer {key} of parameter {i} has shape {tuple(value.shape)}, "
                                 f"the model's parameter {tuple(shape)}: the state belongs to another model")
    return sd


def check_agreement(settings: dict[str, Any]) -> None:
    """Every rank's settings (the model and run configs) gathered in the run's first collective and compared:
    ranks launched with another lr, top_k or --out would otherwise train to the end without a word (and
    ranks writing to different folders leave a checkpoint without their shards). The error names each
    field that differs and the ranks' values, on every rank."""
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, _flat(settings))
    differ = [key for key in sorted(set().union(*ranks)) if any(r.get(key) != ranks[0].get(key) for r in ranks)]
    if differ:
        shown = "; ".join(f"{key}: " + ", ".join(f"rank {i} {r.get(key)!r}" for i, r in enumerate(ranks))
                          for key in differ[:5])
        raise ValueError(f"the {len(ranks)} ranks were launched with different settings ({shown}): launch "
                         "every rank with the same command line, with --out on a filesystem they share")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"moe.top_k": 2, ...}: a nested config dict with dotted keys."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def launch_world() -> int:
    """The processes of this launch: torchrun's WORLD_SIZE (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def layout_for_launch(expert_parallel: int, world: int) -> int:
    """The expert-parallel degree a resumed run takes when none is asked for: its checkpoint's where this launch's
    processes can hold it, else the largest that divides both (1 process: no expert parallelism). Checkpoints
    reshard to any layout, so a run never has to resume as it was launched."""
    if world % max(expert_parallel, 1) == 0:
        return expert_parallel
    ep = math.gcd(expert_parallel, world)
    return 0 if ep == 1 else ep


def init_context(expert_parallel: int, global_batch: int, device: str = "cpu", timeout_s: float = 300.0,
                 settings: dict[str, Any] | None = None, pipeline_parallel: int = 0, schedule: str = "1f1b",
                 microbatches: int = 0) -> Context:
    """The context of a run: SingleProcess, or for N processes launched by torchrun a MeshContext with
    ep = expert_parallel (1 when 0: plain data parallelism) and dp = N / ep. The layout is checked against
    torchrun's WORLD_SIZE before any process group is set up, so a bad one fails at once on every rank; then
    the ranks' `settings` are compared (check_agreement) before anything else talks."""
    world = launch_world()
    ep, pp = expert_parallel or 1, pipeline_parallel or 1
    if pp > 1:
        from dsmoe.parallel.pipeline import check_layout
        if world == 1:
            raise ValueError(f"--pipeline-parallel {pp} needs one process per stage: launch with `torchrun "
                             f"--nproc_per_node {pp * ep} -m dsmoe train ...` (pp x dp x ep processes)")
        dp = check_layout(world, pp, ep, schedule, microbatches, global_batch)
    if world == 1 and ep > 1:
        raise ValueError(f"--expert-parallel {ep} needs one process per rank: launch with "
                         f"`torchrun --nproc_per_node {ep} -m dsmoe train ...` (or a multiple of {ep} processes); "
                         "a checkpoint of any layout also resumes in one process with --expert-parallel 1")
    if world % ep:
        raise ValueError(f"--expert-parallel {ep} must divide the {world} processes launched (data parallel over "
                         f"processes / expert-parallel); choose one of "
                         f"{', '.join(str(d) for d in range(1, world + 1) if world % d == 0)}")
    if pp == 1 and global_batch % world:
        raise ValueError(f"batch_size={global_batch} (the global batch) must be divisible by the {world} processes")
    if world == 1:
        return SingleProcess()
    started = not dist.is_initialized()
    init_distributed(timeout_s=timeout_s)
    try:
        check_agreement(settings or {})
    except ValueError:
        if started:  # every rank refuses together: end the group in order, as MeshContext.close does
            end_process_groups()
        raise
    device_type = "cuda" if device == "cuda" else "cpu"
    if pp > 1:
        from dsmoe.parallel.pipeline import PipelineContext
        ctx: MeshContext = PipelineContext(pp, dp, ep, schedule, microbatches, device_type, timeout_s)
    else:
        ctx = MeshContext(world // ep, ep, device_type)
    ctx.owns_group = started
    return ctx
