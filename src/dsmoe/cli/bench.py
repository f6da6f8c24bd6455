"""`dsmoe bench {layer,train,ep,model,pp}`: the benchmarks' command lines (the measurements are in dsmoe.bench)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from dsmoe.bench import ep, layer, mesh, model, pp, train
from dsmoe.cli.format import HelpFormatter, check_at_least
from dsmoe.config import MoEConfig
from dsmoe.memory import SPLIT_BACKWARD, check_step_memory, chunks_per_rank
from dsmoe.moe import MoE
from dsmoe.plots import plot_layer_sweep
from dsmoe.presets import PRESETS, build_configs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (module, add, run_) in BENCHMARKS.items():
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                           description=(module.__doc__ or "").strip(),
                           formatter_class=HelpFormatter)
        p.set_defaults(_bench=run_)
        add(p)


def run(args: argparse.Namespace) -> int:
    return args._bench(args)


def _layer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dim", type=int, default=512, help="D, model dim")
    p.add_argument("--experts", type=int, default=64, help="E, routed experts")
    p.add_argument("--expert-dim", type=int, default=256, help="F, hidden width of each expert")
    p.add_argument("--shared", type=int, default=2, help="N_s, shared experts")
    p.add_argument("--top-k", type=int, default=6, help="K, routed experts per token")
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens in the batch")
    p.add_argument("--dtype", choices=list(layer.DTYPES), default="fp32", help="bf16 needs --device cuda")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    p.add_argument("--uniform", action="store_true", help="round-robin routing: kernel speed without skew")
    p.add_argument("--no-reference", action="store_true", help="skip the slow per-expert loop")
    p.add_argument("--no-floor", action="store_true", help="skip the matmuls-alone measurement (CPU only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--sweep", metavar="PNG", nargs="?", const="layer_sweep.png",
                   help="instead: sweep tokens (128-16k), routed experts (8-256) and top-k (1-16) around the "
                        "given shape, print the ratios to dense and plot them into PNG (default layer_sweep.png)")


def _layer_sweep(args: argparse.Namespace, cfg: MoEConfig, device: torch.device) -> int:
    rows = layer.sweep(cfg, args.tokens, device, layer.DTYPES[args.dtype], args.repeats, args.warmup)
    where = layer.machine(device)
    print(f"machine: {where}\nbase: T={args.tokens} D={args.dim} E={args.experts} F={args.expert_dim} "
          f"N_s={args.shared} K={args.top_k} {args.dtype}; time / dense FFN time (< 1: the MoE is cheaper)\n")
    print(layer.format_sweep(rows))
    plot_layer_sweep(rows, Path(args.sweep), where)
    print(f"\nplot: {args.sweep}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": where, "rows": rows}, indent=2))
    return 0


def _layer(args: argparse.Namespace) -> int:
    check_at_least(args, 1, "tokens", "repeats", "threads")
    check_at_least(args, 0, "warmup")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but torch sees no CUDA device")
    if args.dtype == "bf16" and device.type != "cuda":
        raise ValueError("--dtype bf16 is only benchmarked on --device cuda (CPU bf16 matmul timing is not "
                         "representative); use --dtype fp32 on cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = MoEConfig(dim=args.dim, n_routed_experts=args.experts, n_shared_experts=args.shared,
                    top_k=args.top_k, expert_dim=args.expert_dim, uniform_routing=args.uniform)
    if args.sweep:
        return _layer_sweep(args, cfg, device)
    rows = layer.bench_layer(cfg, args.tokens, device, layer.DTYPES[args.dtype], args.repeats, args.warmup,
                       reference=not args.no_reference)
    where = layer.machine(device)
    shape = (f"T={args.tokens} D={args.dim} E={args.experts} F={args.expert_dim} N_s={args.shared} "
             f"K={args.top_k} {args.dtype} {device}{' uniform routing' if args.uniform else ''}")
    print(f"machine: {where}\nshape:   {shape}; dense hidden = {(args.top_k + args.shared) * args.expert_dim}")
    print(f"median of {args.repeats} repeats after {args.warmup} warmup, candidates interleaved")
    print("memory = peak bytes allocated by the training forward (kept for backward + temporaries), "
          "parameters and gradients excluded\n")
    print(layer.format_table(rows))
    result: dict[str, Any] = {"machine": where, "shape": shape, "rows": [asdict(r) for r in rows]}
    if not args.no_floor and device.type == "cpu":  # on CUDA the layer runs one grouped_mm, not a loop of matmuls
        fast = layer.build(cfg, device, layer.DTYPES[args.dtype], reference=False)["dsmoe"]  # the timed weights
        assert isinstance(fast, MoE)
        x = torch.randn(args.tokens, args.dim, device=device, dtype=layer.DTYPES[args.dtype])
        floor = result["matmul_floor"] = layer.matmul_floor(fast, x, args.repeats, args.warmup)
        print("\nmatmuls alone (the same matmuls into preallocated buffers, nothing else; router excluded), "
              "the floor of one matmul per expert on this machine:")
        print(layer.format_table([layer.Row(n, floor[f"{n}_fwd_ms"], floor[f"{n}_fwd_bwd_ms"], float("nan"),
                                floor[f"{n}_fwd_ms"] / floor["dense_fwd_ms"],
                                floor[f"{n}_fwd_bwd_ms"] / floor["dense_fwd_bwd_ms"]) for n in ("dsmoe", "dense")]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _train_arguments(p: argparse.ArgumentParser) -> None:
    moe_presets = [n for n, c in PRESETS.items() if c.model.moe is not None]
    p.add_argument("--preset", default="tiny", choices=moe_presets,
                   help="MoE preset (its dense twin is '<name>-dense')")
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per model")
    p.add_argument("--chunk", type=int, default=4, help="steps per timed chunk (models alternate between chunks)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step (default: the preset's training batch)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the preset's training length)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (cuda trains under bf16 autocast)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seeds both models' initialization and the token batches")
    p.add_argument("--compile", action="store_true",
                   help="also train both models under torch.compile (inductor), side by side with eager")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def _train(args: argparse.Namespace) -> int:
    check_at_least(args, 1, "steps", "chunk", "batch_size", "seq_len", "threads")
    check_at_least(args, 0, "warmup")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but torch sees no CUDA device")
    sizes = [f"{k}={v}" for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len)) if v is not None]
    check_step_memory(*build_configs(args.preset, [*sizes, f"device={device.type}"]))  # of the MoE model
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = train.loadavg()
    try:
        results = train.bench_train(args.preset, args.steps, args.chunk, args.warmup, args.batch_size, args.seq_len,
                                    device, args.seed, args.compile)
    except ValueError as e:
        raise ValueError(f"dsmoe bench train: {e}") from None
    default_batch, default_seq = train.default_shape(args.preset)
    batch_size, seq_len = args.batch_size or default_batch, args.seq_len or default_seq
    where = layer.machine(device)
    print(f"machine: {where}; 1-min load average {load_before} before, {train.loadavg()} after "
          f"({os.cpu_count()} CPUs; other processes slow both models alike but add noise)")
    print(f"preset {args.preset} vs {args.preset}-dense; batch {batch_size} x {seq_len} tokens; "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; fwd+bwd+AdamW step; median of "
          f"{args.steps // args.chunk} chunks of {args.chunk} steps per model, interleaved\n")
    print(train.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": where, "preset": args.preset, "batch_size": batch_size, "seq_len": seq_len,
                       "results": [asdict(r) for r in results]}, f, indent=2)
    return 0


def _ep_arguments(p: argparse.ArgumentParser) -> None:
    d, m = ep.LayerSettings(), mesh.MeshSettings()
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="process counts")
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per rank per step")
    p.add_argument("--dim", type=int, default=d.dim, help="model dim D")
    p.add_argument("--expert-dim", type=int, default=d.expert_dim, help="expert hidden dim F")
    p.add_argument("--experts", type=int, default=d.experts, help="routed experts E")
    p.add_argument("--top-k", type=int, default=d.top_k, help="experts per token K")
    p.add_argument("--score-func", default=d.score_func, choices=["softmax", "sigmoid"])
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first")
    p.add_argument("--preset", default=m.preset, help="the model trained on the mesh at 4 processes")
    p.add_argument("--batch-size", type=int, default=m.batch_size, help="global batch of the mesh part")
    p.add_argument("--seq-len", type=int, default=m.seq_len, help="tokens per sequence of the mesh part")
    p.add_argument("--no-mesh", action="store_true", help="only the layer's all-to-all part")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")


def _settings(cls: type, args: argparse.Namespace) -> Any:
    """A benchmark's settings dataclass from the command line's values of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _ep(args: argparse.Namespace) -> int:
    check_at_least(args, 1, "tokens", "dim", "expert_dim", "experts", "top_k", "repeats", "batch_size", "seq_len")
    check_at_least(args, 0, "warmup")
    settings = _settings(ep.LayerSettings, args)
    ep.check(settings, args.worlds)
    print(f"{ep.describe(settings)}\n{ep.HEADER}")
    rows = []
    for world in args.worlds:
        for r in ep.measure(settings, world):
            rows.append(r)
            print(ep.format_row(r))
    print(ep.FOOTER)
    result: dict[str, Any] = {"layer": rows}
    if not args.no_mesh:  # the second part: training layouts and checkpoint formats at 4 processes
        mesh_settings = _settings(mesh.MeshSettings, args)
        layouts, formats = mesh.measure(mesh_settings)
        print("\n" + mesh.format_report(layouts, formats, mesh_settings))
        result |= {"layouts": layouts, "checkpoints": formats}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _model_arguments(p: argparse.ArgumentParser) -> None:
    d = model.Shape()
    p.add_argument("--hidden", type=int, default=d.hidden, help="D, model dim")
    p.add_argument("--layers", type=int, default=d.layers, help="decoder blocks (the first dense)")
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads")
    p.add_argument("--experts", type=int, default=d.experts, help="E, routed experts")
    p.add_argument("--top-k", type=int, default=d.top_k, help="K, routed experts per token")
    p.add_argument("--expert-dim", type=int, default=d.expert_dim, help="F, hidden width of each expert")
    p.add_argument("--groups", type=int, default=d.n_group, help="expert groups (V3's n_group)")
    p.add_argument("--topk-groups", type=int, default=d.topk_group, help="groups a token may use (V3's topk_group)")
    p.add_argument("--batch-size", type=int, default=d.batch, help="B, sequences per batch")
    p.add_argument("--seq-len", type=int, default=d.seq, help="S, tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy generation length (0 skips generation)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    p.add_argument("--no-memory", action="store_true", help="skip the training-forward memory count")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def _model(args: argparse.Namespace) -> int:
    check_at_least(args, 1, "hidden", "layers", "heads", "experts", "top_k", "expert_dim", "groups", "topk_groups",
                   "batch_size", "seq_len", "repeats", "threads")
    check_at_least(args, 0, "warmup", "new_tokens")
    if args.experts % args.groups or args.topk_groups > args.groups or \
            args.top_k > args.topk_groups * (args.experts // args.groups):
        raise ValueError(f"--experts {args.experts} in --groups {args.groups} with --topk-groups {args.topk_groups} "
                         f"cannot give --top-k {args.top_k} experts per token")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = model.Shape(hidden=args.hidden, layers=args.layers, heads=args.heads, experts=args.experts,
                        top_k=args.top_k, expert_dim=args.expert_dim, batch=args.batch_size, seq=args.seq_len,
                        n_group=args.groups, topk_group=args.topk_groups,
                        max_seq_len=max(512, args.seq_len, 16 + args.new_tokens))
    result = model.bench_model(shape, args.repeats, args.warmup, args.new_tokens, memory=not args.no_memory)
    where, load = layer.machine("cpu"), train.loadavg()
    print(f"machine: {where}; 1-min load average {load} ({os.cpu_count()} CPUs)")
    if load != "n/a" and float(load) > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print("warning: more runnable processes than CPUs: with several threads per process every small op can wait "
              "a scheduler time slice, which skews the ratios; rerun with --threads 1 or on an idle machine")
    print(f"shape:   {result.shape}; fp32 on CPU")
    print(f"transformers' experts: {result.experts_implementation}; max |logit difference| "
          f"{result.max_logit_diff:.1e} (same weights)")
    print(f"median of {args.repeats} repeats after {args.warmup} warmup, candidates interleaved; "
          "x = transformers' / dsmoe's (above 1: dsmoe is faster or smaller)\n")
    print(model.format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": where, **asdict(result)}, f, indent=2)
    return 0


def _pp_arguments(p: argparse.ArgumentParser) -> None:
    d = pp.PipelineSettings()
    p.add_argument("--pp", type=int, nargs="+", default=[1, 2, 4],
                   help="pipeline stages (1: the one-process baseline)")
    p.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe", "interleaved", "zb", "dualpipev"],
                   choices=["1f1b", "gpipe", "interleaved", "zb", "dualpipev"])
    p.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8], help="micro-batches per step")
    p.add_argument("--preset", default=d.preset, help="the model's preset")
    p.add_argument("--layers", type=int, default=d.layers, help="its blocks (each stage needs one)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"untimed steps first (after the {pp.MEMORY_STEPS} that measure memory)")
    p.add_argument("--dp", type=int, default=d.dp, help="data-parallel ranks of each stage (pp > 1)")
    p.add_argument("--ep", type=int, default=d.ep, help="expert-parallel ranks of each stage (pp > 1)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def _pp(args: argparse.Namespace) -> int:
    check_at_least(args, 1, "layers", "batch_size", "seq_len", "repeats", "dp", "ep")
    check_at_least(args, 0, "warmup")
    settings = _settings(pp.PipelineSettings, args)
    pp.check(settings, args.pp, args.microbatches)
    print(f"machine: {layer.machine('cpu')}; 1-min load average {train.loadavg()} ({os.cpu_count()} CPUs)")
    stage = f", each stage on dp {settings.dp} x ep {settings.ep} ranks" if settings.dp * settings.ep > 1 else ""
    print(f"{settings.preset} with {settings.layers} blocks, global batch {settings.batch_size} x {settings.seq_len}"
          f"{stage}, whole training steps, median of {settings.repeats}; one thread a process; bubble: the share of "
          "a step a rank waits on its peers (mean over ranks), planner: dsmoe.memory.bubble; allocated: malloc's peak "
          "in the first two steps beside dsmoe.memory.layout_plan's figure for the rank\n" + pp.HEADER)
    rows: list[dict] = []
    for stages in sorted(set(args.pp)):
        for schedule in args.schedules if stages > 1 else ["-"]:
            for M in args.microbatches if stages > 1 else [1]:
                two = chunks_per_rank(schedule) > 1  # stages a rank
                if schedule != "gpipe" and M < stages or two and settings.layers < 2 * stages or \
                        schedule == "dualpipev" and M < 2 * stages or \
                        schedule in SPLIT_BACKWARD and settings.dp * settings.ep > 1:
                    continue  # a micro-batch a rank (DualPipeV: a stage), a block a stage, one process a stage
                    #           under a split backward
                r = pp.measure_one(settings, stages, schedule if stages > 1 else "1f1b", M)
                rows.append(r)
                print(pp.format_row(r, rows[0]["step_ms"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": layer.machine("cpu"), "rows": rows}, f, indent=2)
    return 0


BENCHMARKS = {"layer": (layer, _layer_arguments, _layer), "train": (train, _train_arguments, _train),
              "ep": (ep, _ep_arguments, _ep), "model": (model, _model_arguments, _model),
              "pp": (pp, _pp_arguments, _pp)}
