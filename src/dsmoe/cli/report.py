"""`dsmoe report --run DIR`: plot a run's loss, MaxVio and expert-load heatmaps."""

from __future__ import annotations

import argparse

from dsmoe.plots import report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: DIR/plots)")


def run(args: argparse.Namespace) -> int:
    for path in report(args.run, args.out):
        print(path)
    return 0
