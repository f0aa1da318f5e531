"""Local paths and URLs of weights files: downloads into torch.hub's cache, sha256 checks.

A URL is cached as ``cache_dir()/<first 12 hex of sha256(url)>-<file name>``: two URLs that
end in the same file name (``.../a/weights.pth``, ``.../b/weights.pth``) get two entries,
and the name stays readable. An expected digest comes from the ``sha256`` argument or, for
a bare URL (``create_model(name, pretrained=URL)``, a tool's ``--pretrained URL``), from a
pip-style fragment: ``https://host/weights.pth#sha256=<hex>``.

A download streams into ``<entry>.<random>.partial`` beside the entry, with a timeout on
the connection and on every read (``REDNET_DOWNLOAD_TIMEOUT``, 30 s by default), checks the
length the server announced and the digest, and only then is renamed over the entry: a
cache entry is always a complete file. A cached file that fails an expected digest is not
deleted (it may be exactly what another caller verified): it is downloaded again and
replaced only if the fresh copy matches.
"""
from __future__ import annotations

import glob
import hashlib
import http.client
import logging
import os
import re
from pathlib import Path
from typing import BinaryIO
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urldefrag, urlparse
from urllib.request import Request, urlopen

import torch
from tqdm import tqdm

from ..fileio import CheckpointError, file_sha256, new_temp_file

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be deleted there, which protects live downloads instead
    fcntl = None

__all__ = ["DEFAULT_TIMEOUT", "TIMEOUT_ENV", "cache_dir", "cache_path", "download_timeout", "resolve_source",
           "split_sha256"]

_logger = logging.getLogger(__name__)

TIMEOUT_ENV = "REDNET_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT = 30.0  # seconds without a byte before a download is abandoned
_CHUNK = 1 << 20
_HEX = re.compile(r"[0-9a-f]{1,64}")


