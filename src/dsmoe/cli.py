"""The `dsmoe` command. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `run(args)`; this file only wires them together."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). Modules import their heavy dependencies inside run().
COMMANDS = {
    "bench": ("dsmoe.bench", "benchmarks: layer | train | ep"),
    "train": ("dsmoe.train", "train a DeepSeekMoE language model (default: the stdlib corpus)"),
    "eval": ("dsmoe.evaluate", "validation loss, perplexity, MaxVio_global and expert load of a checkpoint"),
    "generate": ("dsmoe.generate", "sample text from a checkpoint"),
    "report": ("dsmoe.plots", "plot a run's loss, MaxVio and expert-load heatmaps into RUN/plots"),
    "demo": ("dsmoe.demo", "the main job: train the default preset on the stdlib, then evaluate, plot and sample"),
    "study": ("dsmoe.study", "reproduce the papers' balance, shared-expert, segmentation and specialization findings"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsmoe", description="DeepSeek-style Mixture-of-Experts")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args._module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
