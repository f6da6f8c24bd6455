"""Training throughput of an MoE preset against its dense twin (same as `dsmoe bench train`; same options)."""

import sys

from dsmoe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
