"""Training throughput of an MoE preset against its dense twin (same as `dsmoe bench train`; same options)."""

import sys

from dsmoe.cli import command

if __name__ == "__main__":
    sys.exit(command(["bench", "train", *sys.argv[1:]]))
