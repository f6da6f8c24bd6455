"""Process groups and the autograd-aware all-to-all that expert parallelism dispatches tokens with.

The all-to-alls take uneven splits along dim 0; the backward of each is the reverse all-to-all.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def init_distributed(backend: str | None = None, timeout_s: float = 300.0) -> dist.ProcessGroup:
    """init_process_group from torchrun's environment, with a timeout.

    A rank that dies makes the others' next collective fail (gloo: connection closed; NCCL: the
    watchdog aborts the communicator); a rank that hangs makes them fail once `timeout_s` has passed
    with no progress, instead of waiting forever. Backend: NCCL when CUDA is available, else gloo.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    world = dist.group.WORLD
    assert world is not None  # set by init_process_group
    return world


def end_process_groups() -> None:
    """After a process's last collective, on every rank: a barrier (no rank tears a group down while another
    still talks in it), then destroy_process_group once what was built on the groups is gone. A group and gloo's
    worker threads end only with the last reference to it (a DeviceMesh, a DTensor, an FSDP module: the caller
    drops them first; gc collects the cycles FSDP's hooks make). Groups that outlive the interpreter can abort
    it at exit: a worker that drops the last reference to a collective's tensor during interpreter shutdown needs
    the GIL, which ends the thread, and the C++ runtime aborts ("terminate called without an active exception")."""
    dist.barrier()
    _clear_dtensor_caches()
    gc.collect()
    dist.destroy_process_group()


def _clear_dtensor_caches() -> None:
    """torch.distributed's caches (DTensor's sharding propagation, in Python and in its native dispatch,
    redistribution plans, mesh topologies) keep every DeviceMesh they have seen, and with it its process groups:
    cleared, they no longer keep the groups (and gloo's threads) alive past their end."""
    for obj in gc.get_objects():
        if isinstance(obj, functools._lru_cache_wrapper) and \
                getattr(obj, "__module__", "").startswith("torch.distributed"):
            obj.cache_clear()
    if hasattr(torch._C, "_clear_DTensor_sharding_propagator_cache"):  # DTensor's native dispatch keeps one too
        torch._C._clear_DTensor_sharding_propagator_cache()


class _Pending:
    """The work handle of an asynchronous all-to-all, passed from its start to its wait."""

    work: Any = None  # dist.Work while the all-to-all runs
    send: torch.Tensor | None  # its send buffer, kept alive until the wait


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None,
                async_op: bool = False) -> tuple[torch.Tensor, Any]:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=async_op)
    return out, work


class _AllToAllStart(torch.autograd.Function):
    """Starts an all-to-all with uneven splits; the output is valid only after _AllToAllWait.

    Backward: the reverse all-to-all of the gradient (splits swapped), synchronous.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup | None, pending: _Pending) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out, pending.work = _all_to_all(x, out_splits, in_splits, group, async_op=True)
        pending.send = x  # keep the send buffer alive until the wait
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        g_in, _ = _all_to_all(g, ctx.in_splits, ctx.out_splits, ctx.group)
        return g_in, None, None, None, None


class _AllToAllWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, pending: _Pending) -> torch.Tensor:
        pending.work.wait()
        pending.work = pending.send = None
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Autograd-aware all_to_all_single with uneven splits along dim 0 (backward: the reverse all-to-all)."""
    pending = _Pending()
    # torch's Function.apply is an untyped def (hence the ignores here): it returns forward's result, a tensor
    y: torch.Tensor = _AllToAllWait.apply(_AllToAllStart.apply(x, out_splits, in_splits, group, pending), pending)  # type: ignore[no-untyped-call]
    return y


def all_to_all_async(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                     group: dist.ProcessGroup | None = None) -> Callable[[], torch.Tensor]:
    """Start an autograd-aware all-to-all; returns a function that waits and gives the result."""
    pending = _Pending()
    # Function.apply: untyped in torch, as in all_to_all
    out: torch.Tensor = _AllToAllStart.apply(x, out_splits, in_splits, group, pending)  # type: ignore[no-untyped-call]
    return lambda: _AllToAllWait.apply(out, pending)  # type: ignore[no-untyped-call]
