"""CUDA involution kernels (``involution.cu``) compiled at run time by NVRTC through CuPy.

CuPy is imported lazily: importing this module works without it, and ``can_run_on`` says
why the kernels cannot run. One module is compiled per (dtype, K, stride, dilation) by
``compile_binary`` and kept on disk by ``_kernel_cache`` (one compile per machine, not per
process), then loaded once per device. Kernels launch on PyTorch's current stream of the
tensor's device, outputs are allocated by PyTorch, and nothing on the hot path
synchronises the host.

Devices: a launch for ``cuda:k`` makes ``cuda:k`` current only when it is not already
(``torch.cuda.device``, which restores the previous device only where it already has a
context). ``with cupy.cuda.Device(k)`` is avoided: its exit always sets the previous
device, which creates a context (hundreds of MB) on GPU 0 in a process that only ever
used ``cuda:k``.

This module only compiles and launches: what to launch (geometry, arguments, outputs) is
planned by ``_plan`` without CuPy, and ``_custom_op`` puts the two together as a PyTorch op.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import _kernel_cache
from ._plan import THREADS, TYPE_NAMES, Launch, name_expressions

__all__ = ["COMPILE_OPTIONS", "NVRTC_OPTIONS", "SOURCE_PATH", "can_run_on", "compile_binary", "launch", "prepare",
           "source"]

SOURCE_PATH = Path(__file__).with_name("involution.cu")
NVRTC_OPTIONS = ("--std=c++17",)
# What cupy.RawModule passes to NVRTC for this header-free source, which the kernels were
# written against: CuPy adds -ftz=true to every NVRTC compile (compile_using_nvrtc then adds
# the -arch and --device-as-default-execution-space options itself). CuPy's include paths
# are left out: the source includes nothing, and their lookup is what fails in some
# installs ("Failed to find CUDA headers").
COMPILE_OPTIONS = NVRTC_OPTIONS + ("-ftz=true",)


@functools.cache
def source() -> str:
    return SOURCE_PATH.read_text()


def _import_cupy():
    import cupy  # lazy: CuPy is optional

    return cupy


def installed() -> bool:
    """Whether CuPy is installed at all (without importing it): if not, the kernels were never asked for."""
    return importlib.util.find_spec("cupy") is not None


@functools.cache
def _device_status(index: int) -> tuple[bool, str]:
    """Cached: the answer does not change within a process, and the check is not free."""
    try:
        cupy = _import_cupy()
    except Exception as e:  # noqa: BLE001  (ImportError, or a CuPy build that fails to load its CUDA libraries)
        return False, (f"CuPy is not importable ({type(e).__name__}: {e}); "
                       "install cupy-cuda13x (pip install rednet[cuda])")
    try:
        if not cupy.cuda.is_available():
            return False, "CuPy sees no usable CUDA device (driver or runtime mismatch?)"
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001  (any CUDA runtime failure means "cannot run", with the reason)
        return False, f"CuPy cannot query CUDA ({type(e).__name__}: {e})"
    if index >= count:
        return False, f"CuPy sees {count} device(s), the tensor is on cuda:{index} (CUDA_VISIBLE_DEVICES differs?)"
    return True, "ok"


def can_run_on(device_type: str, device_index: int | None, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the kernels can run for tensors of this device and dtype, and if not, why."""
    if device_type != "cuda":
        return False, f"input is on {device_type}, the CUDA kernel needs a CUDA tensor"
    if dtype not in TYPE_NAMES:
        return False, f"dtype {dtype} has no kernel; supported: {tuple(TYPE_NAMES)}"
    index = torch.cuda.current_device() if device_index is None else device_index
    return _device_status(index)


# ----------------------------------------------------------------------------------------
# Compiling, with the binary kept on disk.


def versions() -> dict[str, str]:
    """The CuPy and NVRTC versions a binary depends on (part of the disk cache's key)."""
    cupy = _import_cupy()
    major, minor = cupy.cuda.nvrtc.getVersion()
    # CuPy compiles to PTX instead of a cubin when this is set; the entry must differ.
    return {"cupy": cupy.__version__, "nvrtc": f"{major}.{minor}",
            "ptx": os.environ.get("CUPY_COMPILE_WITH_PTX", "")}


def compile_binary(names: Sequence[str], arch: str) -> _kernel_cache.Entry:
    """Compile ``involution.cu`` for ``names`` (name expressions) and ``sm_<arch>`` with NVRTC.

    Through ``cupy.cuda.compiler.compile_using_nvrtc``, the function ``cupy.RawModule`` ends
    in below CuPy's disk cache: CuPy picks ``-arch=sm_<arch>`` (a cubin) or, where its NVRTC
    cannot target the device, ``-arch=compute_<arch>`` (PTX the driver compiles).
    """
    from cupy.cuda import compiler  # lazy: CuPy is optional

    binary, mapping = compiler.compile_using_nvrtc(source(), COMPILE_OPTIONS, arch=arch, filename="involution.cu",
                                                   name_expressions=list(names))
    return _kernel_cache.Entry(bytes(binary), {n: mapping[n] for n in names})


def _binary(names: Sequence[str], arch: str) -> tuple[_kernel_cache.Entry, str, bool]:
    """The module's entry, its key, and whether it came from the disk cache (else compiled and stored)."""
    key = _kernel_cache.entry_key(source(), COMPILE_OPTIONS, arch, names, versions())
    entry = _kernel_cache.load(key, names)
    if entry is not None:
        return entry, key, True
    entry = compile_binary(names, arch)
    _kernel_cache.store(key, entry)
    return entry, key, False


