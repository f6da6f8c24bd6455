"""`dsmoe bench {layer,train,ep}`: each benchmark is a module here with add_arguments(p) and run(args)."""

import importlib
import importlib.util

BENCHMARKS = {"layer": "dsmoe.bench.layer", "train": "dsmoe.bench.train", "ep": "dsmoe.bench.ep"}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, module in BENCHMARKS.items():
        if importlib.util.find_spec(module) is None:  # not installed in this checkout
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        p.set_defaults(_bench=mod)
        mod.add_arguments(p)


def run(args):
    return args._bench.run(args)
