"""The involution operator: one front door, several backends.

``involution(x, kernel)`` validates its inputs, then dispatches to the CUDA kernel
(compiled through CuPy) for CUDA tensors and to the native C++ kernel (compiled at first
use, ``_cpu``) for CPU tensors when they can run, and to the pure-PyTorch reference
otherwise. Importing this package never imports CuPy or builds anything.

Which backend runs, first match wins:

1. the ``backend=`` argument of ``involution`` / ``select_backend``;
2. the innermost ``with use_backend(name):`` block;
3. ``REDNET_INVOLUTION_BACKEND=auto|reference|cupy|native`` in the environment (``BACKEND_ENV``);
4. ``auto``: the first row of ``_dispatch.TABLE`` that can run: for CUDA tensors the CUDA
   kernel when ``can_use_cuda_kernel(x)``, for CPU tensors the native kernel when
   ``can_use_native_kernel(x)``, else the reference.

Forcing ``cupy`` or ``native`` where it cannot run is an error that says why;
``describe_backend(device, dtype)`` says in words which backend runs and why.

The kernels are checked on first contact: before the kernel first runs for a (device,
dtype, window, memory format) in a process, ``_selfcheck`` compiles it and compares its
forward and both gradients with the reference on small inputs. If that fails, ``auto``
uses the reference for that configuration from then on and warns once
(``KernelCheckWarning``, naming the cause), and a forced ``cupy`` raises with the cause.
The check runs eagerly at dispatch, outside ``torch.compile``'s graph (the decision is a
traced constant) and never inside CUDA graph capture (an unchecked configuration met
during capture uses the reference in ``auto`` and raises when forced).
``decline_cuda_kernel`` records a configuration as failed in another process of the job, so
that every process runs the same backend (the trainer checks and agrees before its first step).

Modules, each importing only those below it: this front door; ``_host_overhead`` (the
host's share of a CUDA call, measured with the launch replaced by a no-op); ``_dispatch`` (the ordered
table of backends and the first-contact gate); ``_selfcheck`` (the check on first
contact); ``_custom_op`` (the ``rednet::involution`` op, imported on first use of the
kernels); ``_ort`` (the ONNX Runtime op ``rednet.Involution``: its library and export
translation); ``_fused`` (the fused CPU inference pass and its ``rednet::involution_fused``
op); ``_cpu`` (the native CPU kernels: source, flags, calls); ``_native_build`` (compiling a
C++ source into a cached shared library and loading it); ``_cupy`` (CuPy compilation and
launch); ``_kernel_cache`` (compiled CUDA binaries on disk); ``_cache_files`` (the cache
root, and which of its files may be trusted); ``_plan`` (CUDA launch plans, pure PyTorch);
``_memory_format`` (memory formats, densified inputs and allocated outputs, shared by every
implementation); ``_reference`` (the pure-PyTorch backend); ``_export`` (the formulation
recorded when a graph is exported, and ``export_fused``).

On the CPU at inference, RedNet's layers call ``involution_fused`` (kernel generation,
aggregation, BatchNorm and ReLU in one pass) where ``can_use_fused_kernel`` allows; its
16-float vectors are AVX-512 registers where ``-march=native`` enables AVX-512 (the GEMM
tiles are then sized for its 32 registers), two AVX2 registers otherwise.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

# Cheap: CuPy is imported, and the C++ built, only when a kernel runs.
from . import _cpu, _cupy, _dispatch, _host_overhead, _selfcheck
from ._dispatch import BACKENDS
from ._dispatch import ENV as BACKEND_ENV
from ._export import export_fused, exporting_fused, involution_export, is_exporting
from ._fused import FusedWeights, can_use_fused_kernel, involution_fused, pack_fused_weights
from ._memory_format import MEMORY_FORMATS, memory_format_of
from ._ort import onnx_translation_table, ort_library_path
from ._reference import involution_reference, involution_unfold
from ._selfcheck import KernelCheck, KernelCheckWarning

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "FusedWeights",
    "KernelCheck",
    "KernelCheckWarning",
    "MEMORY_FORMATS",
    "can_use_cuda_kernel",
    "can_use_fused_kernel",
    "can_use_native_kernel",
    "check_cuda_kernel",
    "decline_cuda_kernel",
    "describe_backend",
    "export_fused",
    "exporting_fused",
    "involution",
    "involution_cupy",
    "involution_export",
    "involution_fused",
    "involution_output_size",
    "involution_reference",
    "involution_unfold",
    "is_exporting",
    "measure_host_overhead",
    "memory_format_of",
    "onnx_translation_table",
    "ort_library_path",
    "pack_fused_weights",
    "select_backend",
    "use_backend",
]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 is left alone, as autocast does
_AUTOCAST_DEVICES = ("cuda", "cpu")  # is_autocast_enabled raises for others (e.g. meta)
_CHECKED = {row.name: row.checked for row in _dispatch.TABLE}  # the backends the first-contact check gates


def involution_output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def can_use_cuda_kernel(x: torch.Tensor) -> tuple[bool, str]:
    """Whether the CuPy kernel can run on ``x``, and if not, why.

    Says nothing of the first-contact check, which depends on the window too; see
    ``check_cuda_kernel``.
    """
    return _cupy.can_run_on(x.device.type, x.device.index, x.dtype)


def can_use_native_kernel(x: torch.Tensor) -> tuple[bool, str]:
    """Whether the native CPU kernel can run on ``x`` (building it on first call), and if not, why."""
    return _cpu.can_run_on(x.device.type, x.dtype)


def decline_cuda_kernel(device: torch.device | str, dtype: torch.dtype, kernel_size: int, stride: int = 1,
                        dilation: int = 1, memory_format: str = "nchw", cause: str = "") -> KernelCheck:
    """Keep ``auto`` off the CUDA kernel for one configuration in this process, as if its check had failed.

    For jobs of several processes: a configuration whose check failed in one of them is declined
    in the others, so that every process runs the same backend (see ``rednet.engine.kernelcheck``).
    ``auto`` then warns once and runs the reference; a forced ``cupy`` raises with ``cause``. A
    failure of this process's own check is kept as it is. Arguments as for ``check_cuda_kernel``.

    Returns:
        The configuration's verdict now.
    """
    device = torch.device(device)
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {memory_format!r}; choose one of {MEMORY_FORMATS}")
    return _selfcheck.decline(_dispatch.selfcheck_key(device.type, device.index, dtype, kernel_size, stride, dilation,
                                                      memory_format), cause)


def check_cuda_kernel(device: torch.device | str, dtype: torch.dtype, kernel_size: int, stride: int = 1,
                      dilation: int = 1, memory_format: str = "nchw") -> KernelCheck:
    """The CUDA kernel's first-contact check for one configuration, run now if not yet run in this process.

    The same check and cached outcome ``involution`` uses; it neither warns nor raises.

    Args:
        device: a CUDA device (``'cuda'`` means the current one).
        dtype: float32, float16, bfloat16 or float64.
        kernel_size: window size K.
        stride: output stride.
        dilation: spacing between taps.
        memory_format: ``'nchw'`` (contiguous) or ``'nhwc'`` (channels_last).
    """
    device = torch.device(device)
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {memory_format!r}; choose one of {MEMORY_FORMATS}")
    ok, why = _cupy.can_run_on(device.type, device.index, dtype)
    if not ok:
        return KernelCheck(False, "unavailable", why, 0.0)
    return _selfcheck.verdict(_dispatch.selfcheck_key(device.type, device.index, dtype, kernel_size, stride, dilation,
                                                      memory_format))


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
    """Force the involution backend (``'auto'``, ``'reference'``, ``'cupy'`` or ``'native'``) inside the block.

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
    """Resolve ``backend``, ``use_backend`` or the environment variable to ``'reference'``, ``'cupy'`` or
    ``'native'``."""
    return _dispatch.choose_backend(x.device.type, x.device.index, x.dtype, backend, _forced)


