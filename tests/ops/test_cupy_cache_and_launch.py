"""The CuPy backend's plumbing on CPU, with the compiler, CuPy and the CUDA device faked.

- the disk cache of compiled modules (``_kernel_cache``): what its key depends on, a
  second process loading instead of compiling, damaged entries recompiled, concurrent
  writers, an unwritable cache;
- loading a module (``_cupy._load_functions``): lowered names from the cache entry, a
  cached binary the driver refuses is rebuilt;
- launching (``_cupy.launch``): the stream handed to the kernel is PyTorch's current
  stream of the tensor's device, and no device other than the tensor's is made current
  (CuPy's ``Device`` context, which sets the previous device on exit, is not used); the
  first launch of each kernel on a device is synchronised (not during graph capture) and a
  failure names the kernel; a block's dynamic shared memory above 48 KB is opted into once.
"""
from __future__ import annotations

import multiprocessing
import os
import stat
import sys
from types import SimpleNamespace

import pytest
import torch

from rednet.ops import _cpu, _cupy, _kernel_cache, _native_build, _plan
from rednet.ops._kernel_cache import Entry

NAMES = _plan.name_expressions(torch.float32, 7, 2, 1)
VERSIONS = {"cupy": "14.2.0", "nvrtc": "13.0", "ptx": ""}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REDNET_CACHE_DIR", str(tmp_path))
    return tmp_path / "kernels"


def _entry(names=NAMES, arch="90") -> Entry:
    return Entry(b"\x7fELF fake cubin for sm_" + arch.encode() + b"\n\x00" * 64,
                 {n: f"_Z{i}lowered" for i, n in enumerate(names)})


@pytest.fixture
def compiles(monkeypatch, cache):
    """A fake compiler: returns a fake cubin, records each call."""
    calls = []

    def compile_binary(names, arch):
        calls.append((tuple(names), arch))
        return _entry(names, arch)

    monkeypatch.setattr(_cupy, "compile_binary", compile_binary)
    monkeypatch.setattr(_cupy, "versions", lambda: dict(VERSIONS))
    return calls


# ----------------------------------------------------------------------------------------
# The disk cache.


def test_the_key_changes_with_everything_the_binary_depends_on():
    base = dict(source="src", options=("--std=c++17", "-ftz=true"), arch="90", names=NAMES, versions=VERSIONS)
    key = _kernel_cache.entry_key(**base)
    assert key == _kernel_cache.entry_key(**base)
    assert key == _kernel_cache.entry_key(**{**base, "names": list(reversed(NAMES))})  # a set of kernels
    variants = [
        {"source": "src "}, {"options": ("--std=c++17",)}, {"options": ("-ftz=true", "--std=c++17")},
        {"arch": "80"}, {"names": NAMES[:-1]}, {"versions": {**VERSIONS, "cupy": "13.6.0"}},
        {"versions": {**VERSIONS, "nvrtc": "12.9"}}, {"versions": {**VERSIONS, "ptx": "1"}},
    ]
    keys = {_kernel_cache.entry_key(**{**base, **v}) for v in variants}
    assert len(keys) == len(variants) and key not in keys


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("REDNET_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _kernel_cache.cache_dir() == tmp_path / "home" / ".cache" / "rednet" / "kernels"
    monkeypatch.setenv("REDNET_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert _kernel_cache.cache_dir() == tmp_path / "elsewhere" / "kernels"


def test_both_compiled_caches_share_one_root(monkeypatch, tmp_path):
    # With $XDG_CACHE_HOME set, the CUDA binaries once went to ~/.cache and the native libraries to $XDG_CACHE_HOME.
    monkeypatch.delenv("REDNET_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _kernel_cache.cache_dir() == tmp_path / "xdg" / "rednet" / "kernels"
    monkeypatch.setattr(_native_build, "describe_compiler", lambda cxx: "a compiler")
    assert _native_build.library_path(_cpu.library(), "c++").parent == tmp_path / "xdg" / "rednet"


def test_a_second_process_loads_instead_of_compiling(compiles, cache):
    entry, key, cached = _cupy._binary(NAMES, "90")
    assert not cached and len(compiles) == 1
    assert sorted(p.name for p in cache.iterdir()) == [f"{key}.bin"]  # no temporary file left behind
    # Another process (a DDP rank, the next run) has nothing in memory: only the disk is shared.
    again, key2, cached2 = _cupy._binary(NAMES, "90")
    assert cached2 and again == entry and key2 == key and len(compiles) == 1
    _cupy._binary(NAMES, "80")  # another architecture is another entry
    assert len(compiles) == 2 and len(list(cache.iterdir())) == 2


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 7])
    elif how == "flipped byte":
        path.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(300))
    elif how == "older format":
        path.write_bytes(data.replace(b"rednet kernel binary 1\n", b"rednet kernel binary 0\n", 1))
    elif how == "header not json":
        first = data.index(b"\n") + 1
        path.write_bytes(data[:first] + b"{not json" + data[data.index(b"\n", first):])
    elif how == "other names":
        header_end = data.index(b"\n", data.index(b"\n") + 1)
        path.write_bytes(data[:header_end].replace(b"involution_fwd", b"involution_xyz") + data[header_end:])


