"""`dsmoe train [--preset NAME] [--set key=value ...]`: train or resume a run."""

from __future__ import annotations

import argparse
import os

import torch.distributed as dist

from dsmoe.cli.format import add_threads_argument, apply_threads
from dsmoe.config import ModelConfig, TrainConfig
from dsmoe.presets import PRESETS
from dsmoe.train import run_configs, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"model and run preset: {', '.join(PRESETS)} (default: tiny; a resumed run "
                                    "keeps its own)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, a ModelConfig field, or moe.<field> (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/<preset>)")
    p.add_argument("--data", metavar="PATH", help="a prepared folder (dsmoe prepare), a text file or folder, a "
                                                 ".jsonl of records, or a mixture a=0.7,b=0.3 (default: the stdlib)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint or run directory")
    p.add_argument("--init", metavar="DIR",
                   help="fine-tune a HuggingFace DeepSeek-V2/V3 folder: its architecture and weights, the preset's "
                        "run settings; the gate's balancing bias trains loss-free (moe.bias_update_speed 1e-3; a V2 "
                        "softmax gate gets one for the choice of experts)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default cpu; cuda uses bf16 autocast")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor; compiles once)")
    add_threads_argument(p)
    p.add_argument("--expert-parallel", type=int, metavar="E",
                   help="split the routed experts over E processes; under `torchrun --nproc_per_node N -m dsmoe "
                        "train`, data parallel over N / E (without this flag: plain data parallel over N)")
    p.add_argument("--pipeline-parallel", type=int, metavar="P",
                   help="split the blocks into P pipeline stages (torchrun: P x dp x ep processes)")
    p.add_argument("--schedule", choices=["1f1b", "gpipe", "interleaved", "zb", "dualpipev"],
                   help="pipeline schedule (default 1f1b; interleaved, zb, dualpipev: 2 stages a rank)")
    p.add_argument("--microbatches", type=int, metavar="M", help="pipeline micro-batches per step (default P)")


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The run's configs (dsmoe.train.run_configs) with the command line's flags as overrides."""
    flags = (("out", args.out), ("data", args.data), ("device", args.device), ("steps", args.steps),
             ("expert_parallel", args.expert_parallel), ("pipeline_parallel", args.pipeline_parallel),
             ("schedule", args.schedule), ("microbatches", args.microbatches))
    sets = args.sets + [f"{k}={v}" for k, v in flags if v is not None] + (["compile=inductor"] if args.compile else [])
    model_cfg, train_cfg, notes = run_configs(args.preset, sets, args.resume, args.init)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one rank tells
        for line in notes:
            print(line)
    return model_cfg, train_cfg


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
