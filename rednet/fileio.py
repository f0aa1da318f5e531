"""File plumbing shared by weights files (``rednet.models``) and training checkpoints
(``rednet.engine``): the one error type for both, hashing, and atomic writes.

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

__all__ = ["CheckpointError", "atomic_temp_pattern", "atomic_write", "file_sha256"]


class CheckpointError(RuntimeError):
    """A weights file or training checkpoint could not be read, is unsafe, or does not fit."""


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
