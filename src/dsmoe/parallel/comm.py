"""Process groups and the autograd-aware all-to-all that expert parallelism dispatches tokens with.

The all-to-alls take uneven splits along dim 0; the backward of each is the reverse all-to-all.
"""

from __future__ import annotations

import os
from datetime import timedelta

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


class _Pending:
    """The work handle of an asynchronous all-to-all, passed from its start to its wait."""

    work = None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, async_op=False):
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=async_op)
    return out, work


class _AllToAllStart(torch.autograd.Function):
    """Starts an all-to-all with uneven splits; the output is valid only after _AllToAllWait.

    Backward: the reverse all-to-all of the gradient (splits swapped), synchronous.
    """

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, pending):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out, pending.work = _all_to_all(x, out_splits, in_splits, group, async_op=True)
        pending.send = x  # keep the send buffer alive until the wait
        return out

    @staticmethod
    def backward(ctx, g):
        g_in, _ = _all_to_all(g, ctx.in_splits, ctx.out_splits, ctx.group)
        return g_in, None, None, None, None


class _AllToAllWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, pending):
        pending.work.wait()
        pending.work = pending.send = None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        return g, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Autograd-aware all_to_all_single with uneven splits along dim 0 (backward: the reverse all-to-all)."""
    pending = _Pending()
    return _AllToAllWait.apply(_AllToAllStart.apply(x, out_splits, in_splits, group, pending), pending)


def all_to_all_async(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None):
    """Start an autograd-aware all-to-all; returns a function that waits and gives the result."""
    pending = _Pending()
    out = _AllToAllStart.apply(x, out_splits, in_splits, group, pending)
    return lambda: _AllToAllWait.apply(out, pending)