def _arch(index: int) -> str:
    """The architecture cupy.RawModule compiles for on ``cuda:index`` (which must be current)."""
    from cupy.cuda import compiler  # lazy: CuPy is optional

    get_arch = getattr(compiler, "_get_arch", None)
    if get_arch is not None:
        # The device's, capped at the newest that CuPy's NVRTC supports (a cubin runs on
        # later minor versions of its major one).
        return str(get_arch())
    major, minor = torch.cuda.get_device_capability(index)
    return f"{major}{minor}"


def _load_functions(index: int, module: tuple) -> dict[str, Any]:
    """Compile or load the kernels of ``module`` (dtype, K, S, D) on device ``index`` (current)."""
    cupy = _import_cupy()
    names = name_expressions(*module)
    arch = _arch(index)
    entry, key, cached = _binary(names, arch)
    mod = cupy.cuda.Module()
    try:
        mod.load(entry.binary)
    except Exception:  # noqa: BLE001  (a cached binary the driver refuses: rebuild it once; a new one's error goes out)
        if not cached:
            raise
        entry = compile_binary(names, arch)
        _kernel_cache.store(key, entry)
        mod = cupy.cuda.Module()
        mod.load(entry.binary)
    return {n: mod.get_function(entry.names[n]) for n in names}  # each Function keeps mod loaded


_lock = threading.Lock()
_functions: dict[tuple[int, str], Any] = {}  # (device, name expression) -> cupy Function
_streams: dict[tuple[int, int], Any] = {}  # (device, cudaStream_t) -> cupy Stream


def _index(device: torch.device | int) -> int:
    if isinstance(device, int):
        return device
    return torch.cuda.current_device() if device.index is None else device.index


def _on_device(index: int):
    """Make ``cuda:index`` current for a block, touching no other device.

    No-op when it already is; else ``torch.cuda.device``, whose exit restores the previous
    device only if that device already has a context.
    """
    if torch.cuda.current_device() == index:
        return contextlib.nullcontext()
    return torch.cuda.device(index)


def prepare(device: torch.device | int, module: tuple) -> None:
    """Compile (or load from disk) and load the kernels of ``module`` (dtype, K, S, D) on ``device``."""
    index = _index(device)
    with _on_device(index):
        _ensure(index, module)


def _ensure(index: int, module: tuple) -> None:
    names = name_expressions(*module)
    if all((index, n) in _functions for n in names):
        return
    with _lock:
        if not all((index, n) in _functions for n in names):  # another thread may have loaded it meanwhile
            for n, fn in _load_functions(index, module).items():
                _functions[(index, n)] = fn


def _function(index: int, plan: Launch):
    fn = _functions.get((index, plan.name))
    if fn is None:
        _ensure(index, plan.module)
        fn = _functions[(index, plan.name)]
    return fn


def _stream(cupy, index: int):
    ts = torch.cuda.current_stream(index)
    key = (index, ts.cuda_stream)
    cs = _streams.get(key)
    if cs is None:
        try:
            cs = cupy.cuda.Stream.from_external(ts)  # the CUDA stream protocol, CuPy >= 14
        except (AttributeError, TypeError):
            cs = cupy.cuda.ExternalStream(ts.cuda_stream, index)
        _streams[key] = cs
    return cs


def _call(fn, grid: tuple, block: tuple, args: tuple, stream, shared_mem: int = 0) -> None:
    # The one place a kernel is queued; tests spy on the stream it is given. The stream is
    # passed explicitly rather than made CuPy's current one, which is thread-global state.
    fn(grid, block, args, shared_mem=shared_mem, stream=stream)


_STATIC_SHARED_LIMIT = 48 * 1024  # dynamic shared memory beyond this needs the function's opt-in
_opted_in: set[tuple[int, str]] = set()  # (device, name expression) allowed its plan's shared memory


def _allow_shared(fn, index: int, plan: Launch) -> None:
    if plan.smem <= _STATIC_SHARED_LIMIT or (index, plan.name) in _opted_in:
        return
    from cupy_backends.cuda.api import driver  # lazy: CuPy is optional

    driver.funcSetAttribute(fn.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, plan.smem)
    _opted_in.add((index, plan.name))


_launched: set[tuple[int, str]] = set()  # (device, name expression) launched and synchronised once


def _capturing(index: int) -> bool:
    """Whether PyTorch's current stream of ``cuda:index`` (current) is capturing a CUDA graph."""
    return torch.cuda.is_current_stream_capturing()


def launch(plan: Launch | None, device: torch.device) -> None:
    """Queue ``plan`` on PyTorch's current stream of ``device``; returns without waiting.

    Except the first time a kernel runs on a device in this process: then the stream is
    synchronised after it (not during CUDA graph capture), so that a fault of that kernel
    surfaces here, named, rather than at some later unrelated call. A failure to launch is
    named too. The cost is one synchronisation per kernel and device.
    """
    if plan is None:
        return
    cupy = _import_cupy()
    index = _index(device)
    with _on_device(index):
        first = (index, plan.name) not in _launched
        fn = _function(index, plan)
        try:
            _allow_shared(fn, index, plan)
            stream = _stream(cupy, index)
            _call(fn, (plan.grid,), (THREADS,), plan.args, stream, plan.smem)
            if first and not _capturing(index):
                stream.synchronize()
                _launched.add((index, plan.name))
        except Exception as e:  # noqa: BLE001  (re-raised with the kernel it belongs to)
            when = "at its first launch" if first else "at launch"
            raise RuntimeError(f"involution kernel {plan.name} failed {when} on cuda:{index} (grid {plan.grid}, "
                               f"{plan.smem} B of dynamic shared memory): {type(e).__name__}: {e}") from e
