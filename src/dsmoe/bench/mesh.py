"""Training on the (dp, ep) mesh at 4 CPU processes, and its checkpoints against the gathered format.

Layouts (dsmoe.parallel.MeshContext): dp 4 (plain data parallel, FSDP2 over 4), dp 2 x ep 2 and ep 4 (the
routed experts split over ep, FSDP2 over dp; everything else FSDP2 over all 4). For each, 4 fresh processes
(gloo, one thread each) build the preset's model, lay it out and time whole training steps (forward, backward,
clipping, AdamW, the bias all-reduce) on a global batch split over the ranks. Reported: the median step time
(the slowest rank's), each rank's parameter + gradient + AdamW bytes (from its shards) and its peak RSS.

Checkpoints at ep 4, both formats on the same model and optimizer state:
    gathered  expert parallelism alone, every expert and moment all-gathered onto every rank, rank 0 writes
              one file; loading reads the whole file on every rank and cuts out its experts
    dcp       FSDP2 + expert parallelism, each rank writes its own shards (checkpoint.save_sharded) and reads
              back only its pieces (checkpoint.load_sharded)
Reported: save and load time (the slowest rank's) and how far each rank's peak RSS rose during them.
Every layout and format runs in its own processes, so each peak RSS is its own.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsmoe.bench.ep import free_port
from dsmoe.parallel.comm import end_process_groups

LAYOUTS = {"dp 4": (4, 1), "dp 2 x ep 2": (2, 2), "ep 4": (1, 4)}
WORLD = 4


@dataclass(frozen=True)
class MeshSettings:
    """The model trained on the mesh and the timing (plain values: they travel to the spawned ranks)."""

    preset: str = "tiny"
    batch_size: int = 16      # the global batch
    seq_len: int = 64
    repeats: int = 10         # timed steps per layout
    warmup: int = 2           # untimed steps first


def format_report(layouts: list[dict], formats: list[dict], s: MeshSettings) -> str:
    """The layouts' table, what expert parallelism alone holds, and the checkpoint formats' table."""
    base, (gathered, dcp) = layouts[0], formats
    lines = [f"{s.preset} model on a (dp, ep) mesh of {WORLD} processes: global batch {s.batch_size} x {s.seq_len} "
             f"tokens, whole training steps, median of {s.repeats}; per rank: the largest over ranks",
             f"{'layout':>12} {'step ms':>8} {'vs dp 4':>7} {'params+grads+AdamW MiB':>22} {'vs dp 4':>7} "
             f"{'peak RSS MiB':>12}"]
    lines += [f"{r['layout']:>12} {r['step_ms']:>8.1f} {r['step_ms'] / base['step_ms']:>7.2f} "
              f"{r['state_mb']:>22.1f} {r['state_mb'] / base['state_mb']:>7.2f} {r['peak_rss_mb']:>12.0f}"
              for r in layouts]
    lines += [f"expert parallelism alone at ep {WORLD} (the other weights replicated on every rank): "
              f"{gathered['state_mb']:.1f} MiB of params+grads+AdamW per rank, "
              f"{gathered['state_mb'] / base['state_mb']:.2f}x the mesh layouts'", "",
              f"checkpoint of the {s.preset} model + AdamW state at ep {WORLD}: gathered onto every rank "
              "(expert parallelism alone) vs DCP shards (FSDP2 + expert parallelism)",
              f"{'format':>9} {'save s':>7} {'load s':>7} {'RSS rise in save MiB':>20} {'in load MiB':>11}"]
    lines += [f"{r['format']:>9} {r['save_s']:>7.2f} {r['load_s']:>7.2f} {r['save_rss_mb']:>20.0f} "
              f"{r['load_rss_mb']:>11.0f}" for r in formats]
    lines.append(f"dcp / gathered: save time {dcp['save_s'] / gathered['save_s']:.2f}x, load time "
                 f"{dcp['load_s'] / gathered['load_s']:.2f}x")
    return "\n".join(lines)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _state_mb(model) -> float:
    """This rank's parameters, gradients and AdamW's two moments, in MiB (4 copies of its pieces)."""
    from dsmoe.parallel.fsdp import local

    return 4 * sum(local(p).numel() * local(p).element_size() for p in model.parameters()) / 2**20


def _slowest(seconds: float) -> float:
    t = torch.tensor(seconds)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _model(args: MeshSettings):
    from dsmoe.model import MoETransformer
    from dsmoe.presets import build_configs

    model_cfg, train_cfg = build_configs(args.preset, ["vocab_size=260"])
    torch.manual_seed(0)  # the same full model on every rank before it is laid out
    return MoETransformer(model_cfg), model_cfg, train_cfg


def _train_layout(rank: int, args: MeshSettings, dp: int, ep: int) -> dict:
    from dsmoe.parallel import MeshContext
    from dsmoe.train import build_optimizer

    model, model_cfg, train_cfg = _model(args)
    ctx = MeshContext(dp, ep)
    model = ctx.shard(model)
    optimizer = build_optimizer(model, train_cfg)
    S = args.seq_len
    gen = torch.Generator().manual_seed(1)
    times = []
    for step in range(args.warmup + args.repeats):
        idx = torch.randint(0, model_cfg.vocab_size, (args.batch_size, S + 1), generator=gen)
        x, y = ctx.local_batch(idx[:, :-1], idx[:, 1:])
        dist.barrier()
        t0 = time.perf_counter()
        _, loss = model(x, y)
        (loss + model.aux_loss()).backward()
        ctx.reduce_grads(model)
        ctx.clip_grad_norm_(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_biases(ctx.all_reduce_)
        seconds = _slowest(time.perf_counter() - t0)
        if step >= args.warmup:
            times.append(seconds)
    return {"step_ms": 1e3 * statistics.median(times), "state_mb": _state_mb(model),
            "peak_rss_mb": _peak_rss() / 2**20}


def _checkpoint_format(rank: int, args: MeshSettings, fmt: str, folder: Path) -> dict:
    from safetensors.torch import load_file, save_file

    from dsmoe import checkpoint
    from dsmoe.parallel import (
        MeshContext,
        apply_expert_parallel,
        full_optimizer_state_dict,
        full_state_dict,
        init_optimizer_state,
        load_full_state_dict,
        shard_optimizer_state,
        training_tensors,
    )
    from dsmoe.train import build_optimizer

    model, _, train_cfg = _model(args)
    ctx = MeshContext(1, WORLD) if fmt == "dcp" else None
    model = ctx.shard(model) if ctx else apply_expert_parallel(model)
    optimizer = build_optimizer(model, train_cfg)
    init_optimizer_state(optimizer)
    before = _peak_rss()
    dist.barrier()
    t0 = time.perf_counter()
    if ctx:
        checkpoint.save_sharded(folder, training_tensors(model, optimizer, ctx.mesh), {}, {})
    else:
        weights, moments = full_state_dict(model), full_optimizer_state_dict(model, optimizer)
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in weights.items() if k != "head.weight"},
                      str(folder / "model.safetensors"))
            torch.save(moments, folder / "optimizer.pt")
        del weights, moments
    dist.barrier()
    save_s = _slowest(time.perf_counter() - t0)
    after_save = _peak_rss()
    t0 = time.perf_counter()
    if ctx:
        checkpoint.load_sharded(folder, training_tensors(model, optimizer, ctx.mesh))
    else:
        weights = load_file(str(folder / "model.safetensors"))
        weights["head.weight"] = weights["embed.weight"]
        load_full_state_dict(model, weights)
        full = torch.load(folder / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(shard_optimizer_state(model, optimizer, full))
    load_s = _slowest(time.perf_counter() - t0)
    return {"save_s": save_s, "load_s": load_s, "save_rss_mb": (after_save - before) / 2**20,
            "load_rss_mb": (_peak_rss() - after_save) / 2**20, "state_mb": _state_mb(model)}


def _worker(rank: int, world: int, port: int, args: MeshSettings, job: tuple, out_path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    kind, name = job
    if kind == "layout":
        row = _train_layout(rank, args, *LAYOUTS[name])
    else:
        row = _checkpoint_format(rank, args, name, Path(out_path).parent / "ckpt")
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    end_process_groups()  # the models and meshes were local to the job: gone


def _spawn(args: MeshSettings, job: tuple) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(WORLD, free_port(), args, job, out), nprocs=WORLD, join=True)
        return json.loads(Path(out).read_text())


def measure(args: MeshSettings) -> tuple[list[dict], list[dict]]:
    """(one row per layout, one row per checkpoint format): per-rank numbers as the max over the ranks."""
    if args.batch_size % WORLD:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {WORLD} processes")
    layouts, formats = [], []
    for name in LAYOUTS:
        per_rank = _spawn(args, ("layout", name))
        layouts.append({"layout": name, **{k: max(r[k] for r in per_rank) for k in per_rank[0]}})
    for fmt in ("gathered", "dcp"):
        per_rank = _spawn(args, ("checkpoint", fmt))
        formats.append({"format": fmt, **{k: max(r[k] for r in per_rank) for k in per_rank[0]}})
    return layouts, formats
