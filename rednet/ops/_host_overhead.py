"""The host's share of a CUDA involution call, measurable without a GPU.

Everything ``involution`` does on the host for the CUDA kernels (validation, the backend
choice and first-contact gate, the ``rednet::involution`` op and its autograd, the launch
plans and output allocation) runs as it would, on the tensors given, and only the launch is
replaced by a no-op. On CPU tensors the CUDA path is taken by standing in for CuPy's
availability (``_cupy.can_run_on``), declining the native kernel, marking the configuration
as checked, and running the op's default (CUDA) implementation instead of its CPU one.

It changes module state for its duration: not for use while other threads call the operator.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

from . import _cpu, _cupy, _dispatch, _selfcheck
from ._memory_format import alloc_output, memory_format_of

__all__ = ["measure_host_overhead"]  # rednet.ops.measure_host_overhead, with the front door


@contextlib.contextmanager
def _cuda_path_without_launches(x: torch.Tensor, kernel: torch.Tensor, stride: int, dilation: int,
                                plans: ModuleType | None = None) -> Iterator[None]:
    from . import _custom_op

    device_type = x.device.type
    key = _dispatch.selfcheck_key(device_type, x.device.index, x.dtype, kernel.shape[2], stride, dilation,
                                  memory_format_of(x))
    saved = (_cupy.can_run_on, _cpu.can_run_on, _cupy.launch, _custom_op._plan)
    real_cupy, real_cpu = saved[0], saved[1]
    had_verdict = key in _selfcheck._verdicts
    try:
        _cupy.can_run_on = lambda t, i, d: (True, "ok") if t == device_type else real_cupy(t, i, d)
        _cpu.can_run_on = lambda t, d: (False, "stood in for") if t == device_type else real_cpu(t, d)
        _cupy.launch = lambda plan, device: None
        _custom_op._plan = plans or saved[3]
        if not had_verdict:
            _selfcheck._verdicts[key] = _selfcheck.KernelCheck(True, "passed", "", 0.0)
        with contextlib.ExitStack() as stack:
            if device_type != "cuda":  # the ops' default implementation is the CUDA one
                for op in (_custom_op.involution_op, _custom_op.involution_backward_input,
                           _custom_op.involution_backward_kernel):
                    stack.enter_context(op.set_kernel_enabled(device_type, False))
            yield
    finally:
        _cupy.can_run_on, _cpu.can_run_on, _cupy.launch, _custom_op._plan = saved
        if not had_verdict:
            _selfcheck._verdicts.pop(key, None)


def measure_host_overhead(involution: Callable, x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int,
                          dilation: int = 1, calls: int = 200, rounds: int = 7,
                          plans: ModuleType | None = None) -> dict[str, float]:
    """Host microseconds of one CUDA involution call, launches replaced by no-ops.

    Args:
        involution: the front door (``rednet.ops.involution``).
        x: input (B, C, H, W), on a CUDA device or standing in for one on the CPU.
        kernel: (B, G, K, K, Ho, Wo), like ``x``.
        stride / padding / dilation: as for ``involution``.
        calls: calls timed together in one round.
        rounds: rounds; each statistic is over the rounds' per-call means.
        plans: a module standing in for ``_plan`` (the launch plans of another revision, for an A/B).

    Returns:
        ``fwd_us`` and ``fwd_bwd_us`` (forward alone; forward and both gradients through autograd):
        the median over rounds, and ``fwd_us_min`` / ``fwd_bwd_us_min``, the fastest round.
    """
    xg, kg = x.detach().requires_grad_(), kernel.detach().requires_grad_()
    grad_y = alloc_output(x, kernel)  # (B, C, Ho, Wo) in x's memory format

    def forward():
        with torch.no_grad():
            involution(x, kernel, stride, padding, dilation)

    def forward_backward():
        y = involution(xg, kg, stride, padding, dilation)
        torch.autograd.grad(y, (xg, kg), grad_y)

    out = {}
    with _cuda_path_without_launches(x, kernel, stride, dilation, plans):
        for name, fn in (("fwd_us", forward), ("fwd_bwd_us", forward_backward)):
            for _ in range(max(1, calls // 10)):  # warm-up
                fn()
            means = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                means.append((time.perf_counter() - t0) / calls * 1e6)
            out[name], out[f"{name}_min"] = statistics.median(means), min(means)
    return out
