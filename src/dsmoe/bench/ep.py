"""Expert parallelism: step time and all-to-all volume with device limit M = 1, 2 and unlimited.

For each world size (default 2 and 4) this starts that many CPU processes (torch.multiprocessing, gloo,
one thread each), builds the same MoE layer on every rank, shards its experts with
`apply_expert_parallel` and times training steps (forward + backward) of T tokens per rank. The layer
is configured three ways on the same weights and tokens:

    M=1, M=2    n_groups = world (an expert group is a rank), topk_groups = M: each token reaches <= M ranks
    unlimited   n_groups = 1: a token goes wherever its top-K experts are

Reported per configuration: the median step time (the slowest rank's, after a barrier), the tokens
each rank sends (one per (token, rank) pair, to itself included), the bytes it sends to other ranks in
the forward all-to-alls (the backward moves the same again), the most ranks one token reached, and the
ratios to unlimited. The configurations are interleaved inside each repeat, so load from other
processes hits all of them alike. On one machine gloo's all-to-all is a memory copy through loopback
TCP: the volume is the number to carry to a real cluster; the times say little about a network.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsmoe.config import MoEConfig
from dsmoe.moe import MoE
from dsmoe.parallel import apply_expert_parallel, comm_stats
from dsmoe.parallel.comm import end_process_groups


@dataclass(frozen=True)
class LayerSettings:
    """The layer and the timing of the all-to-all part (plain values: they travel to the spawned ranks)."""

    tokens: int = 256         # tokens per rank per step
    dim: int = 128            # D
    expert_dim: int = 64      # F
    experts: int = 16         # E routed experts (one shared besides)
    top_k: int = 4            # K
    score_func: str = "sigmoid"
    repeats: int = 10         # timed steps per configuration
    warmup: int = 2           # untimed steps first


HEADER = (f"{'world':>5} {'limit':>9} {'step ms':>8} {'vs unl.':>7} {'tokens sent':>11} {'a2a KB':>8} "
          f"{'vs unl.':>7} {'max ranks/token':>15}")
FOOTER = "tokens sent and a2a KB are per rank per forward (a2a: to other ranks; backward sends as much again)"


def describe(s: LayerSettings) -> str:
    return (f"MoE layer: T={s.tokens} tokens/rank, D={s.dim}, E={s.experts}, K={s.top_k}, F={s.expert_dim}, 1 shared, "
            f"{s.score_func}; fp32, gloo on CPU, fwd+bwd, median of {s.repeats}")


def format_row(r: dict) -> str:
    return (f"{r['world']:>5} {r['limit']:>9} {r['step_ms']:>8.2f} {r['step_vs_unlimited']:>7.2f} "
            f"{r['tokens_sent_per_rank']:>11.0f} {r['a2a_kb_per_rank']:>8.1f} {r['volume_vs_unlimited']:>7.2f} "
            f"{r['max_ranks_per_token']:>15}")


def _limits(world: int) -> list[int | None]:
    """Device limits to compare: 1, 2 (when below the world size), None = unlimited."""
    return [m for m in (1, 2) if m < world] + [None]


def _layer_cfg(args: LayerSettings, world: int, limit: int | None) -> MoEConfig:
    n_groups, topk_groups = (1, 1) if limit is None else (world, limit)
    return MoEConfig(dim=args.dim, expert_dim=args.expert_dim, n_routed_experts=args.experts, n_shared_experts=1,
                     top_k=args.top_k, score_func=args.score_func, check_inputs=False, n_groups=n_groups,
                     topk_groups=topk_groups)


def _worker(rank: int, world: int, port: int, args: LayerSettings, out_path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    rows = _rows(rank, world, args)  # the layers (and with them the groups' users) are gone on return
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    end_process_groups()


def _rows(rank: int, world: int, args: LayerSettings) -> list[dict]:
    layers = {}
    for limit in _limits(world):
        torch.manual_seed(0)  # the same weights in every configuration and on every rank
        layers[limit] = apply_expert_parallel(MoE(_layer_cfg(args, world, limit)))
    x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(1 + rank))
    g = torch.randn_like(x)
    times: dict[int | None, list[float]] = {limit: [] for limit in layers}
    for step in range(args.warmup + args.repeats):
        order = list(layers)[step % len(layers):] + list(layers)[:step % len(layers)]
        for limit in order:
            layer = layers[limit]
            dist.barrier()
            t0 = time.perf_counter()
            (layer(x) * g).sum().backward()
            dist.barrier()  # the step ends when the slowest rank is done
            if step >= args.warmup:
                times[limit].append(time.perf_counter() - t0)
            layer.zero_grad(set_to_none=True)
    rows = []
    for limit, layer in layers.items():
        s = comm_stats(layer)
        local = torch.tensor([s["tokens_sent"], s["a2a_bytes"], s["max_ranks_per_token"]], dtype=torch.float64)
        total, peak = local.clone(), local.clone()
        dist.all_reduce(total)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        rows.append({"world": world, "limit": "unlimited" if limit is None else f"M={limit}",
                     "step_ms": 1e3 * statistics.median(times[limit]),
                     "tokens_sent_per_rank": total[0].item() / world, "a2a_kb_per_rank": total[1].item() / world / 1e3,
                     "max_ranks_per_token": int(peak[2].item())})
    return rows


def free_port() -> int:
    """A TCP port nobody listens on now, for the spawned ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: LayerSettings, world: int) -> list[dict]:
    """One row per device limit at `world` processes (spawned here), with the ratios to unlimited routing."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(world, free_port(), args, out), nprocs=world, join=True)
        with open(out) as f:
            rows = json.load(f)
    base = next(r for r in rows if r["limit"] == "unlimited")
    for r in rows:
        r["step_vs_unlimited"] = r["step_ms"] / base["step_ms"]
        r["volume_vs_unlimited"] = (r["a2a_kb_per_rank"] / base["a2a_kb_per_rank"] if base["a2a_kb_per_rank"]
                                    else float("nan"))
    return rows


def check(args: LayerSettings, worlds: list[int]) -> None:
    for w in worlds:
        if w < 2:
            raise ValueError(f"--worlds {w} is invalid: expert parallelism needs at least 2 processes")
        if args.experts % w:
            raise ValueError(f"--experts {args.experts} must be divisible by every world size, not by {w}")
        if args.top_k > args.experts // w:
            raise ValueError(f"--top-k {args.top_k} must be <= experts per rank {args.experts // w} at world {w}, "
                             "so that a device limit of 1 can hold it")
