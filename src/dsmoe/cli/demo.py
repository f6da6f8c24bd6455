"""`dsmoe demo`: train the default preset on the Python standard library, then evaluate, plot and sample.

The main job in one command (about 5 minutes for `tiny` on 2 CPU cores): a DeepSeekMoE language model
learns Python source while loss-free balancing evens out its experts' load. At the end it prints the
validation perplexity next to the untrained model's, MaxVio_global per MoE layer, where the checkpoint
and plots are, and a sample continued from a Python prompt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dsmoe import plots
from dsmoe.checkpoint import load_checkpoint
from dsmoe.cli.format import add_threads_argument, apply_threads, check_at_least
from dsmoe.generate import generate_text
from dsmoe.presets import build_configs
from dsmoe.train import train

PROMPT = "def fibonacci(n):\n    "
BALANCED = 0.3  # MaxVio_global below this: the busiest expert takes < 1.3x its fair share


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model and run preset (see `dsmoe train --help`)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/demo-<preset>)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda trains under bf16 autocast")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any `dsmoe train --set` override (repeatable)")
    p.add_argument("--prompt", default=PROMPT, help="text the trained model continues")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens to sample")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_argument(p)


def format_results(summary: dict, first_moe_block: int, plots: list[Path]) -> str:
    """The demo's closing report (everything but the sample)."""
    mv = summary["maxvio_global"]
    if mv:  # judged on the mean over layers (as the Loss-Free Balancing paper reports it); the worst layer is named too
        below = summary["maxvio_global_mean"] < BALANCED
        verdict = f"{'below' if below else 'not yet below'} {BALANCED}; highest block {max(mv):.3f}"
    lines = [
        f"validation perplexity: {summary['val_ppl']:.2f} (loss {summary['val_loss']:.4f}); "
        f"untrained model: {summary['init_val_ppl']:.2f} (loss {summary['init_val_loss']:.4f})",
        f"parameters: {summary['num_params']:,} total, {summary['num_active_params']:,} active per token; "
        f"training speed {summary['tokens_per_s']:,.0f} tokens/s",
    ]
    if mv:
        per_layer = ", ".join(f"block {first_moe_block + i}: {v:.3f}" for i, v in enumerate(mv))
        lines.append(f"MaxVio_global (validation set): mean {summary['maxvio_global_mean']:.3f} ({verdict}); "
                     f"{per_layer}")
        lines.append(f"dead experts at the end: {summary['dead_experts']}")
    run_dir = Path(summary["run_dir"])
    lines.append(f"checkpoint: {run_dir / 'checkpoint'}")
    lines.append("plots:      " + "\n            ".join(str(p) for p in plots))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    extra = [f"device={args.device}", f"out={args.out or f'runs/demo-{args.preset}'}", "overwrite=true"]
    if args.steps is not None:
        extra.append(f"steps={args.steps}")
    check_at_least(args, 1, "max_tokens")
    model_cfg, train_cfg = build_configs(args.preset, args.sets + extra)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but torch sees no CUDA device")
    print(f"dsmoe demo: training the {args.preset!r} preset for {train_cfg.steps} steps on "
          f"{train_cfg.data or 'the Python standard library'} ({args.device})")
    summary = train(model_cfg, train_cfg, progress=not args.quiet)
    run_dir = Path(summary["run_dir"])
    written = plots.report(run_dir)
    model, _, _, tokenizer = load_checkpoint(run_dir / "checkpoint", args.device)
    sample = generate_text(model, tokenizer, args.prompt, args.max_tokens, temperature=0.8, top_p=0.95,
                           device=args.device)

    first_moe_block = model_cfg.first_k_dense if model_cfg.moe is not None else 0
    print("\n" + "=" * 100)
    print(format_results(summary, first_moe_block, written))
    print(f"sample (temperature 0.8, top-p 0.95), prompt {args.prompt!r}:\n" + "-" * 100)
    print(args.prompt + sample)
    print("-" * 100)
    print(f"next: dsmoe eval --checkpoint {run_dir}  |  dsmoe generate --checkpoint {run_dir} --prompt 'import '"
          f"  |  dsmoe train --resume {run_dir} --steps N")
    return 0
