"""The involution operator: one front door, several backends.

``involution(x, kernel)`` validates its inputs, then dispatches to the CUDA kernel
(compiled through CuPy) for CUDA tensors and to the native C++ kernel (compiled at first
use, ``_cpu``) for CPU tensors when they can run, and to the pure-PyTorch reference
otherwise. ``REDNET_INVOLUTION_BACKEND=reference|cupy|native`` forces a backend; ``auto``
(the default) chooses. Importing this package never imports CuPy or builds anything.
"""
from __future__ import annotations

import logging
import os

import torch

from . import _cpu, _cupy  # cheap: CuPy is imported, and the C++ built, only when a kernel is checked or runs
from ._reference import involution_reference, involution_unfold

__all__ = [
    "BACKENDS",
    "can_use_cuda_kernel",
    "can_use_native_kernel",
    "involution",
    "involution_output_size",
    "involution_reference",
    "involution_unfold",
    "select_backend",
]

_logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "cupy", "native")
_ENV = "REDNET_INVOLUTION_BACKEND"
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 is left alone, as autocast does
_AUTOCAST_DEVICES = ("cuda", "cpu")  # is_autocast_enabled raises for others (e.g. meta)


def involution_output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def can_use_cuda_kernel(x: torch.Tensor) -> tuple[bool, str]:
    """Whether the CuPy kernel can run on ``x``, and if not, why."""
    return _cupy.can_run_on(x.device.type, x.device.index, x.dtype)


def can_use_native_kernel(x: torch.Tensor) -> tuple[bool, str]:
    """Whether the native CPU kernel can run on ``x`` (building it on first call), and if not, why."""
    return _cpu.can_run_on(x.device.type, x.dtype)


def select_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """Resolve ``backend`` (or the environment variable) to ``'reference'``, ``'cupy'`` or ``'native'``."""
    return _select_backend(x.device.type, x.device.index, x.dtype, backend)


# Depends only on static facts (device, dtype, the environment), so torch.compile runs it once
# while tracing and keeps the answer as a constant instead of tracing CuPy and logging.
@torch.compiler.assume_constant_result
def _select_backend(device_type: str, device_index: int | None, dtype: torch.dtype, backend: str | None) -> str:
    backend = (backend or os.environ.get(_ENV) or "auto").lower()
    if backend not in BACKENDS:
        raise ValueError(f"unknown involution backend {backend!r} (from argument or ${_ENV}); choose one of {BACKENDS}")
    if backend == "reference":
        return backend
    if backend == "native" or (backend == "auto" and device_type == "cpu"):
        return _select_native(device_type, dtype, backend)
    ok, why = _cupy.can_run_on(device_type, device_index, dtype)
    if backend == "cupy" and not ok:
        raise RuntimeError(f"involution backend 'cupy' was forced but cannot run: {why}. Unset ${_ENV} or set it to 'reference'.")
    if not ok:
        _logger.debug("involution: CUDA kernel declined, using the reference: %s", why)
        return "reference"
    from . import _custom_op  # noqa: F401  (registers rednet::involution before it is traced or called)

    return "cupy"


def _select_native(device_type: str, dtype: torch.dtype, backend: str) -> str:
    ok, why = _cpu.can_run_on(device_type, dtype)
    if backend == "native" and not ok:
        raise RuntimeError(f"involution backend 'native' was forced but cannot run: {why}. Unset ${_ENV} or set it to "
                           "'reference'.")
    if not ok:
        _logger.debug("involution: native CPU kernel declined, using the reference: %s", why)
        return "reference"
    from . import _custom_op  # noqa: F401  (registers rednet::involution, whose CPU kernel is the native one)

    return "native"


