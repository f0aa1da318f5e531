"""The involution operator: one front door, several backends.

``involution(x, kernel)`` validates its inputs, then dispatches to the CUDA kernel
(compiled through CuPy) when it can run and to the pure-PyTorch reference otherwise.
Importing this package never imports CuPy.

Which backend runs, first match wins:

1. the ``backend=`` argument of ``involution`` / ``select_backend``;
2. the innermost ``with use_backend(name):`` block;
3. ``REDNET_INVOLUTION_BACKEND=auto|reference|cupy`` in the environment;
4. ``auto``: the CUDA kernel when ``can_use_cuda_kernel(x)``, else the reference.

Forcing ``cupy`` where it cannot run is an error that says why.

Modules, each importing only those below it: this front door; ``_custom_op`` (the
``rednet::involution`` op, imported on first use of the kernels); ``_cupy`` (CuPy
compilation and launch); ``_plan`` (launch plans and allocation, pure PyTorch);
``_reference`` (the pure-PyTorch backend).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

import torch

from . import _cupy  # cheap: CuPy itself is imported only when a kernel is checked or runs
from ._plan import MEMORY_FORMATS
from ._reference import involution_reference, involution_unfold

__all__ = [
    "BACKENDS",
    "MEMORY_FORMATS",
    "can_use_cuda_kernel",
    "involution",
    "involution_cupy",
    "involution_output_size",
    "involution_reference",
    "involution_unfold",
    "select_backend",
    "use_backend",
]

_logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "cupy")
_ENV = "REDNET_INVOLUTION_BACKEND"
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 is left alone, as autocast does
_AUTOCAST_DEVICES = ("cuda", "cpu")  # is_autocast_enabled raises for others (e.g. meta)


def involution_output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def can_use_cuda_kernel(x: torch.Tensor) -> tuple[bool, str]:
    """Whether the CuPy kernel can run on ``x``, and if not, why."""
    return _cupy.can_run_on(x.device.type, x.device.index, x.dtype)


# ----------------------------------------------------------------------------------------
# Backend selection.

# The open use_backend blocks, innermost last, and the backend they force. A module global
# rather than a thread-local: torch.compile guards on a global's value (so a block entered
# after tracing retraces instead of reusing a stale choice), and older versions of Dynamo
# cannot trace a ContextVar. Process-wide, like the environment variable it stands in for.
_forced_lock = threading.Lock()
_forced_stack: list[tuple[object, str]] = []
_forced: str | None = None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the involution backend (``'auto'``, ``'reference'`` or ``'cupy'``) inside the block.

    Takes precedence over ``$REDNET_INVOLUTION_BACKEND``; an explicit ``backend=`` argument
    still wins. Blocks nest (the innermost applies), and the previous setting returns on exit,
    also when the block raises. The setting is process-wide, not per thread.
    """
    global _forced
    requested = name.lower() if isinstance(name, str) else name
    if requested not in BACKENDS:
        raise ValueError(f"unknown involution backend {name!r} (from use_backend); choose one of {BACKENDS}")
    token = object()
    with _forced_lock:
        _forced_stack.append((token, requested))
        _forced = requested
    try:
        yield
    finally:
        with _forced_lock:
            # Remove this block's own entry, so blocks left out of order (threads) restore cleanly.
            _forced_stack[:] = [entry for entry in _forced_stack if entry[0] is not token]
            _forced = _forced_stack[-1][1] if _forced_stack else None


def select_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """Resolve ``backend``, ``use_backend`` or the environment variable to ``'reference'`` or ``'cupy'``."""
    return _select_backend(x.device.type, x.device.index, x.dtype, backend, _forced)


# Depends only on static facts (device, dtype, the forced backend, the environment), so
# torch.compile runs it once while tracing and keeps the answer as a constant instead of
# tracing CuPy and logging. The use_backend setting is an argument, which Dynamo guards on;
# the environment is read inside, once per trace.
@torch.compiler.assume_constant_result
def _select_backend(device_type: str, device_index: int | None, dtype: torch.dtype, backend: str | None,
                    forced: str | None) -> str:
    if backend or not forced:
        backend = (backend or os.environ.get(_ENV) or "auto").lower()
        hint = f"Unset ${_ENV} or set it to 'reference'."
        if backend not in BACKENDS:
            raise ValueError(
                f"unknown involution backend {backend!r} (from argument or ${_ENV}); choose one of {BACKENDS}"
            )
    else:
        backend, hint = forced, "Force 'reference' or 'auto' with use_backend instead."
    if backend == "reference":
        return backend
    ok, why = _cupy.can_run_on(device_type, device_index, dtype)
    if backend == "cupy" and not ok:
        raise RuntimeError(f"involution backend 'cupy' was forced but cannot run: {why}. {hint}")
    if not ok:
        _logger.debug("involution: CUDA kernel declined, using the reference: %s", why)
        return "reference"
    from . import _custom_op  # noqa: F401  (registers rednet::involution before it is traced or called)

    return "cupy"


# ----------------------------------------------------------------------------------------
# The front door.


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
        raise ValueError(
            f"involution: kernel window must be square, got {k}x{k2} in kernel shape {tuple(kernel.shape)}"
        )
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
            f"input with K={k}, stride={stride}, padding={padding}, dilation={dilation}; generate the kernel at the "
            "output resolution (average-pool the input by the stride first)"
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
        backend: ``'auto'``, ``'reference'`` or ``'cupy'``; defaults to the innermost ``use_backend``
            block, then ``$REDNET_INVOLUTION_BACKEND``, then auto.

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
    if select_backend(x, backend) == "cupy":
        return involution_cupy(x, kernel, stride, padding, dilation)
    return involution_reference(x, kernel, stride, padding, dilation)


def involution_cupy(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """The CUDA kernels through the ``rednet::involution`` custom op (autograd included).

    Inputs are assumed validated and on a device ``can_use_cuda_kernel`` accepts; the front
    door ``involution`` checks both.
    """
    from . import _custom_op  # noqa: F401  (registers the op on first use)

    return torch.ops.rednet.involution(x, kernel, stride, padding, dilation)
