"""File plumbing shared by weights files (``rednet.models``), training checkpoints
(``rednet.engine``) and the tools: the one error type for both, hashing, atomic writes, and the
checks that an output folder or file can be written and that a path's names are not too long.

New files get the mode every other program gives them: 0666 less the umask (0644 under
the usual umask 022), so that teammates can read results. ``tempfile.mkstemp`` would make
them 0600 whatever the umask, and a rename keeps that mode.

A leaf: it imports nothing from ``rednet``, so the engine's checkpoint code can use it
without importing the models or timm.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional

__all__ = [
    "STDOUT",
    "CheckpointError",
    "NoSpaceError",
    "OutputDirError",
    "atomic_temp_pattern",
    "atomic_write",
    "check_output_dir",
    "check_output_file",
    "describe_overlong",
    "file_sha256",
    "new_temp_file",
    "no_space_error",
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


class NoSpaceError(CheckpointError):
    """A file could not be written: its file system or quota is full, or it reached the file-size limit.

    A ``CheckpointError``, so that every tool reports it as bad input: one line, exit status 2.

    Args:
        message: what was not written, where, and the space free there.
        code: the write's errno (ENOSPC, EDQUOT, EFBIG); ``errno`` and ``strerror`` as an ``OSError`` has them.
    """

    def __init__(self, message: str, code: Optional[int] = None):
        super().__init__(message)
        self.errno, self.strerror = code, os.strerror(code) if code is not None else None


def _file_size_limit() -> str:
    try:
        import resource
    except ImportError:  # not on Windows
        return "unknown"
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft:,} bytes"


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if free >= size:
            return f"{free / size:.1f} {unit} free there"
    return f"{free} bytes free there"


def _no_space(code: int, folder: Path) -> str:
    """What stopped a write, with the space left in ``folder``, and what to do."""
    free = _free_space(folder)
    if code == errno.EFBIG:
        return (f"the file reached the largest size this process may write (ulimit -f: {_file_size_limit()}) or the "
                f"file system allows ({free}); raise the limit, or write elsewhere")
    what = "the disk quota is exceeded" if code == errno.EDQUOT else "no space left on the device"
    return f"{what} ({free}); make room there, or write elsewhere"


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_space_error(exc: BaseException, path: str | os.PathLike) -> Optional[NoSpaceError]:
    """The ``NoSpaceError`` that ``exc`` stands for while writing ``path``, or None if it is another error.

    ``exc`` itself, or an exception it was raised from or while handling: ``torch.save`` turns
    the ``OSError`` of a failed write into a ``RuntimeError`` about the zip archive.

    Args:
        exc: what writing ``path`` raised.
        path: the file being written; the message names its folder and the space free there.
    """
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            path = Path(path)
            return NoSpaceError(f"cannot write {path.name} in {path.parent}: {_no_space(e.errno, path.parent)}",
                                e.errno)
        e = e.__cause__ or e.__context__
    return None


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


def new_temp_file(folder: str | os.PathLike, prefix: str, suffix: str) -> tuple[int, Path]:
    """Create a new file ``<prefix><random><suffix>`` in ``folder``, open for reading and writing.

    ``tempfile.mkstemp`` without its fixed mode 0600: the file gets 0666 less the umask, as
    the kernel gives any new file, so that what is renamed into place from it can be shared.

    Returns:
        the file descriptor and the file's path.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = Path(folder) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary file name {prefix}*{suffix} in {folder}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    An interrupted write never leaves a truncated file under ``path``: it holds either its
    old content or the complete new one. A failed write removes its temporary file.

    Raises:
        NoSpaceError: the file system or quota is full, or the file reached the file-size limit.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = new_temp_file(path.parent, f"{_TEMP_PREFIX}{path.name}.", _TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's wrapping of a failed write
        full = no_space_error(e, path)
        if full is None:
            raise
        raise full from None
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


def _check_given(path: str | os.PathLike, what: str, give: str) -> None:
    """A path as the user gave it: not empty, and no name in it longer than a file system takes."""
    if str(path) == "":
        raise OutputDirError(f"{what} is empty; give {give}")
    part = overlong_component(path)
    if part is not None:
        raise OutputDirError(describe_overlong(f"{what} {path}", part))


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
    _check_given(path, what, "a folder")
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
    _check_given(path, what, "a file name")
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
