"""`dsmoe train [--preset NAME] [--set key=value ...]`: train or resume a run."""

from __future__ import annotations

import argparse
import dataclasses

import torch.distributed as dist

from dsmoe import checkpoint
from dsmoe.config import PRESETS, ModelConfig, TrainConfig, apply_sets, build_configs
from dsmoe.train import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help=f"model and run preset: {', '.join(PRESETS)}")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, a ModelConfig field, or moe.<field> (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/<preset>)")
    p.add_argument("--data", metavar="PATH", help="a text file or a folder of text files (default: the stdlib)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint or run directory")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default cpu; cuda uses bf16 autocast")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--expert-parallel", type=int, metavar="N",
                   help="shard the routed experts over N processes: torchrun --nproc_per_node N -m dsmoe train ...")


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The preset's (or the resumed checkpoint's) configs with the command line's overrides."""
    flags = (("out", args.out), ("data", args.data), ("device", args.device), ("steps", args.steps),
             ("expert_parallel", args.expert_parallel))
    sets = args.sets + [f"{k}={v}" for k, v in flags if v is not None]
    if args.resume:
        model_cfg, train_cfg = checkpoint.configs_from_checkpoint(checkpoint.resolve(args.resume))
        model_cfg, train_cfg = apply_sets(model_cfg, train_cfg, sets)
        return model_cfg, dataclasses.replace(train_cfg, resume=args.resume)
    return build_configs(args.preset, sets)


def run(args: argparse.Namespace) -> int:
    model_cfg, train_cfg = configs_from_args(args)
    summary = train(model_cfg, train_cfg, progress=not args.quiet)
    if dist.is_initialized() and dist.get_rank() != 0:  # expert parallel: rank 0 reports
        return 0
    print(f"val loss {summary['val_loss']:.4f}, perplexity {summary['val_ppl']:.2f} "
          f"(untrained {summary['init_val_ppl']:.2f}) | MaxVio_global {summary['maxvio_global_mean']:.3f} "
          f"(per layer {', '.join(f'{v:.3f}' for v in summary['maxvio_global'])}) | "
          f"{summary['tokens_per_s']:,.0f} tok/s\ncheckpoint: {summary['run_dir']}/checkpoint")
    return 0
