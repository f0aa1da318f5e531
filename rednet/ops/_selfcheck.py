"""The CUDA kernels' check on first contact: compile, run and compare once per configuration.

The kernels have never run on the machine they meet first, so before the first call of a
(device, dtype, window (K, stride, dilation), memory format) in a process, the front door
compiles the module, runs the forward and both gradients on small problems that take
every kernel family the plans pick for RedNet's shapes (``PROBLEMS``), and compares them
with the reference (``_reference``): every element within what fp32 accumulation
guarantees (``error_bound``). The outcome is kept for the process. A failure names the stage:

- ``compile``: NVRTC, a missing NVRTC library or the driver loading the binary;
- ``launch``: a kernel launch raised, or the device reported an error when synchronised
  after it (the cause names the pass and the kernel);
- ``result``: an output or gradient differs from the reference (or is not finite);
- ``context``: the kernel faulted and CUDA's error is sticky: the device cannot run
  anything more in this process, the reference included;
- ``capture``: not a verdict: asked while a CUDA graph is being captured, where the check
  cannot run (it synchronises); nothing is stored and the next eager call checks;
- ``peer``: the check passed (or was not run) here but failed in another process of the job
  (``decline``): every process uses the reference for it, so that none runs slower code than
  the others and holds up their collectives.

Beyond the compile, which the first launch would pay anyway (and which the disk cache
pays once per machine), the check is a few launches on tiny inputs, each pass followed by
a synchronisation so that a launch failure names its kernel; a GPU test holds it under
half a second. It runs outside any tensor modes (fake tensors, export tracing), autocast
and inference mode, on its own random generator, so it neither sees the caller's tracing
nor changes its random state.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
import zlib
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import _cupy, _plan
from ._reference import involution_reference

__all__ = ["REPORT_HINT", "STAGES", "Key", "KernelCheck", "KernelCheckWarning", "decline", "describe", "error_bound",
           "verdict", "warn_once", "warn_unavailable"]

_logger = logging.getLogger(__name__)

STAGES = ("compile", "launch", "result", "context", "capture", "peer")
REPORT_HINT = ("Please report it on the project's issue tracker with the output of "
               "`python tools/benchmark.py selfcheck`.")

# What the kernels guarantee, element by element. An output element is a sum of n products of
# inputs converted exactly to the accumulator (fp32; fp64 for float64), added in some order
# (FMA or not), then rounded once to the dtype. With u the accumulator's unit roundoff and v
# the dtype's (0 when the dtype is the accumulator), Higham's bound for a computed sum
# ("Accuracy and Stability of Numerical Algorithms", 2nd ed., section 3.1) and one rounding:
#
#     |got - exact| <= v * |exact| + (1 + v) * gamma_n * sum_t |term_t|,   gamma_n = n*u / (1 - n*u)
#
# plus, in fp32, 2n * 2^-126 for quantities below the normal range flushed to zero (-ftz=true),
# and, in fp16, half the spacing of its subnormals (2^-25). sum_t |term_t| is the same
# involution of the inputs' absolute values, and n is at most max(K*K, C/G) (a forward or
# grad_input element sums at most K*K taps, a grad_kernel element C/G channels). In bf16 the
# bound is about 0.4% of |exact| plus 3e-6 * sum|term| for K = 7: an element whose sum cancels
# must still be right to fp32 accuracy, which a kernel accumulating in bf16 or fp16 is not.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
                 torch.bfloat16: 2.0**-8}


def error_bound(dtype: torch.dtype, n: int, exact: torch.Tensor, abs_sum: torch.Tensor) -> torch.Tensor:
    """Per element, the most a kernel output of ``dtype`` may differ from ``exact`` (float64) when
    it sums ``n`` products whose absolute values sum to ``abs_sum`` (see above)."""
    u = UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    v = 0.0 if dtype in (torch.float32, torch.float64) else UNIT_ROUNDOFF[dtype]
    gamma = n * u / (1 - n * u)
    flushed = 0.0 if dtype == torch.float64 else 2 * n * 2.0**-126
    subnormal = 2.0**-25 if dtype == torch.float16 else 0.0
    return v * exact.abs() + (1 + v) * gamma * abs_sum + flushed + subnormal
# (B, C, G, H, W), small, chosen so that for any dtype, window and memory format the check runs
# every kernel family the plans pick for RedNet's shapes, and a few they pick for others
# (tests/ops/test_cuda_fallback.py asserts it):
# - C/G = 3, 37 wide: nchw 32x8 tiles partly filled; channels_last: the scalar kernels;
# - C/G = 16, G = 4, 14x14: nchw 16x8 tiles; channels_last: the vector kernels, a block of groups
#   per patch (RedNet's stages);
# - C/G = 16, G = 3, 7x7 (layer4's map): nchw 8x8 tiles, four planes a block, the last block
#   partly empty; channels_last: odd G, so bf16/fp16 kernel rows are not 32-bit words (the
#   scalar kernels) and fp32 runs blocks of two patches, the second one empty;
# - C/G = 16, G = 2 (the stem's), 21 wide: channels_last bf16/fp16 blocks of two patches, the
#   last one half empty at stride 1; nchw 16x8 tiles at stride 2.
PROBLEMS = ((2, 6, 2, 9, 37), (1, 64, 4, 14, 14), (3, 48, 3, 7, 7), (1, 32, 2, 7, 21))
PASSES = ("output", "grad_input", "grad_kernel")


class KernelCheckWarning(RuntimeWarning):
    """``auto`` uses the reference because the CUDA kernel failed its check on first contact."""


class Key(NamedTuple):
    """What one check covers."""

    device: torch.device
    dtype: torch.dtype
    kernel_size: int
    stride: int
    dilation: int
    memory_format: str  # 'nchw' or 'nhwc'

    def __str__(self) -> str:
        return (f"{self.device} {str(self.dtype).removeprefix('torch.')} K={self.kernel_size} stride={self.stride} "
                f"dilation={self.dilation} {self.memory_format}")


class KernelCheck(NamedTuple):
    """The outcome of the check of one configuration.

    Args:
        ok: the kernels compiled, ran, and matched the reference.
        stage: ``'passed'``, or where it failed: one of ``STAGES``, or ``'unavailable'``
            (CuPy or the device cannot run the kernels at all; nothing was compiled).
        cause: why it failed (the exception, or which output differs and by how much).
        seconds: how long the check took, compile included.
    """

    ok: bool
    stage: str
    cause: str
    seconds: float


_lock = threading.Lock()
_verdicts: dict[Key, KernelCheck] = {}
_warned: set[tuple[str, str]] = set()  # (stage, cause) already warned about


def verdict(key: Key) -> KernelCheck:
    """The check's outcome for ``key``, running the check the first time in this process.

    Thread-safe: concurrent first calls run one check. During CUDA graph capture an
    unchecked key answers ``stage='capture'`` and stays unchecked.
    """
    found = _verdicts.get(key)
    if found is not None:
        return found
    if _capturing(key.device):
        return KernelCheck(False, "capture", "the kernel is not checked yet and cannot be during CUDA graph capture; "
                                             "run the model once eagerly (a warm-up step) before capturing", 0.0)
    with _lock:
        found = _verdicts.get(key)
        if found is None:
            found = _run(key)
            _verdicts[key] = found
            _logger.debug("involution: kernel check %s: %s %s", key, found.stage, found.cause)
    return found


def decline(key: Key, cause: str) -> KernelCheck:
    """Record that the kernel is not to be used for ``key`` in this process (``stage='peer'``), and why.

    For a configuration that failed in another process of the job; a failure of this process's
    own check is kept as it is.
    """
    with _lock:
        found = _verdicts.get(key)
        if found is None or found.ok:
            found = _verdicts[key] = KernelCheck(False, "peer", cause, 0.0)
    return found


def describe(key: Key, check: KernelCheck) -> str:
    """One message for a failed check: configuration, stage and cause."""
    cause = check.cause if len(check.cause) <= 2000 else check.cause[:2000] + " [...]"
    if check.stage == "capture":
        return f"the CUDA involution kernel was not checked for {key} (capture stage): {cause}"
    if check.stage == "peer":
        return f"the CUDA involution kernel is not used for {key} (peer stage): {cause}"
    return f"the CUDA involution kernel failed its first-contact check for {key} at the {check.stage} stage: {cause}"


def warn_once(key: Key, check: KernelCheck) -> None:
    """Warn that ``auto`` falls back to the reference; once per distinct cause in a process."""
    if (check.stage, check.cause) in _warned:
        _logger.debug("involution: %s", describe(key, check))
        return
    _warned.add((check.stage, check.cause))
    what = ("This call uses the reference" if check.stage == "capture"
            else "The reference is used for it from now on in this process")
    warnings.warn(f"{describe(key, check)}. {what}: results are correct, only slower. {REPORT_HINT}",
                  KernelCheckWarning, stacklevel=4)


def warn_unavailable(device: torch.device, why: str) -> None:
    """Warn once per cause that CuPy is installed but cannot run the kernels on a CUDA tensor's device.

    CuPy not installed at all is no surprise (it is optional) and is only logged; CuPy
    installed but unusable (a CuPy built for another CUDA, no NVRTC library, a driver
    mismatch) is a first-contact failure like the others.
    """
    if ("unavailable", why) in _warned:
        return
    _warned.add(("unavailable", why))
    warnings.warn(f"the CUDA involution kernel cannot run on {device}: {why}. The reference is used instead: "
                  f"results are correct, only slower. {REPORT_HINT}", KernelCheckWarning, stacklevel=5)


# ----------------------------------------------------------------------------------------
# The check. The functions below marked "seam" are what the CPU tests replace.


def _capturing(device: torch.device) -> bool:  # seam
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _synchronize(device: torch.device) -> None:  # seam
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_usable(device: torch.device) -> bool:  # seam
    """After a failure: whether the device still runs work (CUDA's sticky errors say no)."""
    try:
        _synchronize(device)
        return bool((torch.ones(1, device=device) + 1).eq(2).all())
    except Exception:  # noqa: BLE001  (any error here means the device is unusable)
        return False


def _kernel_pass(name: str, x, kernel, grad_out, stride: int, padding: int, dilation: int):  # seam
    """One of y, grad_x, grad_kernel from the op's CUDA implementations, as autograd calls them."""
    from . import _custom_op  # noqa: F401  (registers the ops)

    ops = torch.ops.rednet
    if name == "output":
        return ops.involution(x, kernel, stride, padding, dilation)
    if name == "grad_input":
        return ops.involution_backward_input(grad_out, x, kernel, stride, padding, dilation)
    return ops.involution_backward_kernel(grad_out, x, kernel, stride, padding, dilation)


def _kernel_name(name: str, x, kernel, grad_out, stride: int, padding: int, dilation: int) -> str:
    """The kernel the plan picks for one pass (what a failure is attributed to)."""
    if name == "output":
        plan = _plan.plan_forward(x, kernel, stride, padding, dilation)[1]
    elif name == "grad_input":
        plan = _plan.plan_backward_input(grad_out, x, kernel, stride, padding, dilation)[1]
    else:
        plan = _plan.plan_backward_kernel(grad_out, x, kernel, stride, padding, dilation)[1]
    return plan.name if plan is not None else "no kernel"


@contextlib.contextmanager
def _plain_context(device: torch.device):
    """Real tensors, autograd on, no autocast, and host syncs allowed, whatever the caller set."""
    debug_mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(_disable_current_modes())  # fake tensors, export and proxy tracing
        stack.enter_context(torch._C.DisableTorchFunction())  # torch function modes and subclasses
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device.type, enabled=False))
        if debug_mode:
            torch.cuda.set_sync_debug_mode(0)  # the check synchronises on purpose, once
            stack.callback(torch.cuda.set_sync_debug_mode, debug_mode)
        yield


