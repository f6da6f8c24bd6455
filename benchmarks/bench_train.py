"""Training throughput of an MoE preset against its dense twin: `python benchmarks/bench_train.py [options]`.

The same benchmark as `dsmoe bench train` (same options); see dsmoe/bench/train.py for what is measured.
"""

import argparse
import sys

from dsmoe.bench import train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=train.__doc__.strip().splitlines()[0])
    train.add_arguments(parser)
    sys.exit(train.run(parser.parse_args()))
