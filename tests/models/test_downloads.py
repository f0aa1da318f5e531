"""Downloads against hostile servers on 127.0.0.1: silent, stalling, cut short; one cache entry per URL."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
import torch

import rednet
from rednet.models import CheckpointError, load_weights, save_weights

from ..helpers import AS_NOBODY, ROOT, load_tool, why_nobody_cannot_run

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


# --- issue 16, item 12: cache names, an unwritable cache, a deadline, secrets in URLs ----


def _serve_anything(body: bytes):
    """A raw server that answers every path with ``body`` (http.server would refuse odd paths itself)."""

    def handle(conn, n, stop):
        _read_request(conn)
        conn.sendall(_headers(len(body)) + body)

    return raw_server(handle)


@pytest.mark.parametrize("name", ["x" * 240 + ".safetensors", "w%00.safetensors", "w%0A%1B.safetensors"],
                         ids=["over-255-bytes", "nul", "control"])
def test_a_file_name_that_cannot_be_a_cache_name_is_hashed(tmp_path, torch_home, name):
    body = _weights(1.0, tmp_path / "w.safetensors")
    with _serve_anything(body) as base:
        url = f"{base}/{name}"
        wf = load_weights(url, progress=False)
    assert torch.equal(wf.state_dict["stem.0.conv.weight"], torch.full((4,), 1.0))
    # <12 hex of the URL's sha256><suffix>: short, and the suffix by which timm tells safetensors stays.
    entry = torch_home / "hub" / "checkpoints" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}.safetensors"
    assert [p.name for p in entry.parent.iterdir()] == [entry.name] and entry.read_bytes() == body


def test_the_longest_readable_cache_name_stays_readable(tmp_path, torch_home):
    """Readable up to 255 bytes (not characters) with the prefix and a partial file's suffix; one more is hashed."""
    body = _weights(1.0, tmp_path / "w.safetensors")
    fits = "é" * 110 + "a.pth"  # 225 bytes: 12 hex, "-", this and ".<8 random>.partial" make 255
    longer = "é" * 111 + ".pth"  # 226 bytes
    assert len(f"0123456789ab-{fits}.12345678.partial".encode()) == 255
    with _serve_anything(body) as base:
        for name in (fits, longer):
            load_weights(f"{base}/{quote(name)}", progress=False)
    key = hashlib.sha256(f"{base}/{quote(longer)}".encode()).hexdigest()[:12]
    assert sorted(p.name for p in (torch_home / "hub" / "checkpoints").iterdir()) == sorted(
        [_entry(torch_home, f"{base}/{quote(fits)}", fits).name, f"{key}.pth"])


def _one_error_line(rc: int, out: str, err: str) -> str:
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and "Traceback" not in out + err and len(errors) == 1, out + err
    return errors[0]


@pytest.mark.parametrize("tool", ["eval", "convert_weights"])
def test_unwritable_torch_home_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, files, tool):
    """TORCH_HOME under a plain file: no one, root included, can create the cache there."""
    root, base = files
    _weights(1.0, root / "w.safetensors")
    (tmp_path / "plain").write_text("")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "plain" / "torch_home"))
    url = f"{base}/w.safetensors?token=SECRET"
    argv = (["--model", "test_resnet", "--pretrained", url, "--data", str(tmp_path / "data")] if tool == "eval"
            else [url, str(tmp_path / "out.safetensors")])
    rc = load_tool(tool).main(argv)
    captured = capsys.readouterr()
    line = _one_error_line(rc, captured.out, captured.err)
    assert "cannot be written" in line and "set TORCH_HOME to a folder you can write" in line
    assert "SECRET" not in captured.out + captured.err and not (tmp_path / "out.safetensors").exists()


def _run_as_nobody(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*AS_NOBODY, sys.executable, *args],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True,
                          text=True, timeout=300)


