"""Shared libraries compiled from one C++ source at first use, cached on disk, and loaded.

A ``NativeLibrary`` names a source and its compiler flags; ``load`` returns it loaded with
ctypes, ``open_library`` hands a path to another loader (ONNX Runtime's custom-op
registration, say). The first use on a machine compiles it with the system compiler
(``$CXX``, else ``g++``); every later process of the same user, DDP ranks included, loads
the cached file.

An entry is ``<name>-<key>.so`` in the cache root (``_cache_files``). The key hashes the
source, the flags, ``depends_on``, the compiler's own description of itself and of
``-march=native`` on this CPU, and the user, so a changed source, compiler or machine
builds anew, and each user builds their own entries.

What may be loaded, in a folder other users may write to (``_cache_files``):

- only a file this user owns and nobody else can write, opened without following a link
  and loaded through that open file (``/proc/self/fd/N``), so the bytes checked are the
  bytes mapped;
- only a file whose bytes match the size and sha256 its build appended as a trailer (the
  dynamic loader ignores bytes past the ELF image): a library cut short, or cut in half,
  which would otherwise pin every run to the reference or kill it with SIGBUS when
  mapped, is rebuilt instead.

Builders of one entry serialise on ``<name>-<key>.lock``, opened without following a link
and never written. The compiler writes into a private temporary folder, never into the
shared one (a link planted there in time would make it write wherever it points); the
result is copied into a new file of the cache (``O_EXCL``, permissions from the umask,
never writable by group or others) and renamed over the entry. The next build removes
what an interrupted one left in either place. Where the cache cannot be written, the
process loads its own build from a private file.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import secrets
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from ._cache_files import UntrustedFile, cache_root, open_trusted, read_all, user, why_untrusted

try:
    import fcntl
except ImportError:  # not POSIX: concurrent builders each build and rename
    fcntl = None

__all__ = ["NativeLibrary", "compiler", "describe_compiler", "hold", "library_path", "load", "open_library"]

_logger = logging.getLogger(__name__)

_COMPILE_TIMEOUT_S = 300
# Appended to every library built here: a magic, the size of the library before it and its sha256.
_TRAILER = struct.Struct("<16sQ32s")
_MAGIC = b"rednet-native-1\n"


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
    """The cache entry of ``lib`` built by ``cxx`` on this CPU for this user (raises OSError without a compiler)."""
    h = hashlib.sha256()
    depends_on = [lib.depends_on.encode()] if lib.depends_on else []
    for part in (lib.source, " ".join(lib.flags).encode(), *depends_on, describe_compiler(cxx).encode(),
                 str(user()).encode()):
        h.update(hashlib.sha256(part).digest())
    return cache_root() / f"{lib.name}-{h.hexdigest()[:20]}.so"


def _checked_or_built(lib: NativeLibrary) -> tuple[int, Path | None]:
    """An open descriptor of ``lib``'s checked file, built first where needed, and the private copy
    it is (None: the cache entry)."""
    cxx = compiler()
    if shutil.which(cxx) is None:
        raise OSError(f"no C++ compiler: {cxx!r} not found (install g++ or set $CXX)")
    path = library_path(lib, cxx)
    opened = _open_checked(path, quiet=False)
    return opened if opened is not None else _build(lib, cxx, path)


def _fd_path(fd: int, fallback: Path) -> str:
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(fallback)


@contextlib.contextmanager
def open_library(lib: NativeLibrary) -> Iterator[str]:
    """Build ``lib`` if it is not cached (or not usable), and give the path a loader should open, valid
    inside the block: it names the very file that was checked.

    Raises:
        OSError: no compiler, or the build failed (with the compiler's message).
        subprocess.SubprocessError: the compiler timed out.
    """
    fd, private = _checked_or_built(lib)
    try:
        yield _fd_path(fd, private or library_path(lib, compiler()))
    finally:
        os.close(fd)
        if private is not None:
            private.unlink(missing_ok=True)


# Descriptors of the libraries this process loaded, open until it exits. The dynamic loader
# knows a library by the path it was opened with: were ``/proc/self/fd/N`` closed and N given
# to another library's file, a later dlopen of that path would return the first library.
_held_fds: list[int] = []


def hold(lib: NativeLibrary) -> str:
    """Build ``lib`` if needed and keep its checked file open for the life of the process; a path
    naming that open file, for this process's loaders (ctypes, ONNX Runtime's registration).

    Raises as ``open_library``.
    """
    fd, private = _checked_or_built(lib)
    path = _fd_path(fd, private or library_path(lib, compiler()))
    if private is not None and path.startswith("/proc/"):
        private.unlink(missing_ok=True)  # the open descriptor keeps the file
    _held_fds.append(fd)
    return path


def load(lib: NativeLibrary) -> ctypes.CDLL:
    """``lib`` loaded with ctypes, built first if it is not cached (raises as ``open_library``)."""
    return ctypes.CDLL(hold(lib))


# ----------------------------------------------------------------------------------------
# Checking an entry.


def _trailer(binary: bytes) -> bytes:
    return _TRAILER.pack(_MAGIC, len(binary), hashlib.sha256(binary).digest())


def _why_damaged(data: bytes) -> str:
    """Why ``data`` is not a complete library as built here; '' when it is."""
    if len(data) < _TRAILER.size:
        return f"it is {len(data)} bytes long, too short for a library"
    magic, size, digest = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    if magic != _MAGIC:
        return "it lacks the record its build appends (cut short, or built by another version)"
    if size != len(data) - _TRAILER.size:
        return f"it holds {len(data) - _TRAILER.size} bytes where its build recorded {size}"
    if hashlib.sha256(memoryview(data)[:size]).digest() != digest:
        return "its sha256 differs from the one its build recorded"
    return ""


def _open_checked(path: Path, quiet: bool) -> tuple[int, None] | None:
    """A descriptor of the entry when this user may load it; None (and a warning, unless ``quiet``) otherwise."""
    try:
        fd = open_trusted(path)
    except UntrustedFile as e:
        if not quiet:
            _logger.warning("involution: ignoring %s; building this user's own", e)
        return None
    except OSError as e:
        if not quiet:
            _logger.warning("involution: cannot open %s (%s); building it again", path, e)
        return None
    if fd is None:
        return None
    why = _why_damaged(read_all(fd))
    if why:
        os.close(fd)
        if not quiet:
            _logger.warning("involution: %s is damaged (%s); building it again", path, why)
        return None
    return fd, None


# ----------------------------------------------------------------------------------------
# Building one.


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Hold the entry's lock inside the block; yields whether it is held (building goes on without it)."""
    lock = path.with_suffix(".lock")
    try:
        # Never O_TRUNC nor a write: the lock is only flock()ed. 0600: no one else can open it to hold it.
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        why = "it is a symbolic link" if e.errno == errno.ELOOP else str(e)
        _logger.warning("involution: not locking %s (%s); building without the lock", lock, why)
        yield False
        return
    try:
        why = why_untrusted(os.fstat(fd))
        if why or fcntl is None:
            if why:
                _logger.warning("involution: not locking %s (it is %s); building without the lock", lock, why)
            yield False
        else:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
    finally:
        os.close(fd)


