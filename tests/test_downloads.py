"""Downloads against hostile servers on 127.0.0.1: silent, stalling, cut short; one cache entry per URL."""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import rednet
from rednet.models import CheckpointError, load_weights, save_weights

from .helpers import load_tool

HOLD_S = 6  # longest a hostile server keeps a connection open, so a test of the old code cannot hang


def _weights(value: float, path: Path) -> bytes:
    """A tiny file that reads as RedNet weights (its one key is in the rednet layout)."""
    save_weights({"stem.0.conv.weight": torch.full((4,), value)}, path)
    return path.read_bytes()


def _entry(torch_home: Path, url: str, name: str) -> Path:
    """Where the cache keeps ``url``: <12 hex of sha256(url)>-<file name>."""
    return torch_home / "hub" / "checkpoints" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


@pytest.fixture()
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


@pytest.fixture()
def files(tmp_path, torch_home):
    """A static file server on 127.0.0.1: (its root folder, its base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@contextmanager
def raw_server(handle):
    """A TCP server on 127.0.0.1 calling ``handle(conn, request_number, stop)`` per connection."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve():
        n = 0
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:  # the accept timeout, or the socket closed
                continue
            threading.Thread(target=_handle_and_close, args=(handle, conn, n, stop), daemon=True).start()
            n += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        sock.close()


def _handle_and_close(handle, conn, n, stop):
    with conn:
        conn.settimeout(HOLD_S)
        try:
            handle(conn, n, stop)
        except OSError:
            pass


