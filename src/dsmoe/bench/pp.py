"""Pipeline parallelism on CPU processes: step time, per-rank peak memory and the measured bubble of each schedule.

For each pp (1: one process, the baseline), schedule and micro-batch count, pp fresh processes (gloo, one thread
each) build the preset's model, split it into stages (dsmoe.parallel.pipeline.PipelineContext) and time whole
training steps (the schedule's forwards and backwards, clipping, AdamW, the bias update) on the same global
batch. Reported: the median step time (the slowest rank's), each rank's peak RSS (the largest), and the
bubble: the share of a step each rank spends waiting for its peers in the schedule's sends and receives (the
mean over ranks), beside the planner's (dsmoe.memory.bubble: (pp - 1) / M of the compute for GPipe and 1F1B).
More processes than cores time-slice: their step times then measure the machine, not the schedule.
"""

from __future__ import annotations

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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
    warmup: int = 2            # untimed steps first


HEADER = (f"{'pp':>3} {'schedule':>8} {'M':>3} {'step ms':>8} {'vs pp 1':>7} {'peak RSS MiB':>12} "
          f"{'bubble':>7} {'planner':>7}")


def format_row(r: dict, base_ms: float) -> str:
    schedule = r["schedule"] if r["pp"] > 1 else "-"
    bubble = f"{r['bubble']:>7.2f}" if r["pp"] > 1 else f"{'-':>7}"
    planner = f"{r['planner_bubble']:>7.2f}" if r["pp"] > 1 else f"{'-':>7}"
    return (f"{r['pp']:>3} {schedule:>8} {r['microbatches']:>3} {r['step_ms']:>8.1f} {r['step_ms'] / base_ms:>7.2f} "
            f"{r['peak_rss_mb']:>12.0f} {bubble} {planner}")


def _slowest(seconds: float) -> float:
    t = torch.tensor(seconds)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _run(rank: int, world: int, s: PipelineSettings, schedule: str, microbatches: int) -> dict:
    from torch.distributed.pipelining import schedules

    from dsmoe.model import MoETransformer
    from dsmoe.parallel.context import Context, SingleProcess
    from dsmoe.parallel.pipeline import PipelineContext
    from dsmoe.presets import build_configs
    from dsmoe.train import build_optimizer

    model_cfg, train_cfg = build_configs(s.preset, ["vocab_size=260", f"n_layers={s.layers}"])
    torch.manual_seed(0)
    model = MoETransformer(model_cfg)
    ctx: Context = PipelineContext(world, 1, 1, schedule, microbatches) if world > 1 else SingleProcess()
    model = ctx.shard(model)
    optimizer = build_optimizer(model, train_cfg)
    waited = [0.0]
    real_wait = schedules._wait_batch_p2p

    def wait(work: list) -> None:  # the schedule blocked on a peer: the bubble (and the transfers)
        t0 = time.perf_counter()
        real_wait(work)
        waited[0] += time.perf_counter() - t0

    schedules._wait_batch_p2p = wait
    try:
        times, bubbles = _steps(world, s, ctx, model, optimizer, model_cfg.vocab_size, waited)
    finally:
        schedules._wait_batch_p2p = real_wait
    return {"step_ms": 1e3 * statistics.median(times), "bubble": statistics.median(bubbles),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}


def _steps(world: int, s: PipelineSettings, ctx: Any, model: Any, optimizer: torch.optim.Optimizer, vocab: int,
           waited: list[float]) -> tuple[list[float], list[float]]:
    """Time the training steps: the slowest rank's seconds and this rank's share of them blocked on peers."""
    gen = torch.Generator().manual_seed(1)
    times, bubbles = [], []
    for step in range(s.warmup + s.repeats):
        idx = torch.randint(0, vocab, (s.batch_size, s.seq_len + 1), generator=gen)
        x, y = ctx.local_batch(idx[:, :-1], idx[:, 1:])
        dist.barrier() if world > 1 else None
        waited[0] = 0.0
        t0 = time.perf_counter()
        ctx.forward_backward(model, x, y, None, 1.0, 1.0, nullcontext)
        ctx.reduce_grads(model)
        ctx.clip_grad_norm_(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_biases(ctx.all_reduce_layers_)
        own = time.perf_counter() - t0
        seconds = _slowest(own) if world > 1 else own
        if step >= s.warmup:
            times.append(seconds)
            bubbles.append(waited[0] / own)
    return times, bubbles


def _worker(rank: int, world: int, port: int, s: PipelineSettings, schedule: str, microbatches: int,
            out_path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    row = _run(rank, world, s, schedule, microbatches)
    rows: list = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    end_process_groups()


def measure_one(s: PipelineSettings, pp: int, schedule: str, microbatches: int) -> dict:
    """One configuration: the slowest rank's median step, the largest peak RSS, the ranks' mean bubble."""
    from dsmoe.memory import bubble

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(pp, free_port(), s, schedule, microbatches, out), nprocs=pp, join=True)
        rows = json.loads(Path(out).read_text())
    return {"pp": pp, "schedule": schedule, "microbatches": microbatches,
            "step_ms": max(r["step_ms"] for r in rows), "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "bubble": statistics.mean(r["bubble"] for r in rows),
            "planner_bubble": bubble(schedule, pp, microbatches) if pp > 1 else 0.0}


def check(s: PipelineSettings, pps: list[int], microbatches: list[int]) -> None:
    for pp in pps:
        if pp < 1 or pp > s.layers:
            raise ValueError(f"--pp {pp} must be between 1 and --layers {s.layers} (a block or more per stage)")
        for M in microbatches:
            if s.batch_size % M:
                raise ValueError(f"--batch-size {s.batch_size} must be divisible by --microbatches {M}")
