"""The `dsmoe` command: the only place that parses arguments. Each subcommand is a module here with
`add_arguments(parser)` and `run(args) -> exit code`; the library functions they call take config
objects and return results. A ValueError, OSError, RuntimeError or ImportError from the library (bad input, a
missing or unwritable file, a device that is not there, an optional package not installed) is printed as one
line and exits 1; Ctrl-C exits 130.
The installed command (`command`) also keeps freed memory in glibc's heap (dsmoe.runtime.keep_freed_memory), a
process-wide choice that `main`, which tests and scripts call in their own process, leaves alone; so does
`dsmoe prepare`, whose freed batches would otherwise stay mapped."""

from __future__ import annotations

import argparse
import importlib
import sys

from dsmoe.cli.format import HelpFormatter
from dsmoe.runtime import keep_freed_memory

# name -> (module in dsmoe.cli, help); a module is imported only for its own command, so that `dsmoe prepare`
# (whose worker processes import the command's main module again) never imports torch
COMMANDS = {
    "bench": ("bench", "benchmarks: layer | train | ep"),
    "prepare": ("prepare", "tokenize text, JSONL or Parquet sources of any size into token shards"),
    "train": ("train", "train a DeepSeekMoE language model (default: the stdlib corpus)"),
    "eval": ("evaluate", "validation loss, perplexity, MaxVio_global and expert load of a checkpoint"),
    "generate": ("generate", "sample text from a checkpoint"),
    "report": ("report", "plot a run's loss, MaxVio and expert-load heatmaps into RUN/plots"),
    "demo": ("demo", "the main job: train the default preset on the stdlib, then evaluate, plot and sample"),
    "export": ("export", "write a dsmoe checkpoint as a HuggingFace DeepSeek-V2/V3 folder that transformers loads"),
    "upcycle": ("upcycle", "a dense Llama/Qwen2/Qwen3 folder as a DeepSeekMoE folder computing the same function"),
    "esft-merge": ("esft", "merge an ESFT adapter (RUN/esft of a run with --set esft=...) into its base HF folder"),
    "inspect": ("inspection", "expert load, MaxVio, dead experts, specialization and redundancy of any model"),
    "study": ("study", "reproduce the papers' balance, shared-expert, segmentation and specialization findings"),
    "plan": ("plan", "pp x dp x ep layouts of a model on N GPUs, ranked by free memory per GPU (no GPU needed)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (only=NAME) one whose NAME subcommand alone has its options and code loaded."""
    parser = argparse.ArgumentParser(prog="dsmoe", description="DeepSeek-style Mixture-of-Experts")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=HelpFormatter)
        if only in (None, name):
            module = importlib.import_module(f"dsmoe.cli.{module_name}")
            p.set_defaults(_run=module.run)
            module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
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
    if (sys.argv[1:] if argv is None else argv)[:1] != ["prepare"]:  # prepare's memory must stay flat
        keep_freed_memory()
    return main(argv)


if __name__ == "__main__":
    sys.exit(command())
