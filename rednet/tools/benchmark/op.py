"""``op`` mode: every distinct involution of RedNet-50 per backend, dtype and memory format, against its floor."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from rednet.analysis.shapes import InvolutionShape
from rednet.ops import (
    can_use_cuda_kernel,
    involution,
    involution_cupy,
    involution_output_size,
    involution_reference,
    involution_unfold,
)

from ._common import DTYPES, log, peak_bytes, shape_str, time_ms

OP_BACKENDS = {
    "reference": involution_reference,
    "unfold": involution_unfold,
    "cupy": involution_cupy,
    "native": lambda x, kernel, stride, padding, dilation: involution(x, kernel, stride, padding, dilation, "native"),
}


PASSES = ("fwd", "fwd+bwd")


class OpCase(NamedTuple):
    shape: InvolutionShape
    batch: int
    dtype: str  # a key of DTYPES
    memory_format: str  # one of MEMORY_FORMATS
    backend: str  # a key of OP_BACKENDS


def op_inputs(s: InvolutionShape, batch: int, dtype: torch.dtype, memory_format: str, device: torch.device):
    """x (B, C, H, W) and kernel (B, G, K, K, Ho, Wo), laid out as a channels_last network makes them."""
    k, st = s["K"], s["stride"]
    pad = (k - 1) // 2
    ho, wo = (involution_output_size(n, k, st, pad, 1) for n in (s["H"], s["W"]))
    fmt = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
    x = torch.randn(batch, s["C"], s["H"], s["W"], device=device, dtype=dtype).contiguous(memory_format=fmt)
    gen = torch.randn(batch, s["G"] * k * k, ho, wo, device=device, dtype=dtype).contiguous(memory_format=fmt)
    return x, gen.view(batch, s["G"], k, k, ho, wo), st, pad


def floor_bytes(x: torch.Tensor, kernel: torch.Tensor, y_numel: int, with_backward: bool) -> int:
    fwd = x.numel() + kernel.numel() + y_numel  # read x and kernel, write y
    bwd = y_numel + x.numel() + kernel.numel() + x.numel() + kernel.numel()  # read grad_y, x, kernel; write grads
    return (fwd + (bwd if with_backward else 0)) * x.element_size()


def _op_step(fn: Callable, with_backward: bool, x: torch.Tensor, kernel: torch.Tensor, stride: int,
             pad: int) -> Callable[[], object]:
    """One timed call of ``fn``: the forward alone, or the forward and both gradients."""
    if not with_backward:
        def forward():
            with torch.no_grad():
                return fn(x, kernel, stride, pad, 1)
        return forward
    xg, kg = x.detach().requires_grad_(), kernel.detach().requires_grad_()
    grad_y = torch.randn(x.shape[0], x.shape[1], *kernel.shape[-2:], device=x.device, dtype=x.dtype)

    def forward_backward():
        y = fn(xg, kg, stride, pad, 1)
        return torch.autograd.grad(y, (xg, kg), grad_y)
    return forward_backward


def _op_rows(case: OpCase, args, device: torch.device, gbps: float, progress: str) -> list[dict]:
    """One row per pass of ``case``: median ms, the bandwidth floor and the peak memory."""
    s, batch, dname, memory_format, backend = case
    x, kernel, stride, pad = op_inputs(s, batch, DTYPES[dname], memory_format, device)
    y_numel = batch * s["C"] * kernel.shape[-2] * kernel.shape[-1]
    rows = []
    for pas in args.passes:
        try:
            step = _op_step(OP_BACKENDS[backend], pas == "fwd+bwd", x, kernel, stride, pad)
            ms = time_ms(step, device, args.warmup, args.repeats)
            mem = peak_bytes(step, device)
        except torch.OutOfMemoryError:
            log(f"  OOM: {backend} {s['name']} {dname} {memory_format} {pas} batch {batch}")
            ms, mem = None, None
            torch.cuda.empty_cache()
        fb = floor_bytes(x, kernel, y_numel, pas == "fwd+bwd")
        # "layout" is the results files' key for the memory format; kept so old files still merge.
        row = dict(shape=shape_str(s), name=s["name"], count=s["count"], batch=batch, dtype=dname,
                   layout=memory_format, backend=backend, **{"pass": pas}, ms=ms, floor_ms=fb / (gbps * 1e9) * 1e3,
                   peak_mem_mb=None if mem is None else mem / 2**20)
        rows.append(row)
        log(f"{progress} {s['name']:<12} {shape_str(s):<24} b{batch} {dname} {memory_format} {backend:<9} "
            f"{pas:<7} {'OOM' if ms is None else f'{ms:9.3f} ms'}  floor {row['floor_ms']:.3f} ms  "
            f"peak {'-' if mem is None else f'{mem / 2**20:.1f} MiB'}")
    return rows


def run_op(args, device: torch.device, gbps: float, shapes: list[InvolutionShape]) -> list[dict]:
    rows = []
    cases = [OpCase(s, b, dn, fmt, be) for b in args.batch for s in shapes for dn in args.dtypes
             for fmt in args.memory_formats for be in args.backends]
    for n, case in enumerate(cases, 1):
        if case.backend == "cupy":
            ok, why = can_use_cuda_kernel(torch.empty(0, device=device, dtype=DTYPES[case.dtype]))
            if not ok:
                log(f"skip cupy: {why}")
                continue
        rows += _op_rows(case, args, device, gbps, f"[{n}/{len(cases)}]")
    return rows

