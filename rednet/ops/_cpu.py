"""Native CPU involution: ``csrc/involution_cpu.cpp`` compiled at first use and called through ctypes.

The C++ source has no PyTorch headers, so a build takes 3-5 s of CPU time (2-core Xeon)
where the same source through ``torch.utils.cpp_extension`` took 47 s, and it needs only
a C++ compiler. ``_native_build`` compiles it (``$CXX``, else ``g++``) and caches the
library on disk, keyed by the source, the flags, the compiler, this CPU and the user, and
checks it before every load, so every other process of the user (DDP ranks included) just
loads it.

Threads come from OpenMP, and it must be PyTorch's OpenMP runtime: a second one in the
process makes each spin against the other (2 threads were seen running 3x slower than 1). The library
names ``libgomp.so.1``, and the dynamic loader reuses the one PyTorch already loaded
under that name; ``openmp_runtimes`` lists what is mapped so tests can check. Each call
passes ``torch.get_num_threads()`` explicitly (fewer for small calls).

When there is no compiler, the build fails or the library does not load, ``available``
says why (one WARNING per process) and callers use the reference instead.
"""
from __future__ import annotations

import ctypes
import logging
import re
import subprocess
import threading
from pathlib import Path

import torch

from . import _native_build
from ._memory_format import alloc_grad_input, alloc_grad_kernel, alloc_output, dense, dense_kernel, memory_format_of

__all__ = [
    "CXX_FLAGS",
    "DTYPES",
    "SOURCE_PATH",
    "available",
    "backward_input",
    "backward_kernel",
    "can_run_on",
    "forward",
    "fused_forward",
    "library",
    "openmp_runtimes",
]

_logger = logging.getLogger(__name__)

SOURCE_PATH = Path(__file__).parent / "csrc" / "involution_cpu.cpp"
# -std=gnu++17, not c++17: ISO mode turns off FMA contraction (-ffp-contract=off).
# -Wno-psabi: silences a note about passing 128-byte vectors, which happens only inside the library.
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu++17", "-Wno-psabi")
DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}  # as in involution_cpu.cpp
_ABI = 2  # rednet_involution_abi() of the source this module speaks to
_LAYOUTS = {"nchw": 0, "nhwc": 1}
_FWD, _BWD_INPUT, _BWD_KERNEL = 0, 1, 2
# Multiply-adds per thread below which more threads cost more than they save (PyTorch's own
# ops have a grain size for the same reason): on a busy machine a second OpenMP thread that
# is not scheduled makes a 0.3 ms call take 20+ ms at the barrier.
_GRAIN = 1 << 17


def library() -> _native_build.NativeLibrary:
    """The native involution library: this module's C++ source and flags."""
    return _native_build.NativeLibrary("involution_cpu", SOURCE_PATH.read_bytes(), CXX_FLAGS)


def openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    names = re.compile(r"/lib(gomp|iomp5|omp)[^/]*\.so[^/]*$")
    return sorted({line.split(None, 5)[-1] for line in maps.splitlines() if names.search(line)})


