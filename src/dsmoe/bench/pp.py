"""Pipeline parallelism on CPU processes: step time, per-rank memory and the measured bubble of each schedule.

For each pp (1: one process, the baseline), schedule and micro-batch count, pp x dp x ep fresh processes (gloo,
one thread each) build the preset's model, split it into stages (dsmoe.parallel.pipeline.PipelineContext) and
run whole training steps (the schedule's forwards and backwards, clipping, AdamW, the bias update) on the same
global batch. Reported: the median step time (the slowest rank's), the bubble: the share of a step each rank
spends waiting for its peers in the schedule's sends and receives (the mean over ranks), beside the planner's
(dsmoe.memory.bubble: (pp - 1) / M of the compute for GPipe and 1F1B), each rank's peak RSS (the largest), and
each rank's peak allocated memory beside the planner's figure for it (dsmoe.memory.layout_plan).

The allocated memory is the nearest CPU measure to torch.cuda.max_memory_allocated: the bytes malloc has handed
out and not taken back (glibc's mallinfo2: tensors, and the little else the process allocates meanwhile), sampled
after every op of the first two steps (the second is the first with AdamW's moments; an op's own workspace, freed
before it returns, is not seen), less what the process held before it built the model. Left out as a GPU's
context is: the modules the first forward imports, imported before, and MKL's cache of freed buffers, switched
off in the ranks (MKL_DISABLE_FAST_MM). The peak RSS is higher: glibc keeps freed heap memory. More processes
than cores time-slice: their step times then measure the machine, not the schedule.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from dsmoe.bench.ep import free_port
from dsmoe.parallel.comm import end_process_groups


@dataclass(frozen=True)
class PipelineSettings:
    """The model and the timing (plain values: they travel to the spawned ranks)."""

    preset: str = "tiny"
    layers: int = 4            # blocks (each stage needs one)
    batch_size: int = 16       # the global batch
    seq_len: int = 64
    repeats: int = 6           # timed steps per configuration
    warmup: int = 2            # untimed steps first (after the MEMORY_STEPS)
    dp: int = 1                # data-parallel ranks of each stage (pp > 1)
    ep: int = 1                # expert-parallel ranks of each stage (pp > 1)


MEMORY_STEPS = 2  # the first steps, where the allocated memory is sampled: AdamW's moments exist from the second


HEADER = (f"{'pp':>3} {'schedule':>8} {'M':>3} {'step ms':>8} {'vs pp 1':>7} {'bubble':>7} {'planner':>7} "
          f"{'peak RSS MiB':>12}  allocated MiB per rank / planner's")


def format_row(r: dict, base_ms: float) -> str:
    schedule = r["schedule"] if r["pp"] > 1 else "-"
    bubble = f"{r['bubble']:>7.2f}" if r["pp"] > 1 else f"{'-':>7}"
    planner = f"{r['planner_bubble']:>7.2f}" if r["pp"] > 1 else f"{'-':>7}"
    memory = " ".join(f"{a:.0f}/{p:.0f}" for a, p in zip(r["allocated_mb"], r["planner_mb"])) \
        if r["allocated_mb"] else "-"
    return (f"{r['pp']:>3} {schedule:>8} {r['microbatches']:>3} {r['step_ms']:>8.1f} {r['step_ms'] / base_ms:>7.2f} "
            f"{bubble} {planner} {r['peak_rss_mb']:>12.0f}  {memory}")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> Any:
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        return None
    f.restype = _MallInfo2
    return f


_MALLINFO2 = _mallinfo2()


def allocated() -> int | None:
    """Bytes malloc has handed out and not taken back, every arena (small chunks in use and mmapped ones); None
    where the C library is not glibc 2.33 or later."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class PeakAllocated(TorchDispatchMode):
    """The most bytes `allocated()` after any op run under it, forward, backward and optimizer alike."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, allocated() or 0)
        return out


def _slowest(seconds: float) -> float:
    t = torch.tensor(seconds)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _run(rank: int, world: int, s: PipelineSettings, pp: int, schedule: str, microbatches: int) -> dict:
    from torch.distributed.pipelining import schedules

    from dsmoe.model import MoETransformer
    from dsmoe.parallel.context import Context, SingleProcess
    from dsmoe.parallel.pipeline import PipelineContext
    from dsmoe.presets import build_configs
    from dsmoe.train import build_optimizer

    model_cfg, train_cfg = build_configs(s.preset, ["vocab_size=260", f"n_layers={s.layers}"])
    torch.manual_seed(0)
    ctx: Context = PipelineContext(pp, s.dp, s.ep, schedule, microbatches) if world > 1 else SingleProcess()
    importlib.import_module("torch._dynamo")  # what the first forward imports (torch.compiler.is_compiling)
    before = allocated()
    model = ctx.shard(MoETransformer(model_cfg))
    optimizer = build_optimizer(model, train_cfg)
    waited = [0.0]
    real_wait = schedules._wait_batch_p2p

    def wait(work: list) -> None:  # the schedule blocked on a peer: the bubble (and the transfers)
        t0 = time.perf_counter()
        real_wait(work)
        waited[0] += time.perf_counter() - t0

    schedules._wait_batch_p2p = wait
    peak = PeakAllocated()
    try:
        times, bubbles = _steps(world, s, ctx, model, optimizer, model_cfg.vocab_size, waited, peak)
    finally:
        schedules._wait_batch_p2p = real_wait
    return {"step_ms": 1e3 * statistics.median(times), "bubble": statistics.median(bubbles),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
            "allocated_mb": (peak.peak - before) / 2**20 if before is not None else None}


def _steps(world: int, s: PipelineSettings, ctx: Any, model: Any, optimizer: torch.optim.Optimizer, vocab: int,
           waited: list[float], peak: PeakAllocated) -> tuple[list[float], list[float]]:
    """Two steps under `peak`, then time the others: the slowest rank's seconds and this rank's share of them
    blocked on peers."""
    gen = torch.Generator().manual_seed(1)
    times, bubbles = [], []
    first = MEMORY_STEPS + s.warmup
    for step in range(first + s.repeats):
        idx = torch.randint(0, vocab, (s.batch_size, s.seq_len + 1), generator=gen)
        x, y = ctx.local_batch(idx[:, :-1], idx[:, 1:])
        dist.barrier() if world > 1 else None
        waited[0] = 0.0
        t0 = time.perf_counter()
        with peak if step < MEMORY_STEPS else nullcontext():
            ctx.forward_backward(model, x, y, None, 1.0, 1.0, nullcontext)
            ctx.reduce_grads(model)
            ctx.clip_grad_norm_(model, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_biases(ctx.all_reduce_layers_)
        own = time.perf_counter() - t0
        seconds = _slowest(own) if world > 1 else own
        if step >= first:
            times.append(seconds)
            bubbles.append(waited[0] / own)
    return times, bubbles


def _worker(rank: int, world: int, port: int, s: PipelineSettings, pp: int, schedule: str, microbatches: int,
            out_path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    row = _run(rank, world, s, pp, schedule, microbatches)
    rows: list = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    end_process_groups()


def measure_one(s: PipelineSettings, pp: int, schedule: str, microbatches: int) -> dict:
    """One configuration (pp x s.dp x s.ep processes; one for pp 1): the slowest rank's median step, the largest
    peak RSS, the ranks' mean bubble, each rank's allocated peak and the planner's figure for it."""
    from dsmoe.memory import bubble, layout_plan
    from dsmoe.presets import build_configs

    dp, ep = (s.dp, s.ep) if pp > 1 else (1, 1)
    world = pp * dp * ep
    if pp > 1:  # the layouts a pipelined run refuses (zb and dualpipev with data or expert ranks among them)
        from dsmoe.parallel.pipeline import check_layout
        check_layout(world, pp, ep, schedule, microbatches, s.batch_size)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, MKL_DISABLE_FAST_MM="1"):
        out = os.path.join(tmp, "rows.json")  # the ranks inherit MKL_DISABLE_FAST_MM: MKL reads it as it loads
        mp.spawn(_worker, args=(world, free_port(), s, pp, schedule, microbatches, out), nprocs=world, join=True)
        rows = json.loads(Path(out).read_text())
    model_cfg, train_cfg = build_configs(s.preset, ["vocab_size=260", f"n_layers={s.layers}", "device=cpu",
                                                    f"batch_size={s.batch_size}", f"seq_len={s.seq_len}"])
    plan = layout_plan(model_cfg, train_cfg, pp, dp, ep, schedule, microbatches)
    measured = [r["allocated_mb"] for r in rows]
    return {"pp": pp, "dp": dp, "ep": ep, "schedule": schedule, "microbatches": microbatches,
            "step_ms": max(r["step_ms"] for r in rows), "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "bubble": statistics.mean(r["bubble"] for r in rows),
            "planner_bubble": bubble(schedule, pp, microbatches) if pp > 1 else 0.0,
            "allocated_mb": measured if None not in measured else [],
            "planner_mb": [plan.ranks[rank // (dp * ep)].total / 2**20 for rank in range(world)]}


def check(s: PipelineSettings, pps: list[int], microbatches: list[int]) -> None:
    for pp in pps:
        if pp < 1 or pp > s.layers:
            raise ValueError(f"--pp {pp} must be between 1 and --layers {s.layers} (a block or more per stage)")
        ranks = s.dp * s.ep if pp > 1 else 1
        for M in microbatches:
            if s.batch_size % (ranks * M):
                raise ValueError(f"--batch-size {s.batch_size} must be divisible by --microbatches {M}"
                                 + (f" x the {ranks} ranks of a stage (--dp x --ep)" if ranks > 1 else ""))
