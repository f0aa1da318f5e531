"""Local paths and URLs of weights files: downloads into torch.hub's cache, sha256 checks.

A URL is cached as ``cache_dir()/<first 12 hex of sha256(url)>-<file name>``: two URLs that
end in the same file name (``.../a/weights.pth``, ``.../b/weights.pth``) get two entries,
and the name stays readable. A file name that cannot be one on disk (a control character
or NUL after percent-decoding, or too long with the prefix and a download's ``.partial``
suffix for the file system's 255 bytes) is replaced by the hash: ``<12 hex><.suffix>``.
An expected digest comes from the ``sha256`` argument or, for a bare URL
(``create_model(name, pretrained=URL)``, a tool's ``--pretrained URL``), from a pip-style
fragment: ``https://host/weights.pth#sha256=<hex>``.

A download streams into ``<entry>.<random>.partial`` beside the entry, with a timeout on
the connection and on every read (``REDNET_DOWNLOAD_TIMEOUT``, 30 s by default) and a
deadline on the whole (``REDNET_DOWNLOAD_DEADLINE``; by default scaled to the length the
server announces, see ``download_deadline``), checks the announced length and the digest,
and only then is renamed over the entry: a cache entry is always a complete file. A cached
file that fails an expected digest is not deleted (it may be exactly what another caller
verified): it is downloaded again and replaced only if the fresh copy matches.

URLs appear in messages and logs through ``redact_url``: the values of a query string
(``?token=...``, a signed URL's signature) and a ``user:password@`` never do.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import http.client
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import BinaryIO, Optional
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urldefrag, urlparse, urlsplit, urlunsplit
from urllib.request import HTTPHandler, HTTPSHandler, Request, build_opener

import torch
from tqdm import tqdm

from ..fileio import CheckpointError, file_sha256, new_temp_file

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be deleted there, which protects live downloads instead
    fcntl = None

__all__ = ["DEADLINE_ENV", "DEFAULT_TIMEOUT", "TIMEOUT_ENV", "cache_dir", "cache_path", "download_deadline",
           "download_timeout", "redact_url", "resolve_source", "split_sha256"]

_logger = logging.getLogger(__name__)

TIMEOUT_ENV = "REDNET_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT = 30.0  # seconds without a byte before a download is abandoned
DEADLINE_ENV = "REDNET_DOWNLOAD_DEADLINE"
# The default deadline of a whole download: a minute, plus a second for every 64 KiB the server
# announces (a sustained 64 KiB/s, slower than any link worth fetching weights over), at most an
# hour; an hour when it announces no length. A server that sends a byte now and then never trips
# the per-read timeout, and only this ends it.
_DEADLINE_BASE_S = 60.0
_DEADLINE_BYTES_PER_S = 64 * 1024
_DEADLINE_MAX_S = 3600.0
_CHUNK = 1 << 20
_HEX = re.compile(r"[0-9a-f]{1,64}")
# One file name may hold 255 bytes (Linux, macOS, Windows); a download's partial file adds
# new_temp_file's 8 random characters and ".partial" to the entry's name.
_NAME_MAX = 255
_PARTIAL_EXTRA = len(".12345678.partial")
_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9_]{1,16}")


def cache_dir() -> Path:
    """Where downloads are kept: ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def redact_url(url: str) -> str:
    """``url`` as messages and logs show it: query values and ``user:password@`` hidden.

    ``https://me:pw@host/w.pth?token=abc&v=2`` becomes ``https://***@host/w.pth?token=***&v=***``;
    a ``#sha256=`` fragment stays (a digest is no secret), another fragment is hidden too. A
    secret in the path itself cannot be told from a file name and is shown. Anything that is
    not a URL is returned as it is.
    """
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    # Keys name what a value is (token, X-Amz-Signature) and stay; a bare item may be the secret itself.
    query = "&".join(f"{item.split('=', 1)[0]}=***" if "=" in item else "***"
                     for item in parts.query.split("&")) if parts.query else ""
    fragment = parts.fragment if not parts.fragment or parts.fragment.startswith("sha256=") else "***"
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def split_sha256(url: str) -> tuple[str, str | None]:
    """``url`` without a ``#sha256=<hex>`` fragment, and that digest (lower case) or None.

    Raises:
        ValueError: the fragment's digest is not hexadecimal.
    """
    bare, fragment = urldefrag(url)
    if not fragment.startswith("sha256="):
        return url, None
    return bare, _normalise_sha256(fragment[len("sha256="):], f"the #sha256= fragment of {redact_url(url)!r}")


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


