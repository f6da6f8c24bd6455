"""`dsmoe train [--preset NAME] [--set key=value ...]`: train or resume a run."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch.distributed as dist

from dsmoe import checkpoint
from dsmoe.cli.format import add_threads_argument, apply_threads
from dsmoe.config import ModelConfig, TrainConfig
from dsmoe.parallel.context import launch_world, layout_for_launch
from dsmoe.presets import PRESETS, apply_sets, build_configs
from dsmoe.pretrained import hf_model_config
from dsmoe.train import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"model and run preset: {', '.join(PRESETS)} (default: tiny; a resumed run "
                                    "keeps its own)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, a ModelConfig field, or moe.<field> (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/<preset>)")
    p.add_argument("--data", metavar="PATH", help="a text file or a folder of text files (default: the stdlib)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint or run directory")
    p.add_argument("--init", metavar="DIR",
                   help="fine-tune a HuggingFace DeepSeek-V2/V3 folder: its architecture and weights, the preset's "
                        "run settings; a V3 (sigmoid) gate's bias trains loss-free (moe.bias_update_speed 1e-3)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default cpu; cuda uses bf16 autocast")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor; compiles once)")
    add_threads_argument(p)
    p.add_argument("--expert-parallel", type=int, metavar="E",
                   help="split the routed experts over E processes; under `torchrun --nproc_per_node N -m dsmoe "
                        "train`, data parallel over N / E (without this flag: plain data parallel over N)")


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The preset's (or the resumed checkpoint's) configs with the command line's overrides."""
    flags = (("out", args.out), ("data", args.data), ("device", args.device), ("steps", args.steps),
             ("expert_parallel", args.expert_parallel))
    sets = args.sets + [f"{k}={v}" for k, v in flags if v is not None] + (["compile=inductor"] if args.compile else [])
    if args.resume:
        if args.preset or args.init:
            raise ValueError("--resume continues a run with its own model and settings: drop --preset/--init "
                             "(change settings with --set)")
        ckpt = checkpoint.resolve(args.resume)
        model_cfg, train_cfg = checkpoint.configs_from_checkpoint(ckpt)
        run_dir = ckpt.parent if ckpt.name.startswith("checkpoint") else ckpt
        train_cfg = dataclasses.replace(train_cfg, out=str(run_dir))  # the resumed run's folder, wherever it moved
        model_cfg, train_cfg = apply_sets(model_cfg, train_cfg, sets)
        if "expert_parallel" not in " ".join(sets):  # this launch's layout, not necessarily the checkpoint's
            world, saved = launch_world(), train_cfg.expert_parallel
            train_cfg = dataclasses.replace(train_cfg, expert_parallel=layout_for_launch(saved, world))
            if train_cfg.expert_parallel != saved and os.environ.get("RANK", "0") == "0":
                print(f"resuming on {world} process{'es' * (world > 1)} with expert_parallel="
                      f"{train_cfg.expert_parallel} instead of the checkpoint's {saved} (it reshards to any layout; "
                      "choose another with --expert-parallel)")
        print(f"resuming {ckpt} into {train_cfg.out}")
        return model_cfg, dataclasses.replace(train_cfg, resume=args.resume)
    if args.init:
        model_cfg = hf_model_config(args.init)
        assert model_cfg.moe is not None
        if model_cfg.moe.score_func == "sigmoid":  # V3's e_score_correction_bias is the loss-free bias
            sets = ["moe.bias_update_speed=0.001", *sets]
        _, train_cfg = build_configs(args.preset or "tiny")
        train_cfg = dataclasses.replace(train_cfg, init=args.init, out=args.out or f"runs/{Path(args.init).name}")
        return apply_sets(model_cfg, train_cfg, sets)
    return build_configs(args.preset or "tiny", sets)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    model_cfg, train_cfg = configs_from_args(args)
    summary = train(model_cfg, train_cfg, progress=not args.quiet)
    if dist.is_initialized() and dist.get_rank() != 0:  # expert parallel: rank 0 reports
        return 0
    print(f"val loss {summary['val_loss']:.4f}, perplexity {summary['val_ppl']:.2f} "
          f"(untrained {summary['init_val_ppl']:.2f}) | MaxVio_global {summary['maxvio_global_mean']:.3f} "
          f"(per layer {', '.join(f'{v:.3f}' for v in summary['maxvio_global'])}) | "
          f"{summary['tokens_per_s']:,.0f} tok/s\ncheckpoint: {summary['run_dir']}/checkpoint")
    return 0