def _read_request(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk


def _headers(length: int) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n".encode()


# --- 10: a silent or stalling server times out with a clear error ----------------------


def test_silent_server_times_out(torch_home, monkeypatch):
    monkeypatch.setenv("REDNET_DOWNLOAD_TIMEOUT", "1")
    with raw_server(lambda conn, n, stop: stop.wait(HOLD_S)) as base:  # accepts, reads nothing, says nothing
        start = time.monotonic()
        with pytest.raises(CheckpointError) as e:
            load_weights(f"{base}/w.safetensors", progress=False)
        elapsed = time.monotonic() - start
    msg = str(e.value)
    assert elapsed < 4, f"took {elapsed:.1f} s with a 1 s timeout"
    assert f"{base}/w.safetensors" in msg and "sent nothing for 1 s" in msg and "REDNET_DOWNLOAD_TIMEOUT" in msg
    assert not list((torch_home / "hub" / "checkpoints").iterdir())


@pytest.mark.parametrize("how", ["env", "argument"])
def test_server_stalling_mid_body_times_out(tmp_path, torch_home, monkeypatch, how):
    body = _weights(1.0, tmp_path / "w.safetensors")
    if how == "env":
        monkeypatch.setenv("REDNET_DOWNLOAD_TIMEOUT", "1")
    else:
        monkeypatch.setenv("REDNET_DOWNLOAD_TIMEOUT", "600")  # the argument wins

    def stall(conn, n, stop):
        _read_request(conn)
        conn.sendall(_headers(len(body)) + body[: len(body) // 2])
        stop.wait(HOLD_S)  # the connection stays open, the rest never comes

    with raw_server(stall) as base:
        start = time.monotonic()
        with pytest.raises(CheckpointError, match=r"sent nothing for 1 s after [\d,]+ bytes") as e:
            load_weights(f"{base}/w.safetensors", progress=False, **({"timeout": 1} if how == "argument" else {}))
        assert time.monotonic() - start < 4
    assert "Nothing was cached" in str(e.value)
    assert not list((torch_home / "hub" / "checkpoints").iterdir())


def test_bad_timeout_setting_is_named(torch_home, monkeypatch, files):
    monkeypatch.setenv("REDNET_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="REDNET_DOWNLOAD_TIMEOUT='soon' must be a positive number"):
        load_weights(f"{files[1]}/w.safetensors", progress=False)


# --- 11: a body cut short is an error and leaves nothing in the cache --------------------


def test_connection_closed_mid_file_caches_nothing(tmp_path, torch_home):
    body = _weights(1.0, tmp_path / "w.safetensors")

    def cut_first_time(conn, n, stop):
        _read_request(conn)
        conn.sendall(_headers(len(body)) + (body[: len(body) // 2] if n == 0 else body))

    with raw_server(cut_first_time) as base:
        url = f"{base}/w.safetensors"
        with pytest.raises(CheckpointError, match=f"connection closed after [\\d,]+ of the {len(body):,} bytes"):
            load_weights(url, progress=False)
        cache = torch_home / "hub" / "checkpoints"
        assert not list(cache.iterdir())  # neither the entry nor a partial file
        # The next load simply downloads again: nothing to delete by hand.
        wf = load_weights(url, progress=False)
    assert torch.equal(wf.state_dict["stem.0.conv.weight"], torch.full((4,), 1.0))
    assert _entry(torch_home, url, "w.safetensors").read_bytes() == body


def test_stale_partials_are_removed_live_ones_kept(tmp_path, torch_home, files):
    fcntl = pytest.importorskip("fcntl")
    root, base = files
    body = _weights(1.0, root / "w.safetensors")
    url = f"{base}/w.safetensors"
    entry = _entry(torch_home, url, "w.safetensors")
    entry.parent.mkdir(parents=True)
    stale = entry.parent / f"{entry.name}.partial"  # left by a download that was killed
    stale.write_bytes(body[:10])
    live = entry.parent / f"{entry.name}.x1y2z3.partial"  # another process, still downloading
    live.write_bytes(body[:10])
    other = entry.parent / "0123456789ab-other.pth.partial"  # another entry: not ours to judge
    other.write_bytes(b"x")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        load_weights(url, progress=False)
        assert live.exists()
    assert not stale.exists() and other.exists() and entry.read_bytes() == body


# --- 12: one cache entry per URL, and digests for any URL ------------------------------


def test_same_file_name_at_two_urls_gets_two_entries(torch_home, files):
    root, base = files
    for sub, value in (("a", 1.0), ("b", 2.0)):
        (root / sub).mkdir()
        _weights(value, root / sub / "weights.safetensors")
    a = load_weights(f"{base}/a/weights.safetensors", progress=False)
    b = load_weights(f"{base}/b/weights.safetensors", progress=False)
    assert torch.equal(a.state_dict["stem.0.conv.weight"], torch.full((4,), 1.0))
    assert torch.equal(b.state_dict["stem.0.conv.weight"], torch.full((4,), 2.0))
    names = sorted(p.name for p in (torch_home / "hub" / "checkpoints").iterdir())
    assert len(names) == 2 and all(n.endswith("-weights.safetensors") for n in names)


def test_a_download_follows_the_umask(torch_home, files):
    """A cache entry is 0666 less the umask (0644 under 022), so a shared cache serves teammates too."""
    root, base = files
    _weights(1.0, root / "w.safetensors")
    old = os.umask(0o022)
    try:
        load_weights(f"{base}/w.safetensors", progress=False)
    finally:
        os.umask(old)
    (entry,) = (torch_home / "hub" / "checkpoints").iterdir()
    assert oct(entry.stat().st_mode & 0o777) == oct(0o644)


def test_sha256_in_the_url_fragment(torch_home, files):
    root, base = files
    digest = hashlib.sha256(_weights(1.0, root / "w.safetensors")).hexdigest()
    url = f"{base}/w.safetensors"
    with pytest.raises(CheckpointError, match=f"sha256 mismatch downloading {url}: expected {'0' * 64}"):
        with torch.device("meta"):
            rednet.create_model("rednet26", pretrained=f"{url}#sha256={'0' * 64}")
    assert not list((torch_home / "hub" / "checkpoints").iterdir())
    wf = load_weights(f"{url}#sha256={digest[:16].upper()}", progress=False)
    assert wf.source == url  # the fragment is not part of the name in messages
    with pytest.raises(ValueError, match="two different sha256"):
        load_weights(f"{url}#sha256={digest}", sha256="ab" * 32, progress=False)
    with pytest.raises(ValueError, match="must be a sha256 hex digest"):
        load_weights(f"{url}#sha256=xyz", progress=False)


def test_wrong_sha256_never_deletes_a_verified_file(torch_home, files):
    root, base = files
    src = root / "w.safetensors"
    body = _weights(1.0, src)
    digest = hashlib.sha256(body).hexdigest()
    url = f"{base}/w.safetensors"
    load_weights(url, sha256=digest, progress=False)
    entry = _entry(torch_home, url, "w.safetensors")
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_weights(url, sha256="f" * 64, progress=False)
    assert entry.read_bytes() == body and not list(entry.parent.glob("*.partial"))
    src.unlink()  # offline from now on: the verified copy must still be there
    assert torch.equal(load_weights(url, sha256=digest, progress=False).state_dict["stem.0.conv.weight"],
                       torch.full((4,), 1.0))


def test_cached_file_failing_its_sha256_is_repaired(torch_home, files):
    root, base = files
    body = _weights(1.0, root / "w.safetensors")
    url = f"{base}/w.safetensors"
    entry = _entry(torch_home, url, "w.safetensors")
    entry.parent.mkdir(parents=True)
    entry.write_bytes(body[:-8] + b"\0" * 8)  # bit rot, or a copy from before the server fixed its file
    load_weights(url, sha256=hashlib.sha256(body).hexdigest(), progress=False)
    assert entry.read_bytes() == body


def test_convert_weights_sha256_and_timeout_flags(tmp_path, capsys, files):
    tool = load_tool("convert_weights")
    root, base = files
    _weights(1.0, root / "w.safetensors")
    for flag, value in (("--sha256", "not-hex"), ("--timeout", "0")):
        with pytest.raises(SystemExit) as e:
            tool.main([f"{base}/w.safetensors", str(tmp_path / "out.safetensors"), flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"error: argument {flag}" in err and "Traceback" not in err
    assert tool.main([f"{base}/w.safetensors", str(tmp_path / "out.safetensors"), "--sha256", "0" * 64]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err and not os.path.exists(tmp_path / "out.safetensors")