def describe_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """Which backend ``involution`` runs for tensors of this device and dtype, and why, in words.

    ``'native'`` or ``'cupy'`` (the CUDA kernel's first-contact check, which depends on the
    window, is not run); ``'reference (<why the device's kernel declined>)'``;
    ``'reference (forced by ...)'``; or ``'unavailable (<the error>)'`` when a forced
    backend cannot run there, so ``involution`` would raise.

    Args:
        device: where the tensors live.
        dtype: their dtype (after autocast).
    """
    device = torch.device(device)
    try:
        chosen = _dispatch.choose_backend(device.type, device.index, dtype, None, _forced)
    except (RuntimeError, ValueError) as e:  # a forced backend that cannot run, or an unknown name
        return f"unavailable ({e})"
    if chosen != "reference":
        return chosen
    ok, why = _dispatch.kernel_for_device(device.type, device.index, dtype)
    return f"reference ({why})" if not ok else "reference (forced by $REDNET_INVOLUTION_BACKEND or use_backend)"


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
        backend: ``'auto'``, ``'reference'``, ``'cupy'`` or ``'native'``; defaults to the innermost
            ``use_backend`` block, then ``$REDNET_INVOLUTION_BACKEND``, then auto.

    Under autocast, float32/16 inputs are cast to the autocast dtype first (like a convolution).
    Under ``torch.compile`` the backend is chosen once, while tracing. Under ``torch.export``,
    ``torch.onnx.export`` and ``torch.jit.trace`` a portable formulation is recorded instead;
    ``torch.jit.script`` compiles only that formulation (without the checks).
    """
    if torch.jit.is_scripting():  # a scripted FX graph calls this door itself; TorchScript compiles only this branch
        same = dilation * (kernel.shape[2] - 1) // 2
        return involution_export(x, kernel, stride, same if padding is None else padding, dilation)
    if padding is None and kernel.dim() == 6:
        padding = dilation * (kernel.shape[2] - 1) // 2 if isinstance(dilation, int) else 0
    if x.device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type) \
            and x.dtype in _AUTOCAST_DTYPES and kernel.dtype in _AUTOCAST_DTYPES:
        # Custom ops are not on autocast's lists, so cast here as autocast does for conv: the
        # memory-bound aggregation runs in the low-precision dtype (fp32 accumulation inside).
        dtype = torch.get_autocast_dtype(x.device.type)
        x, kernel = x.to(dtype), kernel.to(dtype)
    _check(x, kernel, stride, padding, dilation)
    if is_exporting():  # a few portable ops instead of a per-tap loop or a CuPy call (see _export.py)
        return involution_export(x, kernel, stride, padding, dilation)
    chosen = select_backend(x, backend)
    if chosen != "reference" and (not _CHECKED[chosen] or _dispatch.first_contact_passes(
            x.device.type, x.device.index, x.dtype, backend, _forced, kernel.shape[2], stride, dilation,
            memory_format_of(x))):
        return _involution_op(x, kernel, stride, padding, dilation)  # the kernels of the rednet::involution op
    return involution_reference(x, kernel, stride, padding, dilation)


def measure_host_overhead(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int, dilation: int = 1,
                          calls: int = 200, rounds: int = 7, plans=None) -> dict[str, float]:
    """Host microseconds of one CUDA ``involution`` call (forward; forward and both gradients), launches left out.

    Everything the host does for the CUDA kernels runs as it would, on ``x`` and ``kernel``; only
    each launch is a no-op. CPU tensors stand in for CUDA ones (CuPy's availability, the native
    kernel and the first-contact verdict are stood in for while it runs: not for use while other
    threads call the operator).

    Args:
        x / kernel: the inputs, on a CUDA device or the CPU.
        stride / padding / dilation: as for ``involution``.
        calls: calls timed together in one round.
        rounds: rounds; each statistic is over the rounds' per-call means.
        plans: a module standing in for the launch plans (``_plan``) of another revision, for an A/B.

    Returns:
        ``fwd_us``, ``fwd_bwd_us`` (median over rounds) and ``fwd_us_min``, ``fwd_bwd_us_min`` (fastest round).
    """
    return _host_overhead.measure_host_overhead(involution, x, kernel, stride, padding, dilation, calls, rounds, plans)


def involution_cupy(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """The CUDA kernels through the ``rednet::involution`` custom op (autograd included).

    Inputs are assumed validated and on a device ``can_use_cuda_kernel`` accepts; the front
    door ``involution`` checks both. On CUDA tensors the first-contact check applies as to
    a forced ``cupy``: a configuration that failed it raises with the cause.
    """
    if x.is_cuda:
        _dispatch.first_contact_passes(x.device.type, x.device.index, x.dtype, "cupy", None, kernel.shape[2], stride,
                                       dilation, memory_format_of(x))
    return _involution_op(x, kernel, stride, padding, dilation)


def _involution_op(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    from . import _custom_op  # noqa: F401  (registers the op on first use)

    return torch.ops.rednet.involution(x, kernel, stride, padding, dilation)
