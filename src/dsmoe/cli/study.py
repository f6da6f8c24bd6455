"""`dsmoe study NAME`: the balance, shared-expert, segmentation and specialization studies (dsmoe.studies)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dsmoe.memory import check_step_memory
from dsmoe.presets import build_configs
from dsmoe.studies import DEFAULT_STEPS, STUDIES, study


def add_arguments(p: argparse.ArgumentParser) -> None:
    default_steps = ", ".join(f"{name} {steps}" for name, steps in DEFAULT_STEPS.items())
    p.add_argument("name", choices=(*STUDIES, "all"), help="which study")
    p.add_argument("--preset", default="debug", choices=tuple(DEFAULT_STEPS), help="model size")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per run (default per preset: {default_steps})")
    p.add_argument("--seeds", type=int, default=2, help="repetitions of every run, for mean and spread")
    p.add_argument("--out", default=None, help="output folder (default runs/study-<preset>)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (these models are too small to gain from more than 1, and "
                        "oversubscribed cores on a shared machine slow every run down many times)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model or training field of the base configuration, as in `dsmoe train`")


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads} is invalid: must be >= 1")
    torch.set_num_threads(args.threads)
    model_cfg, train_cfg = build_configs(args.preset, args.sets)
    check_step_memory(model_cfg, train_cfg)  # every variant has about the preset's size
    steps = args.steps if args.steps is not None else DEFAULT_STEPS[args.preset]
    out = Path(args.out or f"runs/study-{args.preset}")
    names = list(STUDIES) if args.name == "all" else [args.name]
    try:
        study(names, model_cfg, train_cfg, steps, args.seeds, out)
    except KeyboardInterrupt:
        print("interrupted: finished runs are cached; run the same command again to continue")
        return 130
    print(f"results: {out}/results.md")
    return 0
