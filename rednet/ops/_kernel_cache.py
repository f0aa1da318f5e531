"""Compiled kernel binaries on disk, shared by every process of a machine (DDP ranks, later runs).

CuPy 13.x and 14.0 do not read their own disk cache for modules compiled with name
expressions, so without this every process recompiled each module (seconds per dtype).
An entry is one file, ``<key>.bin`` in the ``kernels`` folder of the cache root
(``_cache_files``: ``$REDNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/rednet``, else
``~/.cache/rednet``): a magic line, a one-line JSON header (the lowered name of each name
expression, the binary's size and sha256) and the binary (cubin, or PTX when CuPy compiles
to PTX).

The key hashes everything the binary depends on: the source, the compile options, the
target architecture, the name expressions, and the CuPy and NVRTC versions, and the user:
entries are per user (``_cache_files`` says why). Entries are written with
``rednet.fileio.atomic_write`` (a temporary file renamed over the entry, which replaces a
link under that name instead of following it), so concurrent ranks that compile the same
module at once each write a complete file and a reader sees the old entry, no entry, or a
complete one. A file that is not this user's to trust (``_cache_files.open_trusted``), does
not decode, or whose checksum is wrong is a miss: the caller recompiles and rewrites it.

Pure Python: no CuPy, no device; the tests drive it with a fake compiler.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from ..fileio import atomic_write
from ._cache_files import CACHE_ENV, UntrustedFile, cache_root, open_trusted, read_all, user

__all__ = ["CACHE_ENV", "Entry", "cache_dir", "entry_key", "load", "store"]

_logger = logging.getLogger(__name__)

# Part of every key and of every file: bump it when the layout or the key's contents change,
# so older entries are simply never looked up again.
_FORMAT = 1
_MAGIC = b"rednet kernel binary %d\n" % _FORMAT


class Entry(NamedTuple):
    """A compiled module: its binary and the lowered (mangled) name of each name expression."""

    binary: bytes
    names: dict[str, str]


def cache_dir() -> Path:
    """The ``kernels`` folder of the cache root (``_cache_files.cache_root``)."""
    return cache_root() / "kernels"


def entry_key(source: str, options: Sequence[str], arch: str, names: Sequence[str],
              versions: Mapping[str, str]) -> str:
    """Hex digest naming the entry of one module; changes with anything the binary depends on."""
    fields = {
        "format": _FORMAT,
        "source": hashlib.sha256(source.encode()).hexdigest(),
        "options": list(options),  # in order: NVRTC options can depend on it
        "arch": arch,
        "names": sorted(names),
        "versions": dict(sorted(versions.items())),
        "user": user(),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _path(key: str) -> Path:
    return cache_dir() / f"{key}.bin"


def encode(entry: Entry) -> bytes:
    header = {"names": entry.names, "size": len(entry.binary), "sha256": hashlib.sha256(entry.binary).hexdigest()}
    return _MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + entry.binary  # JSON has no raw newline


def decode(data: bytes, names: Sequence[str]) -> Entry | None:
    """The entry in ``data`` if it is complete, intact and holds exactly ``names``; else None."""
    if not data.startswith(_MAGIC):
        return None
    header, newline, binary = data[len(_MAGIC):].partition(b"\n")
    if not newline:
        return None
    try:
        meta = json.loads(header)
    except ValueError:  # also UnicodeDecodeError
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("names"), dict):
        return None
    lowered = meta["names"]
    if set(lowered) != set(names) or not all(isinstance(v, str) and v for v in lowered.values()):
        return None
    if meta.get("size") != len(binary) or meta.get("sha256") != hashlib.sha256(binary).hexdigest():
        return None
    return Entry(binary, dict(lowered))


def load(key: str, names: Sequence[str]) -> Entry | None:
    """The cached entry ``key``, or None when there is none or it is unusable (then it is recompiled)."""
    path = _path(key)
    try:
        fd = open_trusted(path)
        if fd is None:
            return None
        try:
            data = read_all(fd)
        finally:
            os.close(fd)
    except UntrustedFile as e:
        _logger.warning("involution kernel cache: ignoring %s; compiling this user's own", e)
        return None
    except OSError as e:
        _logger.debug("involution kernel cache: cannot read %s (%s); compiling", path, e)
        return None
    entry = decode(data, names)
    if entry is None:
        _logger.debug("involution kernel cache: %s is damaged or from another version; compiling again", path)
    return entry


def store(key: str, entry: Entry) -> Path | None:
    """Write ``entry`` atomically; returns its path, or None when the cache cannot be written.

    A cache that cannot be written (read-only home, full disk) only costs a compile per
    process, so it is logged, not raised.
    """
    path = _path(key)
    data = encode(entry)
    try:
        return atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        _logger.debug("involution kernel cache: cannot write %s (%s); set $%s to a writable folder",
                      path, e, CACHE_ENV)
        return None
