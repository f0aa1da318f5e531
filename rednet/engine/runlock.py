"""The run directory's lock: one trainer writes to a run directory at a time (``RunDir.lock``).

Its rank 0 holds an exclusive ``flock`` on ``.lock`` from before ``resume.plan_start`` reads
the directory until the process exits, and a second trainer is refused (``RunDirBusy``) with
the holder's host, pid and start time. The kernel releases an flock when its holder dies,
however it dies, so there is no stale lock to break: a ``.lock`` that still names a holder but
is free means that holder was killed or crashed, and the next trainer takes it over and says
so. Leftovers of interrupted writes are removed only under the lock (``RunDir.remove_orphans``),
so a second start can never delete the temporary file of a checkpoint the first is writing.

Where the file system refuses flock (some Lustre mounts, ENOSYS or EINVAL), the trainer warns
that nothing keeps two trainers apart and goes on without the lock, and without removing
leftovers. On NFSv4, Linux turns flock into a POSIX lock the server arbitrates between
clients; Lustre mounted with ``-o localflock`` locks per node only, which nothing here can tell.
"""
from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..fileio import no_space_error
from .checkpoint import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

__all__ = ["RunDirBusy", "holds_lock", "take_lock"]

_logger = logging.getLogger("rednet")


class RunDirBusy(CheckpointError):
    """Another process holds the run directory's lock: a trainer is running there."""


def holds_lock(path: Path) -> bool:
    """Whether this process holds the lock of the run directory ``path``."""
    return _lock_key(path) in _HELD


def take_lock(path: Path, lock_file: Path) -> bool:
    """Take the lock of the run directory ``path`` (which exists) through ``lock_file``; see ``RunDir.lock``."""
    key = _lock_key(path)
    if key in _HELD:
        return True
    if fcntl is None:
        _logger.warning("no flock on this platform: nothing keeps two trainers from writing to %s at once", path)
        return False
    try:
        fd, writable = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666), True
    except PermissionError:  # a teammate's lock file (0644): flock needs only reading
        fd, writable = os.open(lock_file, os.O_RDONLY), False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirBusy(f"{path} is in use by another trainer ({_describe_holder(holder)}); wait for it to "
                             "end or stop it, or train in another --output") from None
        if e.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOLCK):
            _logger.warning("cannot lock %s (flock: %s; the file system does not support it, e.g. Lustre "
                            "mounted without -o flock): nothing keeps a second trainer from writing there at the "
                            "same time, and leftovers of interrupted writes are not removed", lock_file,
                            e.strerror)
            return False
        raise
    previous = _read_holder(fd)
    if previous and (previous.get("host"), previous.get("pid")) != (socket.gethostname(), os.getpid()):
        _logger.warning("taking over the lock of %s from %s: that trainer is gone (killed or crashed; the lock "
                        "goes with its process)", path, _describe_holder(previous))
    text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode()
    try:
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text + b"\n", 0)
    except OSError as e:
        os.close(fd)
        full = no_space_error(e, lock_file)
        if full is None:
            raise
        raise full from None
    _HELD[key] = fd
    return True


# The run directories whose lock this process holds: their real path -> the lock file's descriptor.
_HELD: dict[str, int] = {}


def _lock_key(path: Path) -> str:
    return os.path.realpath(path)


def _read_holder(fd: int) -> dict[str, Any]:
    """Who a lock file says holds it; empty if it says nothing (never held, released, or just taken)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that has not yet written who it is: it is just starting"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, running since {holder.get('started')}"


def _release_at_exit() -> None:
    # An ended trainer's lock file names nobody: one that still names a holder tells the next
    # trainer that its holder was killed. The kernel releases the locks themselves.
    for fd in _HELD.values():
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass


def _forget_in_child() -> None:
    # A forked child shares the parent's lock; closing its copy keeps the lock the parent's alone.
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


atexit.register(_release_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
