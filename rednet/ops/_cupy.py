"""CUDA involution kernels (``involution.cu``) compiled at run time by NVRTC through CuPy.

CuPy is imported lazily: importing this module works without it, and ``can_run_on`` says
why the kernels cannot run. One ``cupy.RawModule`` is compiled per (dtype, K, stride,
dilation) and device and cached (CuPy also keeps the binary on disk). Kernels launch on
PyTorch's current stream of the tensor's device, outputs are allocated by PyTorch, and
nothing on the hot path synchronises the host.

The launch geometry and arguments are computed by ``plan_*`` (pure PyTorch, no CuPy) and
executed by ``launch``; tests run the same plans on a host emulation of the kernels.
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "LAYOUTS",
    "SOURCE_PATH",
    "TYPE_NAMES",
    "Launch",
    "alloc_grad_kernel",
    "alloc_output",
    "can_run_on",
    "involution_cupy",
    "kernel_name",
    "launch",
    "layout_of",
    "name_expressions",
    "plan_backward_input",
    "plan_backward_kernel",
    "plan_forward",
    "source",
]

SOURCE_PATH = Path(__file__).with_name("involution.cu")
NVRTC_OPTIONS = ("--std=c++17",)
TYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "half_t", torch.bfloat16: "bf16_t"}
KINDS = ("fwd", "bwd_input", "bwd_kernel")
LAYOUTS = ("nchw", "nhwc")
TILE_W, TILE_H, THREADS = 32, 8, 256  # as in involution.cu
_MAX_BLOCKS = 1 << 20  # grid-stride kernels cover the rest with their loop


class Launch(NamedTuple):
    """One kernel launch: ``name`` is a name expression of ``involution.cu``."""

    name: str
    module: tuple  # (dtype, K, stride, dilation): the RawModule that holds the kernel
    grid: int
    args: tuple  # numpy scalars in the kernel's parameter order (pointers as uint64)
    keep: tuple  # tensors the pointers refer to, alive until the launch is queued


@functools.cache
def source() -> str:
    return SOURCE_PATH.read_text()


def kernel_name(kind: str, layout: str, dtype: torch.dtype, k: int, stride: int, dilation: int) -> str:
    return f"involution_{kind}_{layout}<{TYPE_NAMES[dtype]}, {k}, {stride}, {dilation}>"


def name_expressions(dtype: torch.dtype, k: int, stride: int, dilation: int) -> list[str]:
    """The kernels of one module: every kind and layout for one (dtype, K, S, D)."""
    return [kernel_name(kind, lay, dtype, k, stride, dilation) for lay in LAYOUTS for kind in KINDS]


# ----------------------------------------------------------------------------------------
# Layouts and allocation; shared with the fake implementations so strides agree.


def layout_of(x: torch.Tensor) -> str:
    """``'nhwc'`` for channels_last inputs (and strided ones closer to it), else ``'nchw'``."""
    if x.is_contiguous():
        return "nchw"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    # Neither: copy into the layout whose innermost dimension is already densest.
    return "nhwc" if x.stride(1) < x.stride(3) else "nchw"


def _fmt(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "nhwc" else torch.contiguous_format


def alloc_output(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(B, C, Ho, Wo) in x's layout."""
    b, c = x.shape[:2]
    ho, wo = kernel.shape[-2:]
    return torch.empty((b, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=_fmt(layout_of(x)))


def alloc_grad_input(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_fmt(layout_of(x)))


def alloc_grad_kernel(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(B, G, K, K, Ho, Wo), stored as (B, Ho, Wo, G, K, K) when x is channels_last."""
    b, g, k, _, ho, wo = kernel.shape
    if layout_of(x) == "nhwc":
        gw = torch.empty((b, ho, wo, g, k, k), dtype=kernel.dtype, device=kernel.device)
        return gw.permute(0, 3, 4, 5, 1, 2)  # (B, G, K, K, Ho, Wo) view
    return torch.empty(kernel.shape, dtype=kernel.dtype, device=kernel.device)


def _kernel_nhwc(kernel: torch.Tensor) -> torch.Tensor:
    # (B, G, K, K, Ho, Wo) -> (B, Ho, Wo, G, K, K) contiguous; no copy when the kernel is a
    # view of a channels_last (B, G*K*K, Ho, Wo) conv output.
    return kernel.permute(0, 4, 5, 1, 2, 3).contiguous()


# ----------------------------------------------------------------------------------------
# Launch plans (no CuPy).


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _plan(kind: str, ins: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor, x_shape, kernel_shape,
          stride: int, padding: int, dilation: int, layout: str) -> Launch:
    b, c, h, w = x_shape
    _, g, k, _, ho, wo = kernel_shape
    dims = tuple(np.int32(v) for v in (c, h, w, g, ho, wo, padding))
    name = kernel_name(kind, layout, out.dtype, k, stride, dilation)
    module = (out.dtype, k, stride, dilation)
    # Raw pointers address the storage as laid out by the plan; the NHWC grad_w output is a
    # permuted view whose storage is (B, Ho, Wo, G, K, K) contiguous, which data_ptr() still is.
    args = (_ptr(ins[0]), _ptr(ins[1]), _ptr(out)) + dims
    if layout == "nchw":
        rows, cols = (h, w) if kind == "bwd_input" else (ho, wo)  # bwd_input tiles input pixels
        tiles_w = _cdiv(cols, TILE_W)
        tiles = _cdiv(rows, TILE_H) * tiles_w
        grid = tiles * b * g
        if grid >= 2**31:
            raise ValueError(f"involution: grid of {grid} blocks is too large for one launch")
        return Launch(name, module, grid, args + (np.int32(tiles_w), np.int32(tiles)), ins)
    n = out.numel()
    return Launch(name, module, min(_cdiv(n, THREADS), _MAX_BLOCKS), args + (np.int64(n),), ins)


def plan_forward(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int, dilation: int) -> tuple[torch.Tensor, Launch | None]:
    y = alloc_output(x, kernel)
    if y.numel() == 0:
        return y, None
    layout = layout_of(x)
    if layout == "nchw":
        ins = (x.contiguous(), kernel.contiguous())
    else:
        ins = (x.contiguous(memory_format=torch.channels_last), _kernel_nhwc(kernel))
    return y, _plan("fwd", ins, y, x.shape, kernel.shape, stride, padding, dilation, layout)


def plan_backward_input(grad_out: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int,
                        dilation: int) -> tuple[torch.Tensor, Launch | None]:
    gx = alloc_grad_input(x)
    if gx.numel() == 0:
        return gx, None
    if grad_out.numel() == 0:  # no output pixels: nothing reads x
        return gx.zero_(), None
    layout = layout_of(x)
    if layout == "nchw":
        ins = (grad_out.contiguous(), kernel.contiguous())
    else:
        ins = (grad_out.contiguous(memory_format=torch.channels_last), _kernel_nhwc(kernel))
    return gx, _plan("bwd_input", ins, gx, x.shape, kernel.shape, stride, padding, dilation, layout)


def plan_backward_kernel(grad_out: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int,
                         dilation: int) -> tuple[torch.Tensor, Launch | None]:
    gw = alloc_grad_kernel(x, kernel)
    if gw.numel() == 0:
        return gw, None
    if x.shape[1] == 0:  # no channels to sum over
        return gw.zero_(), None
    layout = layout_of(x)
    if layout == "nchw":
        ins = (grad_out.contiguous(), x.contiguous())
    else:
        ins = (grad_out.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last))
    return gw, _plan("bwd_kernel", ins, gw, x.shape, kernel.shape, stride, padding, dilation, layout)


# ----------------------------------------------------------------------------------------
# CuPy: availability, compilation cache, launch.


def _import_cupy():
    import cupy  # lazy: CuPy is optional

    return cupy


@functools.cache
def _device_status(index: int) -> tuple[bool, str]:
    """Cached: the answer does not change within a process, and the check is not free."""
    try:
        cupy = _import_cupy()
    except Exception as e:  # ImportError, or a CuPy build that fails to load its CUDA libraries
        return False, f"CuPy is not importable ({type(e).__name__}: {e}); install cupy-cuda13x (pip install rednet[cuda])"
    try:
        if not cupy.cuda.is_available():
            return False, "CuPy sees no usable CUDA device (driver or runtime mismatch?)"
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
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


def involution_cupy(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """The CUDA kernels through the ``rednet::involution`` custom op (autograd included)."""
    from . import _custom_op  # noqa: F401  (registers the op on first use)

    return torch.ops.rednet.involution(x, kernel, stride, padding, dilation)