def _build_dir_prefix(path: Path) -> str:
    # Names this entry's build folders in the temporary folder, so the next build finds leftovers.
    return f"rednet-build-{hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:16]}-"


def _remove_leftovers(path: Path) -> None:
    """Remove what an interrupted build of this entry left (under the entry's lock: no other build runs)."""
    tmp_root = Path(tempfile.gettempdir())
    for p in [*path.parent.glob(f".{path.name}.*.tmp"), *tmp_root.glob(f"{_build_dir_prefix(path)}*")]:
        try:
            st = p.lstat()
            if st.st_uid != user():
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(p)
            else:
                p.unlink()
            _logger.debug("involution: removed %s, left by an interrupted build", p)
        except OSError:
            pass


def _compile(lib: NativeLibrary, cxx: str, path: Path) -> bytes:
    """The library's bytes, compiled in a private temporary folder."""
    with tempfile.TemporaryDirectory(prefix=_build_dir_prefix(path)) as tmp:
        out = os.path.join(tmp, "lib.so")
        cmd = [cxx, *lib.flags, "-x", "c++", "-", "-o", out]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, input=lib.source, capture_output=True, timeout=_COMPILE_TIMEOUT_S)
        if res.returncode != 0:
            raise OSError(f"`{' '.join(cmd)}` failed: {res.stderr.decode(errors='replace').strip()[-2000:]}")
        _logger.debug("built %s in %.1f s", path, time.perf_counter() - t0)
        return Path(out).read_bytes()


def _write_new(path: Path, data: bytes) -> None:
    """Write ``data`` into ``path``, which must not exist yet (so no link there is followed).

    0755 less the umask, as a linker leaves a library, but never writable by group or
    others: such a file is not loaded.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o755)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o022:
            os.fchmod(fd, mode & ~0o022)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(path: Path, data: bytes) -> None:
    """Put ``data`` under ``path`` atomically: readers see the old entry or the whole new one."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        _write_new(tmp, data)
        os.replace(tmp, path)  # a link under the entry's name is replaced, not followed
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _private_copy(data: bytes) -> tuple[int, Path]:
    """A descriptor (and the name) of ``data`` in a new file of the private temporary folder."""
    fd, name = tempfile.mkstemp(prefix="rednet-", suffix=".so")
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    return fd, Path(name)


def _build(lib: NativeLibrary, cxx: str, path: Path) -> tuple[int, Path | None]:
    """Build the entry; a descriptor of the checked library, and the private file to remove after, if any."""
    with contextlib.suppress(OSError):  # an unwritable cache fails below, and the build goes on privately
        path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path) as locked:
        if locked:
            opened = _open_checked(path, quiet=True)
            if opened is not None:  # another process built it while this one waited
                return opened
            _remove_leftovers(path)
        binary = _compile(lib, cxx, path)
        data = binary + _trailer(binary)
        try:
            _install(path, data)
        except OSError as e:
            _logger.warning("involution: cannot write %s (%s); this process loads its own build", path, e)
        else:
            opened = _open_checked(path, quiet=False)
            if opened is not None:
                return opened
        return _private_copy(data)
