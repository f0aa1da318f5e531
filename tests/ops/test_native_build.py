"""The native library's disk cache (``rednet.ops._native_build``) against what a shared or
damaged cache holds, in forked processes on real files.

A stand-in compiler (``$CXX``, a shell script) "builds" by copying the real native library,
built once per machine, so each build here costs a copy, not a compile. What is checked:

- a library another user planted under this user's entry name, or one anyone can write,
  is never loaded (its constructor would write a marker), and a ``.lock`` symlink planted
  beside it is not followed (its target keeps its content);
- a cached library cut in half or to a few bytes is rebuilt, and the process neither dies
  (SIGBUS) nor falls back to the reference;
- what an interrupted build left behind is removed by the next build;
- the library's permissions follow the umask, never writable by group or others;
- a cache that cannot be written costs a private build, not the native kernel.
"""
from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from rednet.ops import _cache_files, _cpu, _kernel_cache, _native_build

FAKE_CXX = """#!/bin/sh
# A stand-in for g++: describes itself, and "compiles" by copying the library in $FAKE_CXX_LIB.
for a; do [ "$a" = -E ] && { echo "fake c++ for the cache tests" >&2; exit 0; }; done
out=; prev=
for a; do [ "$prev" = -o ] && out=$a; prev=$a; done
cat > /dev/null
echo build >> "$FAKE_CXX_LOG"
if [ "$FAKE_CXX_MODE" = interrupt ]; then
    head -c 4096 "$FAKE_CXX_LIB" > "$out"
    kill -9 $PPID  # the Python process that builds, killed halfway
    exit 1
fi
cp "$FAKE_CXX_LIB" "$out"
"""


@pytest.fixture(scope="module")
def real_library(tmp_path_factory) -> Path:
    """The real native library as the compiler writes it (the cached entry less its trailer)."""
    ok, why = _cpu.available()
    if not ok:
        pytest.skip(why)
    with _native_build.open_library(_cpu.library()) as path:  # the default cache: built once per machine
        data = Path(path).read_bytes()
    size = _native_build._TRAILER.unpack_from(data, len(data) - _native_build._TRAILER.size)[1]
    out = tmp_path_factory.mktemp("real") / "involution_cpu.so"
    out.write_bytes(data[:size])
    return out


@pytest.fixture
def env(real_library, tmp_path, monkeypatch):
    """A fresh cache, a private temporary folder and the stand-in compiler, for this process and its children."""
    cxx = tmp_path / "fake-c++"
    cxx.write_text(FAKE_CXX)
    cxx.chmod(0o755)
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    cache.mkdir()
    tmp.mkdir()
    for key, value in {"CXX": cxx, "FAKE_CXX_LIB": real_library, "FAKE_CXX_LOG": tmp_path / "builds.log",
                       "REDNET_CACHE_DIR": cache, "TMPDIR": tmp}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("FAKE_CXX_MODE", raising=False)
    entry = _native_build.library_path(_cpu.library(), str(cxx))
    return SimpleNamespace(cache=cache, tmp=tmp, entry=entry, log=tmp_path / "builds.log", root=tmp_path)


def _builds(env) -> int:
    return len(env.log.read_text().split()) if env.log.exists() else 0


def _available(umask: int | None) -> None:
    if umask is not None:
        os.umask(umask)
    tempfile.tempdir = None  # take $TMPDIR as set for this child
    _cpu._reset()
    os._exit(0 if _cpu.available() == (True, "ok") else 1)


