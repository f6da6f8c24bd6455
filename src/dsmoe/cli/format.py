"""Help formatting and option checks shared by every subcommand."""

from __future__ import annotations

import argparse
import math
import os
import sys

from dsmoe.runtime import threads_for_load


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's default shown unless it has none or its help names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS  # `in (None, False, ...)` would hide a default of 0 (0 == False)
        if "default" not in text and not hidden:
            text += " (default: %(default)s)"
        return text


def check_at_least(args: argparse.Namespace, minimum: float, *names: str) -> None:
    """A ValueError naming the option (one line, exit 1) for each of `names` given below `minimum`, NaN or inf."""
    for name in names:
        value = getattr(args, name)
        if value is None or (value >= minimum and (isinstance(value, int) or math.isfinite(value))):
            continue
        kind = "an integer" if isinstance(value, int) else "a finite number"
        raise ValueError(f"--{name.replace('_', '-')} {value} is invalid: must be {kind} >= {minimum}")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, fewer when the load average "
                                               "says other processes hold cores; OMP_NUM_THREADS also decides)")


def apply_threads(args: argparse.Namespace) -> None:
    """--threads, else OMP_NUM_THREADS, else torch's count cut to the cores the load average leaves free
    (dsmoe.runtime.threads_for_load), saying so when it cuts."""
    import torch  # here, not at the top: `dsmoe prepare` and its workers run without torch
    check_at_least(args, 1, "threads")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        return
    if "OMP_NUM_THREADS" in os.environ:
        return
    default, load = torch.get_num_threads(), os.getloadavg()[0]
    threads = threads_for_load(default, load=load)
    if threads < default:
        print(f"load average {load:.1f} on {os.cpu_count()} CPUs: training with {threads} torch thread(s) instead "
              f"of {default}, since threads that share a core with another busy process stall each other "
              "(--threads to choose)", file=sys.stderr)
        torch.set_num_threads(threads)
