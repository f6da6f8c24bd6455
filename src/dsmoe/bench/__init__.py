"""`dsmoe bench {layer,train,ep}`: each benchmark is a module here with add_arguments(p) and run(args)."""

import importlib

BENCHMARKS = {"layer": "dsmoe.bench.layer", "train": "dsmoe.bench.train", "ep": "dsmoe.bench.ep"}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, module in BENCHMARKS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:  # a benchmark not written yet
            continue
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        p.set_defaults(_bench=mod)
        mod.add_arguments(p)


def run(args):
    return args._bench.run(args)
