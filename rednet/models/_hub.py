"""Local paths and URLs of weights files: downloads into torch.hub's cache, sha256 checks."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch

from ..fileio import CheckpointError, file_sha256

__all__ = ["cache_dir", "resolve_source"]

_logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where downloads are kept: ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_source(source: str | os.PathLike, sha256: str | None = None, progress: bool = True) -> Path:
    """A local file for ``source``, downloading a URL into torch.hub's cache first.

    Downloads go through ``torch.hub.download_url_to_file``, which writes to a temporary
    file and only moves a complete, hash-verified download into place. A file already in
    the cache is not downloaded again.

    Args:
        source: a local path or a URL (``https://``, ``http://``, ``file://``).
        sha256: expected digest (or a prefix of it) to verify, if known.
        progress: show a progress bar while downloading.

    Raises:
        FileNotFoundError: a local path that does not exist.
        CheckpointError: a failed download or a digest mismatch.
    """
    text = os.fspath(source)
    if "://" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights not found: {path} (pass an existing file or a URL)")
        if sha256:
            _verify(path, sha256, delete=False)
        return path
    name = os.path.basename(urlparse(text).path)
    if not name:
        raise CheckpointError(f"cannot name a cache file after URL {text!r}: it has no file name")
    path = cache_dir() / name
    if path.is_file():
        if sha256:
            _verify(path, sha256, delete=True)
        return path
    _download(text, path, sha256, progress)
    return path


def _download(url: str, path: Path, sha256: str | None, progress: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _logger.info("downloading %s to %s", url, path)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=sha256, progress=progress)
    except RuntimeError as e:
        if "hash" in str(e):  # torch.hub removed the partial file; nothing bad is cached
            raise CheckpointError(f"sha256 mismatch downloading {url}: {e}; the download was discarded") from None
        raise
    except (URLError, OSError, ValueError) as e:
        raise CheckpointError(
            f"could not download {url} ({e}). Fetch it another way and pass the local path, "
            f"e.g. create_model(name, pretrained='/path/to/{path.name}')"
        ) from None


def _verify(path: Path, sha256: str, delete: bool) -> None:
    # delete: a cached download that fails its digest is removed so the next load fetches it afresh.
    actual = file_sha256(path)
    if not actual.startswith(sha256.lower()):
        if delete:
            path.unlink()
        raise CheckpointError(
            f"{path}: sha256 mismatch, expected {sha256}, got {actual}"
            + ("; the cached file was deleted, load again to download it afresh" if delete else "")
        )
