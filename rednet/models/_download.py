"""Downloads: a URL streamed into ``<entry>.<random>.partial`` beside its cache entry, then renamed
over it once complete and checked, so a cache entry is always a complete file.

A download has a timeout on the connection and on every read (``REDNET_DOWNLOAD_TIMEOUT``, 30 s
by default) and a deadline on the whole (``REDNET_DOWNLOAD_DEADLINE``; by default scaled to the
length the server announces, see ``download_deadline``), and checks the announced length and the
digest before the rename.
"""
from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import BinaryIO, Optional
from urllib.error import HTTPError, URLError
from urllib.request import HTTPHandler, HTTPSHandler, Request, build_opener

from tqdm import tqdm

from ..fileio import CheckpointError, new_temp_file
from ._cache import remove_stale_partials, shown_name
from ._urls import redact_url, scrub_url

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be deleted there, which protects live downloads instead
    fcntl = None

__all__ = ["DEADLINE_ENV", "DEFAULT_TIMEOUT", "TIMEOUT_ENV", "deadline_setting", "download", "download_deadline",
           "download_timeout"]

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


def download_timeout(timeout: float | None = None) -> float:
    """Seconds a download may wait for the server (to connect, or for the next bytes).

    Args:
        timeout: an explicit value; None reads ``$REDNET_DOWNLOAD_TIMEOUT``, else 30.

    Raises:
        ValueError: the value is not a positive number.
    """
    setting = _seconds(timeout, "timeout", TIMEOUT_ENV, 120)
    return DEFAULT_TIMEOUT if setting is None else setting


def download_deadline(deadline: float | None = None, size: int | None = None) -> float:
    """Seconds a whole download may take, from its request to its last byte.

    Args:
        deadline: an explicit value; None reads ``$REDNET_DOWNLOAD_DEADLINE``, else the default:
            60 s plus 1 s per 64 KiB of ``size``, at most 3600 s (3600 s when ``size`` is None).
        size: the length the server announced, in bytes, if it did.

    Raises:
        ValueError: the value is not a positive number.
    """
    explicit = deadline_setting(deadline)
    if explicit is not None:
        return explicit
    if size is None:
        return _DEADLINE_MAX_S
    return min(_DEADLINE_MAX_S, _DEADLINE_BASE_S + size / _DEADLINE_BYTES_PER_S)


def deadline_setting(deadline: float | None) -> float | None:
    """The deadline given (argument, else ``$REDNET_DOWNLOAD_DEADLINE``), checked; None for the default rule."""
    return _seconds(deadline, "deadline", DEADLINE_ENV, 7200)


def _seconds(value: float | None, name: str, env: str, example: int) -> float | None:
    """``value``, else ``$env`` (None when that is unset too), checked to be a positive, finite
    number of seconds; a ValueError names where the bad value came from."""
    where = name
    if value is None:
        text = os.environ.get(env, "").strip()
        if not text:
            return None
        where = f"{env}={text!r}"
        try:
            value = float(text)
        except ValueError:
            value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{where} must be a positive number of seconds, e.g. {env}={example}")
    return float(value)


def download(url: str, dest: Path, sha256: str | None, progress: bool, timeout: float,
              deadline: float | None) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(dest)
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
                fcntl.flock(fd, fcntl.LOCK_EX)  # "in use" for remove_stale_partials; the kernel drops it if we die
            with open(fd, "wb", closefd=False) as f:
                actual = _fetch(url, f, progress, timeout, deadline, shown_name(dest))
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
            after = f" after {done:,} bytes" if done else ""
            what = f"{type(reason).__name__}: {scrub_url(str(reason), url)}{after}"
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


def _failed(url: str, name: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"could not download {redact_url(url)}: {what}. Nothing was cached; load again to retry, or fetch the file "
        f"another way and pass its path, e.g. create_model(name, pretrained='/path/to/{name}')"
    )
