"""A model laid out on a 2-D (dp, ep) DeviceMesh with FSDP2, and the global view of its sharded tensors.

N = dp * ep processes; rank r = d * ep + e (the ranks of one expert-parallel group are neighbours, so the
all-to-alls stay inside a node when ep divides the GPUs per node). Every rank trains on its own share of
the global batch, so for the non-expert weights (attention, embeddings, norms, router, shared experts) all N
ranks are data parallel: FSDP2 shards each of them over all N ranks (dim 0) and reduce-scatters their
gradients averaged over N. The routed experts of an MoE layer are first split over ep (rank e holds the
block of experts e*L .. e*L+L-1: dsmoe.parallel.expert_parallel), then each block is sharded by FSDP2 over
dp along dim 1 (the expert's hidden or model width, so any number of experts per rank shards evenly).

Global view (for DCP checkpoints that reshard): an expert weight [L, F, D] of rank (d, e), sharded over dp,
is the piece (Shard(1) over dp, Shard(0) over ep) of the whole [E, F, D] on the 2-D mesh; every other
parameter is already the DTensor of its whole tensor over the flat mesh of N ranks.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from dsmoe.parallel.expert_parallel import apply_expert_parallel, expert_parallel_modules, expert_parameter_names

_M = TypeVar("_M", bound=nn.Module)


def build_meshes(dp: int, ep: int, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
    """(the 2-D (dp, ep) mesh, the flat mesh of every rank) over the default process group."""
    if dp * ep != dist.get_world_size():
        raise ValueError(f"dp={dp} x ep={ep} must equal the {dist.get_world_size()} processes launched")
    mesh = init_device_mesh(device_type, (dp, ep), mesh_dim_names=("dp", "ep"))
    return mesh, DeviceMesh.from_group(dist.group.WORLD, device_type, mesh_dim_names=("dp_ep",))  # type: ignore[arg-type]


def shard_model(model: _M, mesh: DeviceMesh, flat: DeviceMesh, blocks: list[nn.Module]) -> _M:
    """Expert parallelism over mesh["ep"] (when ep > 1), then FSDP2: each expert block over mesh["dp"] (dim 1),
    each of `blocks` and the rest of the model over every rank. In place; every rank must hold the same
    full model before the call."""
    if mesh["ep"].size() > 1:
        apply_expert_parallel(model, mesh["ep"].get_group())
    for experts in expert_parallel_modules(model).values():
        fully_shard(experts, mesh=mesh["dp"], shard_placement_fn=lambda p: Shard(1))
    for block in blocks:
        fully_shard(block, mesh=flat)
    fully_shard(model, mesh=flat)
    return model


def global_view(t: torch.Tensor, n_experts: int | None, mesh: DeviceMesh | None) -> torch.Tensor:
    """The tensor a checkpoint stores for `t` (a parameter or a per-parameter optimizer state): itself, or for an
    expert weight (n_experts given) the DTensor of all n_experts on the 2-D mesh whose local piece is t's.
    It shares t's storage, so loading into it loads into t."""
    if n_experts is None or mesh is None or t.dim() == 0:
        return t
    shape = torch.Size((n_experts, *t.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local(t), mesh, (Shard(1), Shard(0)), run_check=False, shape=shape, stride=stride)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a tensor (itself when it is not a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def training_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, mesh: DeviceMesh | None = None
                     ) -> dict[str, torch.Tensor]:
    """Every tensor of a training checkpoint by name, as global views: `model.<state-dict key>` and
    `optimizer.<parameter name>.<state>` (AdamW's step, exp_avg, exp_avg_sq). Plain tensors in one process;
    on a mesh, DTensors whose global shapes do not depend on the layout, which is what lets a checkpoint
    written at one (dp, ep) load at another, or in one process. Shares storage with the model and optimizer."""
    experts = expert_parameter_names(model)
    out = {f"model.{k}": global_view(v, experts.get(k), mesh) for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        for key, value in optimizer.state[p].items():
            out[f"optimizer.{name}.{key}"] = global_view(value, experts.get(name), mesh)
    return out


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's state for every parameter that has none yet (zeros), laid out like its parameter: what a
    checkpoint's moments load into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=local(p).device),
                                      "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