def cache_dir() -> Path:
    """Where downloads are kept: ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def split_sha256(url: str) -> tuple[str, str | None]:
    """``url`` without a ``#sha256=<hex>`` fragment, and that digest (lower case) or None.

    Raises:
        ValueError: the fragment's digest is not hexadecimal.
    """
    bare, fragment = urldefrag(url)
    if not fragment.startswith("sha256="):
        return url, None
    return bare, _normalise_sha256(fragment[len("sha256="):], f"the #sha256= fragment of {url!r}")


def cache_path(url: str) -> Path:
    """The cache entry of ``url`` (its ``#sha256=`` fragment, if any, is ignored).

    Raises:
        CheckpointError: the URL's path has no file name to keep readable.
    """
    bare, _ = split_sha256(url)
    # The full URL picks the entry; the file name only keeps it readable.
    return cache_dir() / f"{hashlib.sha256(bare.encode()).hexdigest()[:12]}-{_file_name(bare)}"


def _file_name(url: str) -> str:
    name = os.path.basename(unquote(urlparse(url).path))
    if not name:
        raise CheckpointError(f"cannot name a cache file after URL {url!r}: it has no file name")
    return name


def download_timeout(timeout: float | None = None) -> float:
    """Seconds a download may wait for the server (to connect, or for the next bytes).

    Args:
        timeout: an explicit value; None reads ``$REDNET_DOWNLOAD_TIMEOUT``, else 30.

    Raises:
        ValueError: the value is not a positive number.
    """
    where = "timeout"
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV, "").strip()
        if not text:
            return DEFAULT_TIMEOUT
        where = f"{TIMEOUT_ENV}={text!r}"
        try:
            timeout = float(text)
        except ValueError:
            timeout = -1.0
    if not timeout > 0 or timeout == float("inf"):
        raise ValueError(f"{where} must be a positive number of seconds, e.g. {TIMEOUT_ENV}=120")
    return float(timeout)


def resolve_source(
    source: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float | None = None,
) -> Path:
    """A local file for ``source``, downloading a URL into the cache first.

    Args:
        source: a local path or a URL (``https://``, ``http://``, ``file://``); a URL may end
            in ``#sha256=<hex>``.
        sha256: expected digest (or a prefix of it), if known.
        progress: show a progress bar while downloading.
        timeout: seconds to wait for the server to connect or send more data; None reads
            ``$REDNET_DOWNLOAD_TIMEOUT`` (default 30).

    Raises:
        FileNotFoundError: a local path that does not exist.
        CheckpointError: a failed or stalled download, or a digest mismatch.
        ValueError: a digest that is not hexadecimal, or a timeout that is not positive.
    """
    text = os.fspath(source)
    expected = _normalise_sha256(sha256, "sha256") if sha256 else None
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
        if not expected:
            return path
        actual = file_sha256(path)
        if actual.startswith(expected):
            return path
        # Not deleted: another caller may have verified this very file against its own digest.
        _logger.warning("%s: the cached %s has sha256 %s, not %s; downloading it again to check",
                        url, path.name, actual, expected)
    _download(url, path, expected, progress, download_timeout(timeout))
    return path


def _normalise_sha256(value: str, what: str) -> str:
    digest = value.strip().lower()
    if not _HEX.fullmatch(digest):
        raise ValueError(f"{what} must be a sha256 hex digest (or a prefix of one), got {value!r}")
    return digest


def _merge_expected(given: str | None, in_url: str | None, url: str) -> str | None:
    if given and in_url and not (given.startswith(in_url) or in_url.startswith(given)):
        raise ValueError(f"two different sha256 for {url}: {given} (argument) and {in_url} (URL fragment)")
    return max(given or "", in_url or "", key=len) or None


def _download(url: str, dest: Path, sha256: str | None, progress: bool, timeout: float) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(dest)
    _logger.info("downloading %s to %s", url, dest)
    fd, partial = new_temp_file(dest.parent, f"{dest.name}.", ".partial")  # the umask's mode, not mkstemp's 0600
    try:
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # "in use" for _remove_stale_partials; the kernel drops it if we die
            with open(fd, "wb", closefd=False) as f:
                actual = _fetch(url, f, progress, timeout)
                f.flush()
                os.fsync(f.fileno())
            if sha256 and not actual.startswith(sha256):
                raise CheckpointError(
                    f"sha256 mismatch downloading {url}: expected {sha256}, got {actual}; the download was "
                    "discarded. Check the digest you gave, or whether the file at that URL changed."
                )
            if fcntl is not None:
                os.replace(partial, dest)  # still locked, so no other process takes it for stale
        finally:
            os.close(fd)
        if fcntl is None:
            os.replace(partial, dest)  # Windows renames only closed files
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _fetch(url: str, f: BinaryIO, progress: bool, timeout: float) -> str:
    """Stream ``url`` into ``f``; the sha256 of what arrived."""
    digest, done, total, answered = hashlib.sha256(), 0, None, False
    try:
        # timeout bounds the connection and every read on it, so a server that goes silent fails.
        with urlopen(Request(url, headers={"User-Agent": "rednet"}), timeout=timeout) as resp:
            answered = True
            length = resp.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
            with tqdm(total=total, desc=_file_name(url), unit="B", unit_scale=True, unit_divisor=1024,
                      disable=not progress) as bar:
                read = getattr(resp, "read1", resp.read)  # read1: what has arrived, so a stall is counted
                while chunk := read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
    except (http.client.HTTPException, OSError, ValueError) as e:  # URLError and TimeoutError are OSErrors
        reason = getattr(e, "reason", None) if isinstance(e, URLError) and not isinstance(e, HTTPError) else e
        if isinstance(reason, TimeoutError):
            when = f"after {done:,} bytes" if answered else "(no answer to the request)"
            what = (f"the server sent nothing for {timeout:g} s {when}; allow longer with {TIMEOUT_ENV}=<seconds> "
                    "or a timeout argument")
        elif isinstance(e, HTTPError):
            what = f"HTTP {e.code} {e.reason}; check the URL"
        else:
            what = f"{type(reason).__name__}: {reason}" + (f" after {done:,} bytes" if done else "")
        raise _failed(url, what) from None
    if total is not None and done != total:
        raise _failed(url, f"the connection closed after {done:,} of the {total:,} bytes the server announced")
    return digest.hexdigest()


def _failed(url: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"could not download {url}: {what}. Nothing was cached; load again to retry, or fetch the file another "
        f"way and pass its path, e.g. create_model(name, pretrained='/path/to/{_file_name(url)}')"
    )


def _remove_stale_partials(dest: Path) -> None:
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
