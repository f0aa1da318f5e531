"""The download cache: where a URL's file is kept, and the checks on what is there.

A URL is cached as ``cache_dir()/<first 12 hex of sha256(url)>-<file name>``: two URLs that
end in the same file name (``.../a/weights.pth``, ``.../b/weights.pth``) get two entries,
and the name stays readable. A file name that cannot be one on disk (a control character
or NUL after percent-decoding, or too long with the prefix and a download's ``.partial``
suffix for the file system's 255 bytes) is replaced by the hash: ``<12 hex><.suffix>``.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from ..fileio import CheckpointError
from ._urls import redact_url, split_sha256

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be deleted there, which protects live downloads instead
    fcntl = None

__all__ = ["cache_dir", "cache_path", "check_readable", "remove_stale_partials", "shown_name"]

_logger = logging.getLogger(__name__)

# One file name may hold 255 bytes (Linux, macOS, Windows); a download's partial file adds
# new_temp_file's 8 random characters and ".partial" to the entry's name.
_NAME_MAX = 255
_PARTIAL_EXTRA = len(".12345678.partial")
_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9_]{1,16}")


def cache_dir() -> Path:
    """Where downloads are kept: ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_path(url: str) -> Path:
    """The cache entry of ``url`` (its ``#sha256=`` fragment, if any, is ignored).

    ``<12 hex of sha256(url)>-<file name>``, or ``<12 hex><.suffix>`` when the file name
    cannot be one on disk (see the module's docstring).

    Raises:
        CheckpointError: the URL's path has no file name.
    """
    bare, _ = split_sha256(url)
    # The full URL picks the entry; the file name only keeps it readable.
    key = hashlib.sha256(bare.encode()).hexdigest()[:12]
    name = _file_name(bare)
    readable = f"{key}-{name}"
    if _is_safe_name(name) and len(readable.encode("utf-8", "surrogateescape")) + _PARTIAL_EXTRA <= _NAME_MAX:
        return cache_dir() / readable
    suffix = os.path.splitext(name)[1]
    # The suffix stays: timm reads a .safetensors file by its name.
    return cache_dir() / (key + (suffix if _SAFE_SUFFIX.fullmatch(suffix) else ""))


def _file_name(url: str) -> str:
    name = os.path.basename(unquote(urlparse(url).path))
    if not name:
        raise CheckpointError(f"cannot name a cache file after URL {redact_url(url)!r}: it has no file name")
    return name


def _is_safe_name(name: str) -> bool:
    # NUL cannot be in a path at all; other control characters would be in every message naming the file,
    # and a backslash separates folders on Windows.
    return not any(ord(c) < 32 or ord(c) == 127 or c == "\\" for c in name)


def shown_name(entry: Path) -> str:
    """The file name part of a cache entry, for a progress bar or a hint (``w.pth`` of ``<hex>-w.pth``)."""
    return entry.name.split("-", 1)[-1]


def check_readable(entry: Path, url: str) -> None:
    # A shared cache may hold another user's private file: say so here, not in a loader's traceback.
    try:
        with open(entry, "rb"):
            pass
    except OSError as e:
        raise CheckpointError(
            f"the cached download {entry} of {redact_url(url)} cannot be read ({e.strerror or e}); set TORCH_HOME "
            "to a cache of your own, or have the file made readable"
        ) from None


def remove_stale_partials(dest: Path) -> None:
    # Partials of the same entry left by killed downloads; one another process still writes is locked.
    for partial in dest.parent.glob(glob.escape(dest.name) + ".*partial"):  # <name>.partial, <name>.<x>.partial
        try:
            fd = os.open(partial, os.O_RDONLY)
        except OSError:
            continue
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            partial.unlink()  # on Windows this fails while its writer has it open
            _logger.info("removed %s, left by an interrupted download", partial)
        except OSError:
            pass  # locked: a download in progress
        finally:
            os.close(fd)