def _check(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int, dilation: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"involution: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if kernel.dim() != 6:
        raise ValueError(
            f"involution: kernel must be 6-D (B, G, K, K, Ho, Wo), got shape {tuple(kernel.shape)}; "
            "view a (B, G*K*K, Ho, Wo) kernel as (B, G, K, K, Ho, Wo)"
        )
    for name, val, lo in (("stride", stride, 1), ("dilation", dilation, 1), ("padding", padding, 0)):
        if not isinstance(val, int) or val < lo:
            raise ValueError(f"involution: {name} must be an int >= {lo}, got {val!r}")
    b, c, h, w = x.shape
    kb, g, k, k2, ho, wo = kernel.shape
    if kb != b:
        raise ValueError(f"involution: batch sizes differ: x has {b}, kernel has {kb}")
    if k != k2 or k < 1:
        raise ValueError(f"involution: kernel window must be square, got {k}x{k2} in kernel shape {tuple(kernel.shape)}")
    if g < 1 or c % g:
        raise ValueError(f"involution: channels C={c} must be divisible by the number of groups G={g} (kernel dim 1)")
    eho = involution_output_size(h, k, stride, padding, dilation)
    ewo = involution_output_size(w, k, stride, padding, dilation)
    if eho < 1 or ewo < 1:
        raise ValueError(
            f"involution: input {h}x{w} is too small for K={k}, stride={stride}, padding={padding}, dilation={dilation}"
        )
    if (ho, wo) != (eho, ewo):
        raise ValueError(
            f"involution: kernel spatial size {ho}x{wo} does not match the output size {eho}x{ewo} of a {h}x{w} "
            f"input with K={k}, stride={stride}, padding={padding}, dilation={dilation}; generate the kernel at the output "
            "resolution (average-pool the input by the stride first)"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"involution: dtype {x.dtype} is not supported; use one of {_FLOAT_DTYPES}")
    if kernel.dtype != x.dtype:
        raise ValueError(f"involution: x is {x.dtype} but kernel is {kernel.dtype}; cast one so they match")
    if kernel.device != x.device:
        raise ValueError(f"involution: x is on {x.device} but kernel is on {kernel.device}; move them to one device")


def involution(
    x: torch.Tensor,
    kernel: torch.Tensor,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """Involution of ``x`` (B, C, H, W) with per-pixel kernels (B, G, K, K, Ho, Wo).

    ``y[b, c, i, j] = sum_{u,v} kernel[b, c // (C/G), u, v, i, j] * x[b, c, i*s - p + u*d, j*s - p + v*d]``,
    taps outside the image reading zero.

    Args:
        x: input feature map.
        kernel: one K x K kernel per output pixel and channel group.
        stride: output stride s.
        padding: zero padding p; defaults to the "same" padding ``dilation * (K - 1) // 2``.
        dilation: spacing d between taps.
        backend: ``'auto'``, ``'reference'``, ``'cupy'`` or ``'native'``; defaults to ``$REDNET_INVOLUTION_BACKEND``
            or auto.

    Under autocast, float32/16 inputs are cast to the autocast dtype first (like a convolution).
    Under ``torch.compile`` the backend is chosen once, while tracing.
    """
    if padding is None and kernel.dim() == 6:
        padding = dilation * (kernel.shape[2] - 1) // 2 if isinstance(dilation, int) else 0
    if x.device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type) \
            and x.dtype in _AUTOCAST_DTYPES and kernel.dtype in _AUTOCAST_DTYPES:
        # Custom ops are not on autocast's lists, so cast here as autocast does for conv: the
        # memory-bound aggregation runs in the low-precision dtype (fp32 accumulation inside).
        dtype = torch.get_autocast_dtype(x.device.type)
        x, kernel = x.to(dtype), kernel.to(dtype)
    _check(x, kernel, stride, padding, dilation)
    chosen = select_backend(x, backend)
    if chosen == "cupy":
        from ._cupy import involution_cupy

        return involution_cupy(x, kernel, stride, padding, dilation)
    if chosen == "native":
        return torch.ops.rednet.involution(x, kernel, stride, padding, dilation)
    return involution_reference(x, kernel, stride, padding, dilation)