def _run(umask: int | None = None) -> int:
    """Load the native library in a forked process: its exit code (0 loaded, 1 unavailable, -N killed by signal N)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    proc = multiprocessing.get_context("fork").Process(target=_available, args=(umask,))
    proc.start()
    proc.join(timeout=120)
    return proc.exitcode


def _intact(path: Path) -> bool:
    return _native_build._why_damaged(path.read_bytes()) == ""


def _leftovers(env) -> list[str]:
    names = {env.entry.name, env.entry.with_suffix(".lock").name}
    return sorted([p.name for p in env.cache.iterdir() if p.name not in names] + [p.name for p in env.tmp.iterdir()])


# ----------------------------------------------------------------------------------------
# A shared cache: files another user left there.


def _planted_library(root: Path, marker: Path) -> bytes:
    """A library whose constructor writes ``marker``, with the symbols of the real one and a valid trailer."""
    source = (f'#include <cstdio>\n__attribute__((constructor)) static void planted() {{\n'
              f'  if (FILE *f = std::fopen("{marker}", "w")) {{ std::fputs("ran", f); std::fclose(f); }} }}\n'
              'extern "C" int rednet_involution_abi() { return 1; }\n'
              'extern "C" int rednet_involution(int, int, int, void *, void *, void *, long long *, int) '
              '{ return 0; }\n')
    out = root / "planted.so"
    res = subprocess.run(["g++", "-shared", "-fPIC", "-x", "c++", "-", "-o", str(out)], input=source.encode(),
                         capture_output=True, timeout=120)
    if res.returncode != 0:
        pytest.skip(f"g++ cannot build the planted library: {res.stderr[-300:]!r}")
    binary = out.read_bytes()
    return binary + _native_build._trailer(binary)  # as a build here would record it: only ownership can refuse it


@pytest.mark.skipif(os.geteuid() != 0, reason="plants files owned by another user: needs root")
@pytest.mark.parametrize("planted_by", ["another user", "this user, writable by all"])
def test_a_planted_library_is_not_loaded_and_a_planted_lock_link_not_followed(env, planted_by):
    env.cache.chmod(0o777)  # a team's cache folder
    marker = env.root / "planted-constructor-ran"
    env.entry.write_bytes(_planted_library(env.root, marker))
    victim = env.root / "victim"
    victim.write_bytes(b"precious\n")
    lock = env.entry.with_suffix(".lock")
    lock.symlink_to(victim)
    if planted_by == "another user":
        env.entry.chmod(0o755)
        os.chown(env.entry, 65534, 65534)
        os.lchown(lock, 65534, 65534)
    else:
        env.entry.chmod(0o777)
    assert _run(0o022) == 0  # the native kernel loads: this user's own build
    assert not marker.exists(), "the planted library was loaded"
    assert victim.read_bytes() == b"precious\n" and lock.is_symlink()
    st = env.entry.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o755) and _intact(env.entry)
    assert _builds(env) == 1


def test_a_planted_lock_link_is_not_followed(env):
    # No library yet: the build itself meets the link (a lock opened for writing once truncated its target).
    env.cache.chmod(0o777)
    victim = env.root / "victim"
    victim.write_bytes(b"precious\n")
    lock = env.entry.with_suffix(".lock")
    lock.symlink_to(victim)
    if os.geteuid() == 0:
        os.lchown(lock, 65534, 65534)
    assert _run() == 0 and _intact(env.entry)
    assert victim.read_bytes() == b"precious\n" and lock.is_symlink()


def test_entries_are_per_user(env, monkeypatch):
    other = 1000 if os.geteuid() != 1000 else 1001
    lib, cxx = _cpu.library(), os.environ["CXX"]
    names = _native_build.library_path(lib, cxx), _kernel_cache.entry_key("s", (), "90", [], {})
    monkeypatch.setattr(os, "geteuid", lambda: other)
    assert _native_build.library_path(lib, cxx) != names[0]
    assert _kernel_cache.entry_key("s", (), "90", [], {}) != names[1]
    assert _cache_files.user() == other


# ----------------------------------------------------------------------------------------
# A damaged cache: cut files, interrupted builds.


@pytest.mark.parametrize("keep", ["half", "a few bytes"])
def test_a_cut_library_is_rebuilt_not_loaded(env, keep):
    assert _run() == 0 and _builds(env) == 1
    data = env.entry.read_bytes()
    env.entry.write_bytes(data[: len(data) // 2] if keep == "half" else data[:7])
    assert _run() == 0  # no SIGBUS, and the native kernel, not the reference
    assert _builds(env) == 2 and _intact(env.entry)
    assert _run() == 0 and _builds(env) == 2  # the rebuilt library is used as it is


def test_an_interrupted_build_leaves_nothing_behind_after_the_next(env, monkeypatch):
    monkeypatch.setenv("FAKE_CXX_MODE", "interrupt")
    assert _run() == -9
    assert _leftovers(env), "the interrupted build left nothing: it did not test anything"
    assert not env.entry.exists()
    monkeypatch.delenv("FAKE_CXX_MODE")
    assert _run() == 0 and _intact(env.entry)
    assert _leftovers(env) == []


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o002, 0o755), (0o077, 0o700)])
def test_the_library_follows_the_umask_never_writable_by_others(env, umask, mode):
    assert _run(umask) == 0
    assert stat.S_IMODE(env.entry.stat().st_mode) == mode


def test_an_unwritable_cache_costs_a_private_build(env, monkeypatch):
    blocker = env.root / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("REDNET_CACHE_DIR", str(blocker / "cache"))
    assert _run() == 0 and _run() == 0
    assert _builds(env) == 2  # one per process
    assert list(env.tmp.iterdir()) == []  # the private copies are gone


def _two_libraries_in_one_process(cache: str) -> None:
    os.environ["REDNET_CACHE_DIR"] = cache
    os.environ.pop("CXX", None)
    flags = ("-O1", "-shared", "-fPIC")
    first = _native_build.NativeLibrary("first", b'extern "C" int first_only() { return 1; }\n', flags)
    second = _native_build.NativeLibrary("second", b'extern "C" int second_only() { return 2; }\n', flags)
    try:
        ok = _native_build.load(first).first_only() == 1
        ok = ok and _native_build.load(second).second_only() == 2  # not the first library again
    except AttributeError:  # the second load returned the first library, without second_only
        ok = False
    os._exit(0 if ok else 1)


def test_each_library_loads_as_itself_after_another(tmp_path):
    """The loader knows a library by the /proc/self/fd/N it was opened through: were N closed and
    given to the next library's file, loading that one returned the first (ONNX Runtime's op
    library lost its entry point once the native kernel had been loaded)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    proc = multiprocessing.get_context("fork").Process(target=_two_libraries_in_one_process,
                                                       args=(str(tmp_path / "cache"),))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 0
