"""Expert parallelism at 2 and 4 CPU processes: step time and all-to-all volume with device limit
M = 1, 2 and unlimited. The same as `dsmoe bench ep`; arguments pass through (see --help)."""

import sys

from dsmoe.cli import command

if __name__ == "__main__":
    sys.exit(command(["bench", "ep", *sys.argv[1:]]))
