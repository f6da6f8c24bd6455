"""`dsmoe inspect DIR`: expert load, MaxVio_global, dead experts, token-kind specialization and the redundancy
test of a HuggingFace DeepSeek-V2/V3 folder or a dsmoe checkpoint / run directory, as a markdown report with
PNGs (dsmoe.inspection)."""

from __future__ import annotations

import argparse

from dsmoe.cli.format import check_at_least
from dsmoe.inspection import compare, inspect


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="DIR",
                   help="HuggingFace DeepSeek-V2/V3 folder, or dsmoe checkpoint / run directory; two of them: their "
                        "routing side by side (OUT/compare.md)")
    p.add_argument("--data", metavar="PATH",
                   help="a prepared folder, a text file or folder, or a mixture a=0.7,b=0.3 (default: a dsmoe "
                        "run's corpus; the Python standard library for HF; two models: the first one's)")
    p.add_argument("--out", metavar="OUT",
                   help="report folder (default: DIR/inspect for a run directory, else runs/inspect-<name>; two "
                        "models: runs/compare-<A>-vs-<B>)")
    p.add_argument("--batches", type=int, default=16, help="batches of the corpus pass")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per batch (default: a run's training batch; 8 for HF folders)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per window (default: a run's training length; 256 for HF folders)")
    p.add_argument("--redundancy-batches", type=int, default=None,
                   help="batches per redundancy evaluation (default: --batches; 0 skips the test)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    check_at_least(args, 1, "batches", "batch_size", "seq_len")
    check_at_least(args, 0, "redundancy_batches")
    kwargs = dict(batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len, device=args.device,
                  redundancy_batches=args.redundancy_batches, progress=not args.quiet)
    if len(args.paths) > 2:
        raise ValueError(f"give one model to inspect or two to compare, not {len(args.paths)}")
    if len(args.paths) == 1:
        _summary(inspect(args.paths[0], args.data, args.out, **kwargs))
        return 0
    compared = compare(args.paths, args.data, args.out, **kwargs)
    for r in compared["results"]:
        _summary(r)
    print(f"comparison: {compared['report']}")
    return 0


def _summary(r: dict) -> None:
    mv = r["maxvio_global"]
    print(f"{r['name']} ({r['source']}): {r['tokens']:,} tokens of {r['corpus']}, loss {r['loss']:.4f}, "
          f"perplexity {r['ppl']:.2f}")
    print(f"MaxVio_global: mean {r['mean_maxvio_global']:.3f} over {len(mv)} MoE layers "
          f"(min {min(mv):.3f}, max {max(mv):.3f})")
    dead = [f"block {b}: {', '.join(map(str, d))}" for b, d in zip(r["blocks"], r["dead_experts"]) if d]
    print(f"dead experts: {r['n_dead_experts']}" + (f" ({'; '.join(dead)})" if dead else ""))
    if r["redundancy"]:
        rises = ", ".join(f"top-{x['disabled']} {x['rise']:+.3f}" for x in r["redundancy"][1:])
        print(f"redundancy test (loss rise with each token's top-n experts disabled): {rises or '-'}")
    print(f"report: {r['report']}")
