import sys

from dsmoe.cli import command

sys.exit(command())