@pytest.mark.parametrize("how", ["truncated", "flipped byte", "empty", "garbage", "older format", "header not json",
                                 "other names"])
def test_a_damaged_entry_is_compiled_again_not_fatal(compiles, cache, how):
    entry, key, _ = _cupy._binary(NAMES, "90")
    path = cache / f"{key}.bin"
    _damage(path, how)
    assert _kernel_cache.load(key, NAMES) is None
    again, _, cached = _cupy._binary(NAMES, "90")
    assert not cached and again == entry and len(compiles) == 2
    assert _kernel_cache.load(key, NAMES) == entry  # rewritten whole


@pytest.mark.parametrize("planted", ["another user's", "writable by all", "a symbolic link"])
def test_an_entry_this_user_did_not_write_is_never_read(compiles, cache, tmp_path, planted):
    # A team cache (mode 0777): whatever sits under this user's entry name is ignored unless this user wrote it.
    entry, key, _ = _cupy._binary(NAMES, "90")
    path = cache / f"{key}.bin"
    cache.chmod(0o777)
    foreign = _kernel_cache.encode(Entry(b"\x7fELF planted cubin", entry.names))  # well-formed, checksum right
    if planted == "a symbolic link":
        target = tmp_path / "elsewhere.bin"
        target.write_bytes(foreign)
        target.chmod(0o644)
        path.unlink()
        path.symlink_to(target)
    else:
        path.write_bytes(foreign)
        if planted == "writable by all":
            path.chmod(0o666)
        elif os.geteuid() == 0:
            path.chmod(0o644)
            os.chown(path, 65534, 65534)
        else:
            pytest.skip("planting another user's file needs root")
    assert _kernel_cache.load(key, NAMES) is None
    again, _, cached = _cupy._binary(NAMES, "90")
    assert not cached and again == entry and len(compiles) == 2  # compiled, and written as this user's entry
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022
    assert _kernel_cache.load(key, NAMES) == entry
    if planted == "a symbolic link":
        assert target.read_bytes() == foreign  # replaced the link, did not write through it


def test_an_unwritable_cache_costs_a_compile_not_an_error(compiles, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("REDNET_CACHE_DIR", str(blocker))
    for _ in range(2):
        entry, _, cached = _cupy._binary(NAMES, "90")
        assert not cached and entry.names
    assert len(compiles) == 2


def _store_repeatedly(key, entry, times):
    for _ in range(times):
        _kernel_cache.store(key, entry)


def test_concurrent_writers_never_leave_a_partial_entry(cache):
    # Ranks that miss at once all compile and write the same entry. A reader must only ever
    # see no file or a complete one (the rename is atomic), never a torn write.
    entry = Entry(os.urandom(1 << 18), {n: f"_Z{i}x" for i, n in enumerate(NAMES)})
    key = "k" * 64
    path = cache / f"{key}.bin"
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_store_repeatedly, args=(key, entry, 15)) for _ in range(4)]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers) or reads == 0:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        assert _kernel_cache.decode(data, NAMES) == entry
        reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert sorted(p.name for p in cache.iterdir()) == [path.name]


# ----------------------------------------------------------------------------------------
# Loading and launching, with CuPy and the device faked.