def _problem(key: Key, b: int, c: int, g: int, h: int, w: int):
    k, s, d = key.kernel_size, key.stride, key.dilation
    p = d * (k - 1) // 2  # "same" padding, as RedNet uses
    ho, wo = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n in (h, w))
    # A private CPU generator seeded by the key: the caller's random state is untouched, and
    # no two keys share values (a stale output of another check cannot pass for this one's).
    gen = torch.Generator().manual_seed(zlib.crc32(f"{key} {b}x{c}x{h}x{w}".encode()))
    fmt = torch.channels_last if key.memory_format == "nhwc" else torch.contiguous_format

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(key.device, key.dtype).contiguous(
            memory_format=fmt)

    # The kernel as a network makes it: a (B, G*K*K, Ho, Wo) conv output viewed as 6-D.
    return rand(b, c, h, w), rand(b, g * k * k, ho, wo).view(b, g, k, k, ho, wo), rand(b, c, ho, wo), p


def _exact(key: Key, x, kernel, grad_out, p):
    """Float64 output and gradients of the reference."""
    xr, kr = x.double().requires_grad_(), kernel.double().requires_grad_()
    yr = involution_reference(xr, kr, key.stride, p, key.dilation)
    return (yr.detach(), *torch.autograd.grad(yr, (xr, kr), grad_out.double()))


