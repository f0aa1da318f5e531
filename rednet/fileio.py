"""File plumbing shared by weights files (``rednet.models``), training checkpoints
(``rednet.engine``) and the tools: the one error type for both, hashing, atomic writes, and the
checks that an output folder or file can be written and that a path's names are not too long.

A leaf: it imports nothing from ``rednet``, so the engine's checkpoint code can use it
without importing the models or timm.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = [
    "STDOUT",
    "CheckpointError",
    "OutputDirError",
    "atomic_temp_pattern",
    "atomic_write",
    "check_output_dir",
    "check_output_file",
    "describe_overlong",
    "file_sha256",
    "overlong_component",
]

# The output "file" that means standard output, as a command's ``--json`` with no file stores it.
STDOUT = "-"

# The longest file or folder name, in bytes, that Linux, macOS and Windows file systems take.
NAME_MAX = 255


class CheckpointError(RuntimeError):
    """A weights file or training checkpoint could not be read, is unsafe, or does not fit."""


class OutputDirError(ValueError):
    """A folder that a command is to write into is empty, a file, or cannot be created or written."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ``atomic_write``'s temporary file beside ``NAME``: ``.NAME.<random>.tmp``. Written here
# only; whoever removes the leftovers of interrupted writes matches ``atomic_temp_pattern``.
_TEMP_PREFIX, _TEMP_SUFFIX = ".", ".tmp"


def atomic_temp_pattern(names: str) -> str:
    r"""A regex (``re.fullmatch``) for the temporary files an interrupted ``atomic_write`` leaves.

    Args:
        names: a regex of the file names whose temporary files to match, e.g. ``r"best\.pt"``.
    """
    return rf"{re.escape(_TEMP_PREFIX)}(?:{names})\.[^/]*{re.escape(_TEMP_SUFFIX)}"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    An interrupted write never leaves a truncated file under ``path``: it holds either its
    old content or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def overlong_component(path: str | os.PathLike) -> str | None:
    """The first component of ``path`` longer than a file or folder name may be (``NAME_MAX`` bytes), or None.

    Such a path fails every open and mkdir with ENAMETOOLONG; a command checks its paths for it
    up front to say which option and which part to shorten.
    """
    for part in Path(path).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            return part
    return None


def describe_overlong(what: str, part: str) -> str:
    """The message for ``overlong_component``'s answer ``part`` of the path given as ``what``."""
    shown = part if len(part) <= 40 else f"{part[:20]}...{part[-12:]}"
    return (f"{what}: the name {shown!r} is {len(os.fsencode(part))} bytes long, over the {NAME_MAX} a file or "
            "folder name may have; shorten it")


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Create the folder ``path`` if needed and check that files can be written in it.

    Called before a long job, so a run directory that cannot hold its checkpoints (or a
    results file that cannot be written) stops it at once rather than after an epoch.

    Args:
        path: the folder.
        what: how the user named it (``train.output``, ``--json``), for the message.

    Raises:
        OutputDirError: ``path`` is empty, is or lies under a file, or cannot be created or written.
    """
    if str(path) == "":
        raise OutputDirError(f"{what} is empty; give a folder")
    part = overlong_component(path)
    if part is not None:
        raise OutputDirError(describe_overlong(f"{what} {path}", part))
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            where = "is" if p == path else f"lies under {p}, which is"
            raise OutputDirError(f"{what} {path} {where} a file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OutputDirError(f"{what} {path} is not writable ({e.strerror or e}); choose another folder") from None
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Check, before the work whose result it is to hold, that the file ``path`` can be written.

    It may exist (it is then opened for writing, never written: its content stays until the result
    replaces it); its folder must take the temporary file the result is written through; a
    device or pipe (``/dev/stdout``) is written in place.

    Args:
        path: the file.
        what: how the user named it (``--json``, ``--output``), for the message.

    Raises:
        OutputDirError: ``path`` is empty or a folder, cannot be written, or its folder cannot take a file.
    """
    if str(path) == "":
        raise OutputDirError(f"{what} is empty; give a file name")
    part = overlong_component(path)
    if part is not None:
        raise OutputDirError(describe_overlong(f"{what} {path}", part))
    p = Path(path)
    if p.is_dir():
        raise OutputDirError(f"{what} {path} is a folder; give a file name")
    if p.exists() and not p.is_file():
        return p
    if p.exists():
        try:
            open(p, "r+b").close()
        except OSError as e:
            raise OutputDirError(f"{what} {path} cannot be written ({e.strerror or e}); choose another file") from None
    check_output_dir(p.resolve().parent, f"the folder of {what}")
    return p
