"""The options every command spells and means the same way, and the old spellings that still parse.

- ``--output PATH``: where the command writes (a run directory, a file, a results folder);
- ``--img-size PX``: the height and width of the images the model sees;
- ``--json [FILE]``: the machine-readable result, as JSON: alone, on stdout; with FILE, written
  to FILE (through a temporary file beside it, so FILE never holds half a result);
- ``--pretrained [PATH|URL]``: alone, the model's default weights; with a value, a weights file
  or URL (``default`` names the default weights too, as ``model.pretrained`` does in a config).

Older spellings (``--out``, ``--input-size``, ``--race-size``) still parse for one release: hidden
from ``--help``, they print one ``warning:`` line on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rednet.fileio import STDOUT, atomic_write, check_output_file

__all__ = ["DEFAULT_WEIGHTS", "STDOUT", "add_json", "add_option", "add_pretrained", "check_json",
           "pretrained_argument", "write_json"]

DEFAULT_WEIGHTS = "default"  # what --pretrained alone stores, as model.pretrained spells the default weights


class _OldSpelling(argparse.Action):
    """An option's former name: stores what the current one would, after a one-line warning."""

    def __init__(self, option_strings, dest, current: str, **kwargs):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.current = current

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is now {self.current}; the old spelling goes in the next release",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_option(parser: argparse.ArgumentParser, name: str, *, old: tuple[str, ...] = (),
               **kwargs) -> argparse.Action:
    """``parser.add_argument(name, **kwargs)``, and each of ``old`` as a hidden alias that still works.

    Args:
        parser: the parser, or one of its groups.
        name: the option's spelling, e.g. ``--img-size``.
        old: its former spellings, e.g. ``("--input-size",)``.
        kwargs: as ``add_argument`` takes them (not ``action``: the option stores a value).
    """
    action = parser.add_argument(name, **kwargs)
    for spelling in old:
        parser.add_argument(spelling, dest=action.dest, action=_OldSpelling, current=name, nargs=action.nargs,
                            const=action.const, type=action.type, choices=action.choices, metavar=action.metavar)
    return action


def add_json(parser: argparse.ArgumentParser, what: str) -> argparse.Action:
    """``--json [FILE]``: ``what`` as one JSON object, on stdout or written to FILE."""
    return parser.add_argument("--json", nargs="?", const=STDOUT, metavar="FILE",
                               help=f"{what} as JSON: alone, on stdout; with FILE, written to FILE")


def check_json(dest: str | None) -> None:
    """Before the work: that ``--json FILE`` can be written (``OutputDirError`` if not); stdout always can."""
    if dest not in (None, STDOUT):
        check_output_file(dest, "--json")


def add_pretrained(parser: argparse.ArgumentParser, extra: str = "") -> argparse.Action:
    """``--pretrained [PATH|URL]`` on ``parser`` (or a group): alone, the default weights; else a file or URL."""
    return parser.add_argument("--pretrained", nargs="?", const=DEFAULT_WEIGHTS, metavar="PATH|URL",
                               help="weights: alone, the model's default (published) weights; with a value, a "
                                    "weights file or URL" + (f"; {extra}" if extra else ""))


def pretrained_argument(value: str | None) -> bool | str:
    """``--pretrained``'s value as ``create_model(pretrained=...)`` takes it: True, a file or URL, or False."""
    return True if value == DEFAULT_WEIGHTS else (value or False)


def write_json(result: Any, dest: str, **dumps) -> None:
    """``result`` as JSON where ``--json`` says: on stdout (``STDOUT``) or into the file ``dest``.

    A file is replaced through a temporary file beside it (never half written). Check ``dest``
    first with ``check_json``, before the work whose result it holds.
    """
    text = json.dumps(result, **dumps)
    if dest == STDOUT:
        print(text, flush=True)
        return
    path = Path(dest)
    if path.exists() and not path.is_file():  # /dev/stdout, a pipe: written in place
        with open(path, "w") as f:
            f.write(text + "\n")
        return
    atomic_write(path.resolve(), lambda f: f.write((text + "\n").encode()))