def _shown_name(entry: Path) -> str:
    """The file name part of a cache entry, for a progress bar or a hint (``w.pth`` of ``<hex>-w.pth``)."""
    return entry.name.split("-", 1)[-1]


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


def download_deadline(deadline: float | None = None, size: int | None = None) -> float:
    """Seconds a whole download may take, from its request to its last byte.

    Args:
        deadline: an explicit value; None reads ``$REDNET_DOWNLOAD_DEADLINE``, else the default:
            60 s plus 1 s per 64 KiB of ``size``, at most 3600 s (3600 s when ``size`` is None).
        size: the length the server announced, in bytes, if it did.

    Raises:
        ValueError: the value is not a positive number.
    """
    explicit = _deadline_setting(deadline)
    if explicit is not None:
        return explicit
    if size is None:
        return _DEADLINE_MAX_S
    return min(_DEADLINE_MAX_S, _DEADLINE_BASE_S + size / _DEADLINE_BYTES_PER_S)


def _deadline_setting(deadline: float | None) -> float | None:
    """The deadline given (argument, else ``$REDNET_DOWNLOAD_DEADLINE``), checked; None for the default rule."""
    where = "deadline"
    if deadline is None:
        text = os.environ.get(DEADLINE_ENV, "").strip()
        if not text:
            return None
        where = f"{DEADLINE_ENV}={text!r}"
        try:
            deadline = float(text)
        except ValueError:
            deadline = -1.0
    if not deadline > 0 or deadline == float("inf"):
        raise ValueError(f"{where} must be a positive number of seconds, e.g. {DEADLINE_ENV}=7200")
    return float(deadline)


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
        _check_readable(path, url)
        if not expected:
            return path
        actual = file_sha256(path)
        if actual.startswith(expected):
            return path
        # Not deleted: another caller may have verified this very file against its own digest.
        _logger.warning("%s: the cached %s has sha256 %s, not %s; downloading it again to check",
                        redact_url(url), path.name, actual, expected)
    _download(url, path, expected, progress, download_timeout(timeout), _deadline_setting(deadline))
    return path


def _check_readable(entry: Path, url: str) -> None:
    # A shared cache may hold another user's private file: say so here, not in a loader's traceback.
    try:
        with open(entry, "rb"):
            pass
    except OSError as e:
        raise CheckpointError(
            f"the cached download {entry} of {redact_url(url)} cannot be read ({e.strerror or e}); set TORCH_HOME "
            "to a cache of your own, or have the file made readable"
        ) from None


def _normalise_sha256(value: str, what: str) -> str:
    digest = value.strip().lower()
    if not _HEX.fullmatch(digest):
        raise ValueError(f"{what} must be a sha256 hex digest (or a prefix of one), got {value!r}")
    return digest


def _merge_expected(given: str | None, in_url: str | None, url: str) -> str | None:
    if given and in_url and not (given.startswith(in_url) or in_url.startswith(given)):
        raise ValueError(f"two different sha256 for {redact_url(url)}: {given} (argument) and {in_url} "
                         "(URL fragment)")
    return max(given or "", in_url or "", key=len) or None


