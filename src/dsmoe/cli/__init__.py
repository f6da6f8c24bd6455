"""The `dsmoe` command: the only place that parses arguments. Each subcommand is a module here with
`add_arguments(parser)` and `run(args) -> exit code`; the library functions they call take config
objects and return results. A ValueError, OSError, RuntimeError or ImportError from the library (bad input, a
missing or unwritable file, a device that is not there, an optional package not installed) is printed as one
line and exits 1; Ctrl-C exits 130.
The installed command (`command`) also keeps freed memory in glibc's heap (dsmoe.runtime.keep_freed_memory), a
process-wide choice that `main`, which tests and scripts call in their own process, leaves alone."""

from __future__ import annotations

import argparse
import sys

from dsmoe.cli import bench, demo, evaluate, export, generate, inspection, prepare, report, study, train
from dsmoe.cli.format import HelpFormatter
from dsmoe.runtime import keep_freed_memory

# name -> (module, help)
COMMANDS = {
    "bench": (bench, "benchmarks: layer | train | ep"),
    "prepare": (prepare, "tokenize text, JSONL or Parquet sources of any size into memory-mapped token shards"),
    "train": (train, "train a DeepSeekMoE language model (default: the stdlib corpus)"),
    "eval": (evaluate, "validation loss, perplexity, MaxVio_global and expert load of a checkpoint"),
    "generate": (generate, "sample text from a checkpoint"),
    "report": (report, "plot a run's loss, MaxVio and expert-load heatmaps into RUN/plots"),
    "demo": (demo, "the main job: train the default preset on the stdlib, then evaluate, plot and sample"),
    "export": (export, "write a dsmoe checkpoint as a HuggingFace DeepSeek-V2/V3 folder that transformers loads"),
    "inspect": (inspection, "expert load, MaxVio, dead experts, specialization and redundancy of a HF or dsmoe model"),
    "study": (study, "reproduce the papers' balance, shared-expert, segmentation and specialization findings"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsmoe", description="DeepSeek-style Mixture-of-Experts")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=HelpFormatter)
        p.set_defaults(_run=module.run)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        print(f"dsmoe {args.command}: error: {e}")
        return 1


def command(argv: list[str] | None = None) -> int:
    """The `dsmoe` executable (and the benchmarks/ scripts): main, in a process whose allocator keeps freed memory
    (CPU steps would fault their activations' pages in again otherwise)."""
    keep_freed_memory()
    return main(argv)


if __name__ == "__main__":
    sys.exit(command())
