"""What the command-line tools share: one table of exit codes, ``run_command`` that applies it, and the
small steps every tool repeats (listing the bundled configs, checking path options and the device,
path options as config values).

A tool parses its options, then hands its body to ``run_command``. Every error of
``EXIT_CODES`` ends the tool with its exit status and one line that says what to fix, never a
traceback; anything else is a bug and keeps its traceback. The README's "Exit codes" quotes
``EXIT_CODES``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from ..data import DataError
from ..fileio import CheckpointError, OutputDirError, describe_overlong, overlong_component
from .config import ConfigError
from .config_files import bundled_configs
from .devices import check_involution_backend
from .logger import setup_logging
from .stepguard import NonFiniteLossError
from .trainer import TrainingInterrupted

__all__ = [
    "EXIT_CODES",
    "ExitCode",
    "UsageError",
    "check_device_option",
    "check_path_options",
    "exit_code",
    "fail",
    "list_configs",
    "path_values",
    "run_command",
]

_logger = logging.getLogger("rednet")


class UsageError(ValueError):
    """A command-line option that a tool checks itself (one that no config key names)."""


@dataclass(frozen=True)
class ExitCode:
    """One row of ``EXIT_CODES``: an error a tool may end on, its exit status, and what it means."""

    error: type[BaseException]
    code: int
    meaning: str


# Every error a tool ends on, and its exit status; 0 is success. 2 prints one `error:` line on
# stderr; 3 and 128 + N are logged by the run, whose log says where it stopped.
EXIT_CODES: tuple[ExitCode, ...] = (
    ExitCode(ConfigError, 2, "a config key or value, or what it names that is not there: a model, a weights "
                             "file, an optimizer, a CUDA device; an involution backend in $REDNET_INVOLUTION_BACKEND "
                             "that does not exist or cannot run on the device"),
    ExitCode(UsageError, 2, "a command-line option (a path holding a name over 255 bytes included)"),
    ExitCode(DataError, 2, "a dataset: a split in which no image decodes, a folder reached twice through symlinks, "
                           "classes that differ from the model's"),
    ExitCode(CheckpointError, 2, "a checkpoint or weights file that is missing, unreadable, damaged, unsafe or does "
                                 "not fit (a resume on data of other class names included); a run directory whose "
                                 "results the command would overwrite, that another trainer holds (`RunDirBusy`), or "
                                 "whose disk, quota or file-size limit is full (`NoSpaceError`)"),
    ExitCode(OutputDirError, 2, "a run directory, results folder or output file that cannot be written"),
    ExitCode(NonFiniteLossError, 3, "the loss became NaN or infinite; the last good checkpoint stays as it was"),
    ExitCode(TrainingInterrupted, 128, "signal N stopped training, after a checkpoint: 129 SIGHUP, 130 SIGINT, "
                                       "138 SIGUSR1, 143 SIGTERM (Linux's numbers)"),
    ExitCode(KeyboardInterrupt, 130, "Ctrl-C outside the training loop (before it starts, during eval): "
                                     "nothing to save"),
)


def exit_code(error: BaseException) -> int:
    """The exit status ``EXIT_CODES`` gives ``error`` (128 + the signal's number for ``TrainingInterrupted``)."""
    code = next(row.code for row in EXIT_CODES if isinstance(error, row.error))
    return code + int(error.signum) if isinstance(error, TrainingInterrupted) else code


def fail(message: object) -> int:
    """Print what to fix as one ``error:`` line on stderr (no traceback); return exit status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def run_command(command: Callable[[], int], *, log: bool = False, interrupted: str = "interrupted by SIGINT") -> int:
    """Run a tool's body and end each error of ``EXIT_CODES`` with its exit status and one line.

    Args:
        command: the tool's body; returns its exit status.
        log: first send log lines to stdout (rank 0 at INFO, other ranks of a torchrun job warnings only).
        interrupted: the line a Ctrl-C outside the training loop prints (the trainer checkpoints on its own).
    """
    try:
        if log:
            setup_logging(int(os.environ.get("RANK", "0")))
        return command()
    except tuple(row.error for row in EXIT_CODES) as e:
        if isinstance(e, KeyboardInterrupt):
            print(interrupted, file=sys.stderr)
        elif isinstance(e, TrainingInterrupted):
            _logger.warning("%s", e)
        elif isinstance(e, NonFiniteLossError):
            _logger.error("error: %s", e)
        else:
            fail(e)
        return exit_code(e)


def list_configs() -> int:
    """Print the bundled configs (``--list-configs``), one line each: name and description."""
    for name, description in bundled_configs().items():
        print(f"{name:<16} {description}")
    return 0


def check_path_options(args: argparse.Namespace, options: Iterable[str]) -> None:
    """A UsageError naming the first of the path ``options`` given as an empty string (it would mean "here" or
    "unset"), or with a file or folder name longer than file systems take (it fails every open: ENAMETOOLONG).

    Args:
        args: the parsed options.
        options: the names of its path options (``dest``), e.g. ``("config", "output", "data")``.
    """
    for option in options:
        value = getattr(args, option)
        if value is None or "://" in str(value):  # unset, or a URL (its name is no file name: see models._hub)
            continue
        flag = f"--{option.replace('_', '-')}"
        if str(value) == "":
            raise UsageError(f"{flag} is empty; give a path")
        part = overlong_component(value)
        if part is not None:
            raise UsageError(describe_overlong(flag, part))


def check_device_option(device: str, option: str = "--device") -> None:
    """A UsageError when ``device`` is a CUDA device and torch sees none, or a ConfigError when
    ``$REDNET_INVOLUTION_BACKEND`` cannot run on it: said as the command starts, not at the first forward pass.

    Args:
        device: the device the command will run on (``cpu``, ``cuda``, ``cuda:1``, ``meta``).
        option: the option that named it, for the message.
    """
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise UsageError(f"bad {option} {device!r}: {e}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option} {device}: no CUDA device is visible to torch; use {option} cpu")
    check_involution_backend(device)


def path_values(args: argparse.Namespace, keys: Mapping[str, str]) -> dict[str, str]:
    """The path options given, as config values taken as typed: ``--output 2024`` is a folder, not a number.

    Args:
        args: the parsed options.
        keys: option name -> the dotted config key it sets, e.g. ``{"output": "train.output"}``.
    """
    return {key: getattr(args, option) for option, key in keys.items() if getattr(args, option) is not None}