def _download(url: str, dest: Path, sha256: str | None, progress: bool, timeout: float,
              deadline: float | None) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(dest)
        fd, partial = new_temp_file(dest.parent, f"{dest.name}.", ".partial")  # the umask's mode, not mkstemp's 0600
    except OSError as e:
        raise CheckpointError(
            f"cannot download {redact_url(url)}: the download cache {dest.parent} cannot be written "
            f"({e.strerror or e}); set TORCH_HOME to a folder you can write (downloads go to "
            "$TORCH_HOME/hub/checkpoints), or fetch the file another way and pass its path"
        ) from None
    _logger.info("downloading %s to %s", redact_url(url), dest)
    try:
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # "in use" for _remove_stale_partials; the kernel drops it if we die
            with open(fd, "wb", closefd=False) as f:
                actual = _fetch(url, f, progress, timeout, deadline, _shown_name(dest))
                f.flush()
                os.fsync(f.fileno())
            if sha256 and not actual.startswith(sha256):
                raise CheckpointError(
                    f"sha256 mismatch downloading {redact_url(url)}: expected {sha256}, got {actual}; the download "
                    "was discarded. Check the digest you gave, or whether the file at that URL changed."
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


class _Watchdog:
    """Shuts a download's connections when its deadline passes.

    A read blocked on a socket wakes when the socket is shut down, so the deadline holds
    while the headers arrive and between any two bytes of the body (connecting is bounded
    by the timeout).
    """

    def __init__(self):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer: Optional[threading.Timer] = None

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def arm(self, seconds: float) -> None:
        """Expire ``seconds`` from now (replacing any earlier deadline)."""
        self.cancel()
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: an SSL socket's would talk TLS first
    except OSError:
        pass  # already closed


class _Watched:
    """An HTTP(S) connection that hands its socket to a ``_Watchdog`` once connected."""

    def __init__(self, *args, watchdog: _Watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        self._watchdog = watchdog

    def connect(self) -> None:
        super().connect()
        self._watchdog.watch(self.sock)


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
    pass


def _opener(watchdog: _Watchdog):
    """urllib's opener (proxies, redirects, file://) whose HTTP(S) connections ``watchdog`` can shut."""

    class Plain(HTTPHandler):
        def http_open(self, req):
            return self.do_open(functools.partial(_WatchedHTTP, watchdog=watchdog), req)

    class Secure(HTTPSHandler):
        def https_open(self, req):
            return self.do_open(functools.partial(_WatchedHTTPS, watchdog=watchdog), req)

    return build_opener(Plain, Secure)


def _fetch(url: str, f: BinaryIO, progress: bool, timeout: float, deadline: float | None, name: str) -> str:
    """Stream ``url`` into ``f``; the sha256 of what arrived."""
    digest, done, total, answered = hashlib.sha256(), 0, None, False
    started = time.monotonic()
    allowed = download_deadline(deadline)  # until the server announces a length
    watchdog = _Watchdog()
    watchdog.arm(allowed)
    try:
        # timeout bounds the connection and every read on it, so a server that goes silent fails;
        # the watchdog bounds the whole, so one that trickles fails too.
        with _opener(watchdog).open(Request(url, headers={"User-Agent": "rednet"}), timeout=timeout) as resp:
            answered = True
            length = resp.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
            if deadline is None and total is not None:
                allowed = download_deadline(None, total)
                watchdog.arm(allowed - (time.monotonic() - started))
            with tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                      disable=not progress) as bar:
                read = getattr(resp, "read1", resp.read)  # read1: what has arrived, so a stall is counted
                while chunk := read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
    except (http.client.HTTPException, OSError, ValueError) as e:  # URLError and TimeoutError are OSErrors
        if watchdog.expired:
            raise _failed(url, name, _too_slow(allowed, done, total)) from None
        reason = getattr(e, "reason", None) if isinstance(e, URLError) and not isinstance(e, HTTPError) else e
        if isinstance(reason, TimeoutError):
            when = f"after {done:,} bytes" if answered else "(no answer to the request)"
            what = (f"the server sent nothing for {timeout:g} s {when}; allow longer with {TIMEOUT_ENV}=<seconds> "
                    "or a timeout argument")
        elif isinstance(e, HTTPError):
            what = f"HTTP {e.code} {e.reason}; check the URL"
        else:
            what = f"{type(reason).__name__}: {_scrub(str(reason), url)}" + (f" after {done:,} bytes" if done else "")
        raise _failed(url, name, what) from None
    finally:
        watchdog.cancel()
    if watchdog.expired:  # the shut socket read as the end of the body
        raise _failed(url, name, _too_slow(allowed, done, total))
    if total is not None and done != total:
        raise _failed(url, name, f"the connection closed after {done:,} of the {total:,} bytes the server announced")
    return digest.hexdigest()


def _too_slow(allowed: float, done: int, total: int | None) -> str:
    of = f" of {total:,}" if total is not None else ""
    return (f"it took longer than the {allowed:g} s a download may take ({done:,}{of} bytes arrived); allow longer "
            f"with {DEADLINE_ENV}=<seconds> or a deadline argument")


def _scrub(text: str, url: str) -> str:
    """``text`` (an error's own words, which may quote the URL) without the URL's query or user:password."""
    parts = urlsplit(url)
    secrets = [parts.query, parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""]
    for secret in filter(None, secrets):
        text = text.replace(secret, "***").replace(unquote(secret), "***")
    return text


def _failed(url: str, name: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"could not download {redact_url(url)}: {what}. Nothing was cached; load again to retry, or fetch the file "
        f"another way and pass its path, e.g. create_model(name, pretrained='/path/to/{name}')"
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
