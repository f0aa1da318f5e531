"""What the command-line tools share: the one-line error and the check for empty path options."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

__all__ = ["empty_path_option", "fail"]


def fail(message: object) -> int:
    """Print what to fix as one ``error:`` line on stderr (no traceback); return exit status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def empty_path_option(args: argparse.Namespace, options: Iterable[str]) -> str | None:
    """The complaint about the first of ``options`` given as an empty string, if any."""
    for option in options:
        if getattr(args, option) == "":
            return f"--{option.replace('_', '-')} is empty; give a path"
    return None
