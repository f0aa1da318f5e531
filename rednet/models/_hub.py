"""Local paths and URLs of weights files (``resolve_source``): a URL is downloaded into torch.hub's
cache (``_cache``, ``_download``) and checked against an expected sha256.

An expected digest comes from the ``sha256`` argument or, for a bare URL
(``create_model(name, pretrained=URL)``, a tool's ``--pretrained URL``), from a pip-style
fragment: ``https://host/weights.pth#sha256=<hex>``. A cached file that fails an expected
digest is not deleted (it may be exactly what another caller verified): it is downloaded again
and replaced only if the fresh copy matches. URLs appear in messages and logs through
``redact_url`` (``_urls``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..fileio import CheckpointError, file_sha256
from ._cache import cache_path, check_readable
from ._download import deadline_setting, download, download_timeout
from ._urls import normalise_sha256, redact_url, split_sha256

__all__ = ["resolve_source"]

_logger = logging.getLogger(__name__)


def resolve_source(
    source: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float | None = None,
    deadline: float | None = None,
) -> Path:
    """A local file for ``source``, downloading a URL into the cache first.

    Args:
        source: a local path or a URL (``https://``, ``http://``, ``file://``); a URL may end
            in ``#sha256=<hex>``.
        sha256: expected digest (or a prefix of it), if known.
        progress: show a progress bar while downloading.
        timeout: seconds to wait for the server to connect or send more data; None reads
            ``$REDNET_DOWNLOAD_TIMEOUT`` (default 30).
        deadline: seconds the whole download may take; None reads ``$REDNET_DOWNLOAD_DEADLINE``
            (default: scaled to the announced length, see ``download_deadline``).

    Raises:
        FileNotFoundError: a local path that does not exist.
        CheckpointError: a failed, stalled or too slow download, a cache folder that cannot be
            written, or a digest mismatch.
        ValueError: a digest that is not hexadecimal, or a timeout or deadline that is not positive.
    """
    text = os.fspath(source)
    expected = normalise_sha256(sha256, "sha256") if sha256 else None
    if "://" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights not found: {path} (pass an existing file or a URL)")
        if expected:
            actual = file_sha256(path)
            if not actual.startswith(expected):
                raise CheckpointError(f"{path}: sha256 mismatch, expected {expected}, got {actual}")
        return path
    url, in_url = split_sha256(text)
    expected = _merge_expected(expected, in_url, url)
    path = cache_path(url)
    if path.is_file():
        check_readable(path, url)
        if not expected:
            return path
        actual = file_sha256(path)
        if actual.startswith(expected):
            return path
        # Not deleted: another caller may have verified this very file against its own digest.
        _logger.warning("%s: the cached %s has sha256 %s, not %s; downloading it again to check",
                        redact_url(url), path.name, actual, expected)
    download(url, path, expected, progress, download_timeout(timeout), deadline_setting(deadline))
    return path


def _merge_expected(given: str | None, in_url: str | None, url: str) -> str | None:
    if given and in_url and not (given.startswith(in_url) or in_url.startswith(given)):
        raise ValueError(f"two different sha256 for {redact_url(url)}: {given} (argument) and {in_url} "
                         "(URL fragment)")
    return max(given or "", in_url or "", key=len) or None
