"""CUDA involution kernels (``involution.cu``) compiled at run time by NVRTC through CuPy.

CuPy is imported lazily: importing this module works without it, and ``can_run_on`` says
why the kernels cannot run. One ``cupy.RawModule`` is compiled per (dtype, K, stride,
dilation) and device and cached (CuPy also keeps the binary on disk). Kernels launch on
PyTorch's current stream of the tensor's device, outputs are allocated by PyTorch, and
nothing on the hot path synchronises the host.

This module only compiles and launches: what to launch (geometry, arguments, outputs) is
planned by ``_plan`` without CuPy, and ``_custom_op`` puts the two together as a PyTorch op.
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import torch

from ._plan import THREADS, TYPE_NAMES, Launch, name_expressions

__all__ = ["NVRTC_OPTIONS", "SOURCE_PATH", "can_run_on", "launch", "source"]

SOURCE_PATH = Path(__file__).with_name("involution.cu")
NVRTC_OPTIONS = ("--std=c++17",)


@functools.cache
def source() -> str:
    return SOURCE_PATH.read_text()


def _import_cupy():
    import cupy  # lazy: CuPy is optional

    return cupy


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


_lock = threading.Lock()
_functions: dict[tuple[int, str], Any] = {}  # (device, name expression) -> cupy.RawKernel
_streams: dict[tuple[int, int], Any] = {}  # (device, cudaStream_t) -> cupy Stream


def _function(cupy, device: int, plan: Launch):
    fn = _functions.get((device, plan.name))
    if fn is None:
        with _lock:
            # Compile (or load from CuPy's disk cache) the whole module of this (dtype, K, S, D).
            names = name_expressions(*plan.module)
            with cupy.cuda.Device(device):
                mod = cupy.RawModule(code=source(), options=NVRTC_OPTIONS, name_expressions=names)
                for n in names:
                    _functions[(device, n)] = mod.get_function(n)
        fn = _functions[(device, plan.name)]
    return fn


def _stream(cupy, device: int):
    ts = torch.cuda.current_stream(device)
    key = (device, ts.cuda_stream)
    cs = _streams.get(key)
    if cs is None:
        try:
            cs = cupy.cuda.Stream.from_external(ts)  # the CUDA stream protocol, CuPy >= 14
        except (AttributeError, TypeError):
            cs = cupy.cuda.ExternalStream(ts.cuda_stream, device)
        _streams[key] = cs
    return cs


def launch(plan: Launch | None, device: torch.device) -> None:
    """Queue ``plan`` on PyTorch's current stream of ``device``; returns without waiting."""
    if plan is None:
        return
    cupy = _import_cupy()
    index = torch.cuda.current_device() if device.index is None else device.index
    fn = _function(cupy, index, plan)
    with cupy.cuda.Device(index), _stream(cupy, index):
        fn((plan.grid,), (THREADS,), plan.args)