def test_read_only_torch_home_is_one_line_and_exit_2_for_another_user(files):
    """A TORCH_HOME in a read-only folder, as a user who cannot write there (root could): without the file,
    one line and exit 2; with another user's private copy, the same; with a readable copy, it is used."""
    if why_nobody_cannot_run():
        pytest.skip(why_nobody_cannot_run())
    import rednet

    root, base = files
    torch.save(rednet.create_model("test_resnet").state_dict(), root / "w.pth")
    url = f"{base}/w.pth"
    home = Path(tempfile.mkdtemp(prefix="rednet-ro-"))  # pytest's tmp_path is private to root
    entry = _entry(home / "torch_home", url, "w.pth")
    read_only = [home, *entry.parents[:3]]  # home, torch_home, hub, checkpoints
    eval_argv = [str(ROOT / "tools" / "eval.py"), "--model", "test_resnet", "--pretrained", url, "--data",
                 str(home / "data")]
    env = {"TORCH_HOME": str(home / "torch_home")}
    try:
        home.chmod(0o555)
        proc = _run_as_nobody(eval_argv, env)
        line = _one_error_line(proc.returncode, proc.stdout, proc.stderr)
        assert "cannot be written (Permission denied)" in line and "TORCH_HOME" in line
        home.chmod(0o755)
        entry.parent.mkdir(parents=True)
        shutil.copy(root / "w.pth", entry)
        for folder in read_only:
            folder.chmod(0o555)
        entry.chmod(0o600)  # root's own
        proc = _run_as_nobody(eval_argv, env)
        line = _one_error_line(proc.returncode, proc.stdout, proc.stderr)
        assert f"the cached download {entry} of {url} cannot be read (Permission denied)" in line
        entry.chmod(0o644)
        proc = _run_as_nobody(["-c", f"from rednet.models import resolve_source; print(resolve_source({url!r}))"],
                              env)
        assert proc.returncode == 0 and proc.stdout.strip() == str(entry), proc.stdout + proc.stderr
        assert [p.name for p in entry.parent.iterdir()] == [entry.name]
    finally:
        for folder in read_only:
            if folder.exists():
                folder.chmod(0o755)
        shutil.rmtree(home)


def _trickle(body: bytes, where: str):
    """A server that sends its answer one byte every 0.5 s (the headers, or the body after them), for HOLD_S."""

    def handle(conn, n, stop):
        _read_request(conn)
        reply = _headers(len(body)) + body
        sent = 0 if where == "headers" else len(_headers(len(body)))
        conn.sendall(reply[:sent])
        end = time.monotonic() + HOLD_S
        while sent < len(reply) and time.monotonic() < end and not stop.wait(0.5):
            conn.sendall(reply[sent:sent + 1])
            sent += 1

    return raw_server(handle)


@pytest.mark.parametrize("where, how", [("body", "env"), ("body", "argument"), ("headers", "env"),
                                        ("body", "default")])
def test_a_trickling_server_fails_at_the_deadline(tmp_path, torch_home, monkeypatch, where, how):
    import rednet.models._download as hub

    body = _weights(1.0, tmp_path / "w.safetensors")
    monkeypatch.setenv("REDNET_DOWNLOAD_TIMEOUT", "5")  # longer than the gaps between bytes
    monkeypatch.setenv("REDNET_DOWNLOAD_DEADLINE", "1" if how == "env" else "600")  # the argument wins
    if how == "default":  # the rule scaled to the announced length, shrunk to 1 s + 1 s per GB
        monkeypatch.delenv("REDNET_DOWNLOAD_DEADLINE")
        monkeypatch.setattr(hub, "_DEADLINE_BASE_S", 1.0)
        monkeypatch.setattr(hub, "_DEADLINE_BYTES_PER_S", 1e9)
    with _trickle(body, where) as base:
        start = time.monotonic()
        with pytest.raises(CheckpointError) as e:
            load_weights(f"{base}/w.safetensors", progress=False, **({"deadline": 1} if how == "argument" else {}))
        elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 3, f"took {elapsed:.1f} s with a 1 s deadline"
    msg = str(e.value)
    assert "longer than the 1 s a download may take" in msg and "REDNET_DOWNLOAD_DEADLINE" in msg, msg
    assert "Nothing was cached" in msg and not list((torch_home / "hub" / "checkpoints").iterdir())


def test_the_default_deadline_scales_with_the_announced_length(monkeypatch):
    from rednet.models._download import download_deadline

    monkeypatch.delenv("REDNET_DOWNLOAD_DEADLINE", raising=False)
    assert download_deadline(None, None) == 3600  # no length announced
    assert download_deadline(None, 0) == 60
    assert download_deadline(None, 120 * 64 * 1024) == 180  # 1 s per 64 KiB on top of a minute
    assert download_deadline(None, 10**12) == 3600  # at most an hour
    assert download_deadline(7.5, 10**12) == 7.5
    monkeypatch.setenv("REDNET_DOWNLOAD_DEADLINE", "90")
    assert download_deadline(None, 10**12) == 90 and download_deadline(5, None) == 5
    for bad in ("soon", "0", "inf"):
        monkeypatch.setenv("REDNET_DOWNLOAD_DEADLINE", bad)
        with pytest.raises(ValueError, match=f"REDNET_DOWNLOAD_DEADLINE='{bad}' must be a positive number"):
            download_deadline(None, 1)