def _compare(key: Key, problem, outputs) -> str:
    """Which output differs from the float64 reference by more than ``error_bound``; '' when all agree."""
    x, kernel, grad_out, p = problem
    refs = _exact(key, x, kernel, grad_out, p)
    abs_sums = _exact(key, x.abs(), kernel.abs(), grad_out.abs(), p)  # sum |term| of each element
    n = max(key.kernel_size ** 2, x.shape[1] // kernel.shape[1])
    for name, got, ref, abs_sum in zip(("output", "grad_input", "grad_kernel"), outputs, refs, abs_sums):
        if got.shape != ref.shape or got.dtype != key.dtype:
            return f"{name} is {tuple(got.shape)} {got.dtype}, expected {tuple(ref.shape)} {key.dtype}"
        err = (got.double() - ref).abs()
        bound = error_bound(key.dtype, n, ref, abs_sum)
        bad = ~(err <= bound)  # NaN counts as bad
        n_bad = int(bad.sum())
        if n_bad:
            worst = int((err - bound).nan_to_num(float("inf")).argmax())
            return (f"{name} differs from the reference at {n_bad} of {ref.numel()} elements (at worst "
                    f"{float(err.flatten()[worst]):.3g} where fp32 accumulation allows "
                    f"{float(bound.flatten()[worst]):.3g}) for x {tuple(x.shape)}, kernel {tuple(kernel.shape)}")
    return ""


def _run(key: Key) -> KernelCheck:
    start = time.perf_counter()
    with _plain_context(key.device):
        stage, cause = _stages(key)
    return KernelCheck(not cause, stage if cause else "passed", cause, time.perf_counter() - start)


class _PassFailed(Exception):
    """A launch of one pass failed, or the device reported an error after it."""


def _stages(key: Key) -> tuple[str, str]:
    """(stage reached, cause of failure or '')."""
    stage = "compile"
    try:
        _cupy.prepare(key.device, (key.dtype, key.kernel_size, key.stride, key.dilation))
        stage = "launch"
        problems = [_problem(key, *shape) for shape in PROBLEMS]
        # Every kernel output before any reference: no freed reference buffer can be handed
        # to a kernel output that then looks right without having been written. The device is
        # synchronised after each pass, so that an asynchronous fault names its kernel.
        outputs = []
        for x, k, go, p in problems:
            outs = []
            for name in PASSES:
                try:
                    outs.append(_kernel_pass(name, x, k, go, key.stride, p, key.dilation))
                    _synchronize(key.device)
                except Exception as e:  # noqa: BLE001  (attributed to the kernel, then a verdict)
                    kernel = _kernel_name(name, x, k, go, key.stride, p, key.dilation)
                    raise _PassFailed(f"{name} kernel {kernel} for x {tuple(x.shape)}: {type(e).__name__}: {e}") from e
            outputs.append(outs)
        stage = "result"
        return stage, next((c for c in map(_compare, [key] * len(problems), problems, outputs) if c), "")
    except Exception as e:  # noqa: BLE001  (every failure becomes a verdict with its cause)
        cause = str(e) if isinstance(e, _PassFailed) else f"{type(e).__name__}: {e}".strip()
        if stage != "compile" and not _device_usable(key.device):
            return "context", cause + (" (the device no longer runs anything in this process; run it again with "
                                       "REDNET_INVOLUTION_BACKEND=reference)")
        return stage, cause
