"""One MoE layer vs the reference loop vs a dense SwiGLU of the same active FLOPs (same as `dsmoe bench layer`).

    python benchmarks/bench_layer.py                                   # default shape, CPU fp32
    python benchmarks/bench_layer.py --device cuda --dtype bf16 --tokens 16384 --dim 2048 --expert-dim 1408
"""

import argparse
import sys

from dsmoe.bench import layer

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=layer.__doc__.splitlines()[0])
    layer.add_arguments(parser)
    sys.exit(layer.run(parser.parse_args()))