def _load() -> ctypes.CDLL:
    """Build (or find) and load the library; raises OSError/subprocess errors with the reason."""
    before = openmp_runtimes()
    lib = _native_build.load(library())
    after = openmp_runtimes()
    if len(after) > max(len(before), 1):
        # Too late to unload it; say so, since every parallel region now competes with PyTorch's.
        _logger.warning("involution: loading the native library added an OpenMP runtime beside PyTorch's: %s",
                        after)
    if lib.rednet_involution_abi() != _ABI:
        raise OSError(f"the library built from {SOURCE_PATH.name} speaks ABI {lib.rednet_involution_abi()}, "
                      f"this module {_ABI}")
    fn = lib.rednet_involution
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
    fn.restype = ctypes.c_int
    fused = lib.rednet_involution_fused
    fused.argtypes = [ctypes.c_void_p] * 8 + [ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
    fused.restype = ctypes.c_int
    return lib


_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib" or "why", set once per process


def available() -> tuple[bool, str]:
    """Whether the native library is (or can be made) ready, and if not, why. Builds it on first call."""
    if not _state:
        with _lock:
            if not _state:
                try:
                    _state["lib"] = _load()
                except (OSError, subprocess.SubprocessError, AttributeError) as e:  # AttributeError: symbol missing
                    why = f"native CPU involution unavailable ({type(e).__name__}: {e})"
                    _logger.warning("involution: %s; using the PyTorch reference", why)
                    _state["why"] = why
    if "lib" in _state:
        return True, "ok"
    return False, str(_state["why"])


def _reset() -> None:
    """Forget the loaded library or failure (tests)."""
    with _lock:
        _state.clear()


def can_run_on(device_type: str, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the native kernels can run for tensors of this device and dtype, and if not, why."""
    if device_type != "cpu":
        return False, f"input is on {device_type}, the native kernel needs a CPU tensor"
    if dtype not in DTYPES:
        return False, f"dtype {dtype} has no native CPU kernel; supported: {tuple(DTYPES)}"
    return available()


# ----------------------------------------------------------------------------------------
# The three passes on torch tensors. Outputs are allocated, and inputs densified, by
# ``_memory_format``, as for the CUDA kernels and the custom op's fake functions: in x's
# memory format, grad_kernel stored as (B, Ho, Wo, G, K, K) when x is channels_last.


def _call(pass_: int, layout: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, x_shape, kernel_shape,
          stride: int, padding: int, dilation: int) -> None:
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    if not (a.dtype == b.dtype == out.dtype) or a.device.type != "cpu":
        raise ValueError(f"involution (native): tensors must be CPU tensors of one dtype, got {a.dtype}, {b.dtype}")
    bsz, c, h, w = x_shape
    _, g, k, _, ho, wo = kernel_shape
    dims = (ctypes.c_int64 * 11)(bsz, c, h, w, g, k, ho, wo, stride, padding, dilation)
    threads = max(1, min(torch.get_num_threads(), bsz * c * ho * wo * k * k // _GRAIN))
    rc = _state["lib"].rednet_involution(pass_, _LAYOUTS[layout], DTYPES[out.dtype], a.data_ptr(), b.data_ptr(),
                                         out.data_ptr(), dims, threads)
    if rc != 0:
        raise RuntimeError(f"involution (native): library returned {rc} for pass {pass_}, {layout}, {out.dtype}")


def forward(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """Involution of x (B, C, H, W) with kernel (B, G, K, K, Ho, Wo); (B, C, Ho, Wo) in x's layout.

    Args:
        x: CPU input; channels_last is the fast layout, other strides are copied to the nearer one.
        kernel: per-pixel kernels, same dtype.
        stride: output stride.
        padding: zero padding.
        dilation: spacing between taps.
    """
    y = alloc_output(x, kernel)
    if y.numel() == 0:
        return y
    layout = memory_format_of(x)
    _call(_FWD, layout, dense(x, layout), dense_kernel(kernel, layout), y, x.shape, kernel.shape, stride, padding,
          dilation)
    return y


def backward_input(grad_out: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int,
                   dilation: int) -> torch.Tensor:
    """Gradient w.r.t. x, in x's layout; reads only x's shape and layout.

    Args:
        grad_out: gradient of the output (B, C, Ho, Wo).
        x: the forward input.
        kernel: the forward kernel.
        stride: output stride.
        padding: zero padding.
        dilation: spacing between taps.
    """
    gx = alloc_grad_input(x)
    if gx.numel() == 0:
        return gx
    if grad_out.numel() == 0:  # no output pixels: nothing reads x
        return gx.zero_()
    layout = memory_format_of(x)
    _call(_BWD_INPUT, layout, dense(grad_out, layout), dense_kernel(kernel, layout), gx, x.shape, kernel.shape,
          stride, padding, dilation)
    return gx


def backward_kernel(grad_out: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int,
                    dilation: int) -> torch.Tensor:
    """Gradient w.r.t. the kernel (B, G, K, K, Ho, Wo), stored (B, Ho, Wo, G, K, K) when x is channels_last.

    Args:
        grad_out: gradient of the output (B, C, Ho, Wo).
        x: the forward input.
        kernel: the forward kernel; only its shape is read.
        stride: output stride.
        padding: zero padding.
        dilation: spacing between taps.
    """
    gw = alloc_grad_kernel(x, kernel)
    if gw.numel() == 0:
        return gw
    if x.shape[1] == 0:  # no channels to sum over
        return gw.zero_()
    layout = memory_format_of(x)
    _call(_BWD_KERNEL, layout, dense(grad_out, layout), dense(x, layout), gw, x.shape, kernel.shape, stride,
          padding, dilation)
    return gw


def fused_forward(x: torch.Tensor, reduce_weight: torch.Tensor, reduce_bias: torch.Tensor, span_weight: torch.Tensor,
                  span_bias: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, kernel_size: int,
                  stride: int, groups: int, relu: bool) -> torch.Tensor:
    """The fused inference pass on float32 channels_last tensors; see ``_fused`` for the weights' layout.

    Args:
        x: input (B, C, H, W), channels_last.
        reduce_weight: (C, R) and reduce_bias (R): the reduce conv with its BatchNorm folded in.
        reduce_bias: see reduce_weight.
        span_weight: (R, N) and span_bias (N): the span conv, N >= G*K*K.
        span_bias: see span_weight.
        scale: per-channel (C) scale applied to the involution's output, or None.
        shift: per-channel (C) shift, with scale.
        kernel_size: window K (odd); padding is (K - 1) // 2.
        stride: output stride.
        groups: G.
        relu: a ReLU after the affine map.
    """
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    b, c, h, w = x.shape
    ho, wo = (h + stride - 1) // stride, (w + stride - 1) // stride  # "same" padding, odd K
    y = torch.empty((b, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if y.numel() == 0:
        return y
    x = x.contiguous(memory_format=torch.channels_last)
    r, n = reduce_weight.shape[1], span_weight.shape[1]
    dims = (ctypes.c_int64 * 13)(b, c, h, w, groups, kernel_size, ho, wo, stride, (kernel_size - 1) // 2, r, n,
                                 int(relu))
    # Multiply-adds of the three GEMM-like parts, for the thread count as in _call.
    work = b * ho * wo * (c * r + r * n + c * kernel_size * kernel_size)
    threads = max(1, min(torch.get_num_threads(), work // _GRAIN))
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    rc = _state["lib"].rednet_involution_fused(
        x.data_ptr(), reduce_weight.data_ptr(), reduce_bias.data_ptr(), span_weight.data_ptr(), span_bias.data_ptr(),
        ptr(scale), ptr(shift), y.data_ptr(), dims, threads)
    if rc != 0:
        raise RuntimeError(f"involution (native fused): library returned {rc} for {tuple(x.shape)}, K={kernel_size}, "
                           f"groups={groups}, R={r}, N={n}")
    return y