class _FakeCuda:
    """The parts of ``cupy`` and ``torch.cuda`` that ``_cupy`` touches, recording what it does."""

    def __init__(self, current: int):
        self.current = current
        self.events = []
        self.refuse = set()  # binaries the "driver" will not load
        fake = self

        class Module:
            def load(self, binary):
                fake.events.append(("load", fake.current, binary[:8]))
                if binary in fake.refuse:
                    raise RuntimeError("CUDA_ERROR_INVALID_IMAGE: device kernel image is invalid")

            def get_function(self, name):
                return _Function(fake, name)

        def forbidden(*a, **k):
            raise AssertionError("cupy.cuda.Device sets the previous device on exit: it must not be used")

        self.cupy = SimpleNamespace(cuda=SimpleNamespace(
            Module=Module, Device=forbidden,
            Stream=SimpleNamespace(from_external=lambda ts: fake.stream(ts.cuda_stream)),
            ExternalStream=lambda ptr, device: fake.stream(ptr)))
        self.fault = None  # raised by the next synchronisation

    def stream(self, ptr):
        fake = self

        def synchronize():
            fake.events.append(("sync", fake.current, ptr))
            if fake.fault is not None:
                raise fake.fault

        return SimpleNamespace(ptr=ptr, synchronize=synchronize)

    def device(self, index):
        fake = self

        class Switch:
            def __enter__(self):
                fake.events.append(("switch", fake.current, index))
                self.prev, fake.current = fake.current, index

            def __exit__(self, *exc):
                fake.current = self.prev

        return Switch()

    def current_stream(self, index):
        return SimpleNamespace(cuda_stream=0x1000 + index)  # a different stream per device


class _Function:
    def __init__(self, fake, lowered):
        self.fake, self.lowered, self.device = fake, lowered, fake.current

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        self.fake.events.append(("launch", self.fake.current, self.lowered, stream.ptr))
        self.shared_mem = shared_mem


@pytest.fixture
def fake_cuda(monkeypatch, compiles):
    fake = _FakeCuda(current=0)
    monkeypatch.setattr(_cupy, "_import_cupy", lambda: fake.cupy)
    monkeypatch.setattr(_cupy, "_arch", lambda index: "90")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    monkeypatch.setattr(torch.cuda, "current_stream", fake.current_stream)
    monkeypatch.setattr(_cupy, "_functions", {})
    monkeypatch.setattr(_cupy, "_streams", {})
    monkeypatch.setattr(_cupy, "_launched", set())
    monkeypatch.setattr(_cupy, "_capturing", lambda index: False)
    return fake


def _plan_fwd(k=7, s=2):
    x = torch.randn(1, 8, 9, 9)
    ho = (9 + 2 * 3 - 7) // s + 1
    kernel = torch.randn(1, 2, k, k, ho, ho)
    return _plan.plan_forward(x, kernel, s, (k - 1) // 2, 1)


def test_launch_on_another_device_switches_to_it_only_and_uses_its_current_stream(fake_cuda, compiles):
    y, plan = _plan_fwd()
    _cupy.launch(plan, torch.device("cuda", 1))
    lowered = _entry().names[plan.name]
    assert fake_cuda.events[0] == ("switch", 0, 1)  # one switch, to the tensor's device, restored after
    assert [e[:2] for e in fake_cuda.events[1:]] == [("load", 1), ("launch", 1), ("sync", 1)]  # run on cuda:1
    assert fake_cuda.events[2:] == [("launch", 1, lowered, 0x1001), ("sync", 1, 0x1001)]  # cuda:1's current stream
    assert fake_cuda.current == 0 and len(compiles) == 1
    fake_cuda.events.clear()
    _cupy.launch(_plan_fwd()[1], torch.device("cuda", 1))  # loaded and checked already: no compile, load, sync
    assert fake_cuda.events == [("switch", 0, 1), ("launch", 1, lowered, 0x1001)]


def test_launch_on_the_current_device_switches_nothing(fake_cuda):
    fake_cuda.current = 1
    _, plan = _plan_fwd()
    _cupy.launch(plan, torch.device("cuda", 1))
    assert not any(e[0] == "switch" for e in fake_cuda.events)
    _cupy.prepare(torch.device("cuda", 1), plan.module)
    assert not any(e[0] == "switch" for e in fake_cuda.events)
    assert [e[:2] for e in fake_cuda.events[-2:]] == [("launch", 1), ("sync", 1)]


def test_modules_load_per_device_from_one_compile(fake_cuda, compiles):
    _, plan = _plan_fwd()
    _cupy.prepare(torch.device("cuda", 0), plan.module)
    _cupy.prepare(torch.device("cuda", 1), plan.module)
    _cupy.prepare(torch.device("cuda", 1), plan.module)
    assert [e[:2] for e in fake_cuda.events if e[0] == "load"] == [("load", 0), ("load", 1)]
    assert len(compiles) == 1  # the second device read the disk cache
    assert {(i, n) for i, n in _cupy._functions} == {(i, n) for i in (0, 1) for n in NAMES}
    assert all(fn.lowered == _entry().names[n] for (_, n), fn in _cupy._functions.items())


def test_a_cached_binary_the_driver_refuses_is_rebuilt_once(fake_cuda, compiles, monkeypatch):
    _, plan = _plan_fwd()
    _cupy._binary(NAMES, "90")  # in the cache
    stale = _entry().binary
    fake_cuda.refuse.add(stale)
    fresh = Entry(b"\x7fELF rebuilt" + stale[12:], _entry().names)
    monkeypatch.setattr(_cupy, "compile_binary", lambda names, arch: compiles.append(names) or fresh)
    _cupy.prepare(0, plan.module)
    assert [e[2] for e in fake_cuda.events if e[0] == "load"] == [stale[:8], fresh[0][:8]]
    assert len(compiles) == 2 and _kernel_cache.load(_kernel_cache.entry_key(
        _cupy.source(), _cupy.COMPILE_OPTIONS, "90", NAMES, VERSIONS), NAMES) == fresh
    fake_cuda.refuse.add(fresh.binary)  # a freshly compiled binary the driver refuses: the driver's error goes out
    monkeypatch.setattr(_cupy, "_functions", {})
    monkeypatch.setattr(_kernel_cache, "load", lambda key, names: None)
    with pytest.raises(RuntimeError, match="CUDA_ERROR_INVALID_IMAGE"):
        _cupy.prepare(0, plan.module)


def test_a_kernel_fault_at_its_first_launch_names_the_kernel_and_later_launches_do_not_wait(fake_cuda):
    _, plan = _plan_fwd()
    fake_cuda.fault = RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match=r"involution kernel involution_fwd_nchw<float, 7, 2, 1> failed at its "
                                           r"first launch on cuda:0 .*illegal memory access"):
        _cupy.launch(plan, torch.device("cuda", 0))
    fake_cuda.fault = None
    _cupy.launch(plan, torch.device("cuda", 0))  # still unchecked: synchronised now
    _cupy.launch(plan, torch.device("cuda", 0))
    assert [e[0] for e in fake_cuda.events if e[0] in ("launch", "sync")] == ["launch", "sync", "launch", "sync",
                                                                                "launch"]


