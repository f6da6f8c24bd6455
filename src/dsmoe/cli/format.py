"""Help formatting and option checks shared by every subcommand."""

from __future__ import annotations

import argparse
import math


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's default shown unless it has none or its help names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS  # `in (None, False, ...)` would hide a default of 0 (0 == False)
        if "default" not in text and not hidden:
            text += " (default: %(default)s)"
        return text


def check_at_least(args: argparse.Namespace, minimum: float, *names: str) -> None:
    """A ValueError naming the option (one line, exit 1) for each of `names` given below `minimum`, NaN or inf."""
    for name in names:
        value = getattr(args, name)
        if value is None or (value >= minimum and (isinstance(value, int) or math.isfinite(value))):
            continue
        kind = "an integer" if isinstance(value, int) else "a finite number"
        raise ValueError(f"--{name.replace('_', '-')} {value} is invalid: must be {kind} >= {minimum}")
