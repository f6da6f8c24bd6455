"""Parallelism applied to a built model from outside (dsmoe's model code is single-device).

    comm.py             process group set-up; the autograd-aware all-to-all with uneven splits
    expert_parallel.py  apply_expert_parallel: each rank holds a block of every MoE layer's experts
    fsdp.py             the (dp, ep) DeviceMesh, FSDP2 over it, and the global view of sharded tensors (DCP)
    state.py            the gathered layout: experts (and their optimizer moments) gathered whole, cut back per
                        rank (layer-level expert parallelism without FSDP, and `dsmoe bench ep`'s baseline)
    context.py          Context, implemented by SingleProcess and MeshContext: what the training loop talks to
"""

from dsmoe.parallel.comm import all_to_all, all_to_all_async, init_distributed
from dsmoe.parallel.context import Context, MeshContext, SingleProcess, init_context
from dsmoe.parallel.expert_parallel import (
    ExpertParallel,
    apply_expert_parallel,
    comm_stats,
    expert_parallel_modules,
    expert_parameter_names,
)
from dsmoe.parallel.fsdp import build_meshes, global_view, init_optimizer_state, shard_model, training_tensors
from dsmoe.parallel.state import full_optimizer_state_dict, full_state_dict, load_full_state_dict, shard_optimizer_state

__all__ = [
    "Context", "ExpertParallel", "MeshContext", "SingleProcess", "all_to_all", "all_to_all_async",
    "apply_expert_parallel", "build_meshes", "comm_stats", "expert_parallel_modules", "expert_parameter_names",
    "full_optimizer_state_dict", "full_state_dict", "global_view", "init_context", "init_distributed",
    "init_optimizer_state", "load_full_state_dict", "shard_model", "shard_optimizer_state", "training_tensors",
]
