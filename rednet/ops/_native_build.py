"""Shared libraries compiled from one C++ source at first use, cached on disk, and loaded.

A ``NativeLibrary`` names a source and its compiler flags; ``load`` returns it loaded with
ctypes, ``open_library`` hands a path to another loader (ONNX Runtime's custom-op
registration, say). The first use on a machine compiles it with the system compiler
(``$CXX``, else ``g++``); every later process, DDP ranks included, loads the cached file.

An entry is ``<name>-<key>.so`` in the cache root (``_cache_files``). The key hashes the
source, the flags, ``depends_on`` and the compiler's own description of itself and of
``-march=native`` on this CPU, so a changed source, compiler or machine builds anew.
Concurrent builders serialise on ``<name>-<key>.lock``; the library is compiled into a
temporary file and renamed into place.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from ._cache_files import cache_root

__all__ = ["NativeLibrary", "compiler", "describe_compiler", "library_path", "load", "open_library"]

_logger = logging.getLogger(__name__)

_COMPILE_TIMEOUT_S = 300


class NativeLibrary(NamedTuple):
    """A shared library built from one C++ source.

    Args:
        name: the stem of its cache entries, e.g. ``'involution_cpu'``.
        source: the C++ source; the compiler reads it on stdin, so the library is built from
            exactly the bytes the key hashes.
        flags: compiler flags, ``-shared -fPIC`` included.
        depends_on: anything else the library depends on that the key must follow (the
            version of headers outside the source, say).
    """

    name: str
    source: bytes
    flags: tuple[str, ...]
    depends_on: str = ""


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else ``g++``."""
    return os.environ.get("CXX") or "g++"


def describe_compiler(cxx: str) -> str:
    """The compiler's version and what ``-march=native`` resolves to here (its ``-v`` output).

    Raises OSError when the compiler cannot be run.
    """
    res = subprocess.run([cxx, "-march=native", "-E", "-v", "-x", "c++", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise OSError(f"{cxx} -march=native -E -v failed: {res.stderr.strip()[-500:]}")
    return res.stderr


def library_path(lib: NativeLibrary, cxx: str) -> Path:
    """The cache entry of ``lib`` built by ``cxx`` on this CPU (raises OSError without a compiler)."""
    h = hashlib.sha256()
    depends_on = [lib.depends_on.encode()] if lib.depends_on else []  # none: the same key as before there was any
    for part in (lib.source, " ".join(lib.flags).encode(), *depends_on, describe_compiler(cxx).encode()):
        h.update(hashlib.sha256(part).digest())
    return cache_root() / f"{lib.name}-{h.hexdigest()[:20]}.so"


def _build(lib: NativeLibrary, cxx: str, path: Path) -> None:
    """Compile ``lib`` into ``path``: under a lock, into a temporary file, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        try:
            import fcntl  # POSIX only; elsewhere concurrent builders each build and rename

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:
            pass
        if path.exists():  # another process built it while this one waited
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            cmd = [cxx, *lib.flags, "-x", "c++", "-", "-o", tmp]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, input=lib.source, capture_output=True, timeout=_COMPILE_TIMEOUT_S)
            if res.returncode != 0:
                raise OSError(f"`{' '.join(cmd)}` failed: {res.stderr.decode(errors='replace').strip()[-2000:]}")
            os.replace(tmp, path)
            _logger.debug("built %s in %.1f s", path, time.perf_counter() - t0)
        finally:
            Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def open_library(lib: NativeLibrary) -> Iterator[str]:
    """Build ``lib`` if it is not cached, and give the path a loader should open, valid inside the block.

    Raises:
        OSError: no compiler, or the build failed (with the compiler's message).
        subprocess.SubprocessError: the compiler timed out.
    """
    cxx = compiler()
    if shutil.which(cxx) is None:
        raise OSError(f"no C++ compiler: {cxx!r} not found (install g++ or set $CXX)")
    path = library_path(lib, cxx)
    if not path.exists():
        _build(lib, cxx, path)
    yield str(path)


def load(lib: NativeLibrary) -> ctypes.CDLL:
    """``lib`` loaded with ctypes, built first if it is not cached (raises as ``open_library``)."""
    with open_library(lib) as path:
        return ctypes.CDLL(path)
