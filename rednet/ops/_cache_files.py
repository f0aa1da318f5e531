"""The one folder both compiled caches live under, and which of its files a process may trust.

The native CPU libraries (``_native_build``) sit in the cache root, the CUDA kernel binaries
(``_kernel_cache``) in its ``kernels`` subfolder.

The folder may be shared, even writable by everyone (a team's ``$REDNET_CACHE_DIR``), so
another user can leave any file, link or folder under any name in it. A compiled library
runs as whoever loads it, so a process only trusts what its own user wrote: a regular file
this user owns that neither group nor others can write, opened without following a symbolic
link and then read (or loaded) through that one open file, never by its name again.

A digest recorded at build time could only let a user load another's entry if this user had
recorded it, i.e. built the same entry already, so entries are per user instead: each key
holds the user id (``user``), every user builds their own entries once per machine, and a
file under one of those names that another user left there is ignored and replaced.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["CACHE_ENV", "UntrustedFile", "cache_root", "open_trusted", "read_all", "user", "why_untrusted"]

CACHE_ENV = "REDNET_CACHE_DIR"


class UntrustedFile(OSError):
    """A cache file this process must not read: a link, not a file, another user's, or writable by others."""


def cache_root() -> Path:
    """``$REDNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/rednet``, else ``~/.cache/rednet``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rednet"


def user() -> int:
    """The user whose entries this process reads and writes (part of every cache key)."""
    return os.geteuid()


def why_untrusted(st: os.stat_result) -> str:
    """Why a file with this status must not be trusted; '' when it may."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != user():
        return f"owned by uid {st.st_uid}, not by this user (uid {user()})"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def open_trusted(path: Path) -> int | None:
    """A read-only descriptor of ``path`` when it may be trusted; None when there is no such file.

    Raises:
        UntrustedFile: ``path`` is a symbolic link, not a regular file, another user's, or
            writable by group or others (the message says which).
    """
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UntrustedFile(f"{path} is a symbolic link") from None
        raise
    why = why_untrusted(os.fstat(fd))
    if why:
        os.close(fd)
        raise UntrustedFile(f"{path} is {why}")
    return fd


def read_all(fd: int) -> bytes:
    """The whole content of the open file ``fd``, from its start."""
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while True:
        chunk = os.pread(fd, max(size - offset, 1 << 16), offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)