def test_the_first_launch_during_graph_capture_is_not_synchronised(fake_cuda, monkeypatch):
    _, plan = _plan_fwd()
    monkeypatch.setattr(_cupy, "_capturing", lambda index: True)
    _cupy.launch(plan, torch.device("cuda", 0))
    assert not any(e[0] == "sync" for e in fake_cuda.events)
    monkeypatch.setattr(_cupy, "_capturing", lambda index: False)  # the next eager launch is checked
    _cupy.launch(plan, torch.device("cuda", 0))
    assert [e[0] for e in fake_cuda.events][-2:] == ["launch", "sync"]


def test_a_launch_error_names_the_kernel(fake_cuda, monkeypatch):
    _, plan = _plan_fwd()

    def refuse(fn, grid, block, args, stream, shared_mem=0):
        raise RuntimeError("CUDA_ERROR_INVALID_VALUE: invalid argument")

    monkeypatch.setattr(_cupy, "_call", refuse)
    with pytest.raises(RuntimeError, match=r"involution kernel involution_fwd_nchw<float, 7, 2, 1> failed at its "
                                           r"first launch.*CUDA_ERROR_INVALID_VALUE"):
        _cupy.launch(plan, torch.device("cuda", 0))


def test_more_than_48_kb_of_dynamic_shared_memory_is_opted_into_once_per_device(fake_cuda, monkeypatch):
    calls = []
    driver = SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=8,
                             funcSetAttribute=lambda ptr, attr, value: calls.append((ptr, attr, value)))
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.api.driver", driver)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.api", SimpleNamespace(driver=driver))
    monkeypatch.setattr(_cupy, "_opted_in", set())
    monkeypatch.setattr(_Function, "ptr", 1234, raising=False)
    _, plan = _plan_fwd()
    big, small = plan._replace(smem=80 * 1024), plan._replace(smem=40 * 1024)
    for p, dev in ((small, 0), (big, 0), (big, 0), (big, 1)):
        _cupy.launch(p, torch.device("cuda", dev))
    assert calls == [(1234, 8, 80 * 1024)] * 2  # once on cuda:0, once on cuda:1; not for 40 KB
    assert all(_cupy._functions[(dev, plan.name)].shared_mem == 80 * 1024 for dev in (0, 1))  # as launch size
