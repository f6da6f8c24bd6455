"""One MoE layer vs the reference loop vs a dense SwiGLU of the same active FLOPs (same as `dsmoe bench layer`).

    python benchmarks/bench_layer.py                                   # default shape, CPU fp32
    python benchmarks/bench_layer.py --device cuda --dtype bf16 --tokens 16384 --dim 2048 --expert-dim 1408
"""

import sys

from dsmoe.cli import command

if __name__ == "__main__":
    sys.exit(command(["bench", "layer", *sys.argv[1:]]))