def test_redact_url():
    from rednet.models import redact_url

    assert redact_url("https://me:pw@host:8/a/w.pth?token=abc&v=2#sha256=ab") == \
        "https://***@host:8/a/w.pth?token=***&v=***#sha256=ab"
    assert redact_url("https://host/w.pth?SECRET#frag") == "https://host/w.pth?***#***"
    assert redact_url("https://host/w.pth") == "https://host/w.pth" and redact_url("/a?b=c") == "/a?b=c"
    assert redact_url("https://host/SECRET/w.pth") == "https://host/SECRET/w.pth"  # a path is not told apart


def test_url_secrets_stay_out_of_errors_and_logs(tmp_path, torch_home, files, caplog):
    root, base = files
    body = _weights(1.0, root / "w.safetensors")
    host = base.split("//", 1)[1]
    with caplog.at_level("INFO", logger="rednet"):
        with pytest.raises(CheckpointError) as missing:
            load_weights(f"{base}/absent.pth?token=SECRET", progress=False)
        with pytest.raises(CheckpointError) as mismatch:
            load_weights(f"{base}/w.safetensors?token=SECRET#sha256={'0' * 64}", progress=False)
        with pytest.raises(CheckpointError) as password:
            load_weights(f"http://me:SECRET@{host}/w.safetensors", progress=False)
        with pytest.raises(ValueError) as fragment:
            load_weights(f"{base}/w.safetensors?token=SECRET#sha256=xyz", progress=False)
        with pytest.raises(CheckpointError) as quoted:  # http.client's own message quotes the path and query
            load_weights(f"{base}/w s.safetensors?token=SECRET", progress=False)
        wf = load_weights(f"{base}/w.safetensors?token=SECRET", progress=False)
    assert "token=***" in str(missing.value) and "token=***" in str(mismatch.value)
    assert "http://***@" in str(password.value)
    assert wf.source == f"{base}/w.safetensors?token=***" and "downloading" in caplog.text
    assert "InvalidURL" in str(quoted.value)
    for text in (str(missing.value), str(mismatch.value), str(password.value), str(fragment.value),
                 str(quoted.value), caplog.text):
        assert "SECRET" not in text, text
    assert _entry(torch_home, f"{base}/w.safetensors?token=SECRET", "w.safetensors").read_bytes() == body


def test_the_request_carries_the_url_as_given(tmp_path, torch_home):
    body = _weights(1.0, tmp_path / "w.safetensors")
    requests = []

    def record(conn, n, stop):
        requests.append(conn.recv(4096))
        conn.sendall(_headers(len(body)) + body)

    with raw_server(record) as base:
        load_weights(f"{base}/w.safetensors?token=SECRET", progress=False)
    assert requests[0].startswith(b"GET /w.safetensors?token=SECRET HTTP/1.1")


def test_eval_keeps_url_secrets_out_of_its_output_and_results(tmp_path, files):
    """tools/eval.py --pretrained URL?token=...: the token reaches the server, and no output or file."""
    import numpy as np
    from PIL import Image

    root, base = files
    torch.save(rednet.create_model("test_resnet", num_classes=2).state_dict(), root / "w.pth")
    for c in ("a", "b"):
        (tmp_path / "data" / "val" / c).mkdir(parents=True)
        Image.fromarray(np.full((20, 20, 3), 9, np.uint8)).save(tmp_path / "data" / "val" / c / "0.png")
    url = f"{base}/w.pth?token=SECRET"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), "--model", "test_resnet", "--set",
                           "model.num_classes=2", "--pretrained", url, "--data", str(tmp_path / "data"),
                           "--batch-size", "2", "--workers", "0", "--json", str(tmp_path / "results.json")],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SECRET" not in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "results.json").read_text())["pretrained"] == f"{base}/w.pth?token=***"
    # timm's model came through rednet's download too: its cache entry, its redacted log line.
    assert _entry(tmp_path / "torch_home", url, "w.pth").is_file()
    assert f"downloading {base}/w.pth?token=***" in proc.stdout
    for path in tmp_path.rglob("*"):  # the results, the cache, the data: nothing holds the token
        assert "SECRET" not in path.name and (not path.is_file() or b"SECRET" not in path.read_bytes()), path


def test_the_config_keeps_the_url_as_given(capsys):
    """Only what is shown is redacted: the config (--print-config, config.yaml, checkpoints) holds the URL as given."""
    import yaml

    url = "https://host/w.pth?token=SECRET"
    assert load_tool("train").main(["--config", "digits", "--set", f"model.pretrained={url}", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["pretrained"] == url
