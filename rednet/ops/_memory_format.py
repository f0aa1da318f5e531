"""Memory formats of the kernels, and how their inputs are densified and outputs allocated.

Every implementation of ``rednet::involution`` (the CUDA kernels, the native CPU kernels, the
CPU fallback and the fake functions ``torch.compile`` traces with) allocates through the
``alloc_*`` functions here, so the strides each reports agree, and hands the kernels inputs
densified by ``dense`` and ``dense_kernel``. Pure PyTorch.
"""
from __future__ import annotations

import torch

__all__ = ["MEMORY_FORMATS", "alloc_grad_input", "alloc_grad_kernel", "alloc_output", "dense", "dense_kernel",
           "memory_format_of"]

# The memory formats the kernels are written for: 'nchw' (contiguous) and 'nhwc' (channels_last).
MEMORY_FORMATS = ("nchw", "nhwc")


def memory_format_of(x: torch.Tensor) -> str:
    """``'nhwc'`` for channels_last inputs (and strided ones closer to it), else ``'nchw'``."""
    if x.is_contiguous():
        return "nchw"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    # Neither: copy into the format whose innermost dimension is already densest.
    return "nhwc" if x.stride(1) < x.stride(3) else "nchw"


def _torch_format(memory_format: str) -> torch.memory_format:
    return torch.channels_last if memory_format == "nhwc" else torch.contiguous_format


def dense(t: torch.Tensor, memory_format: str) -> torch.Tensor:
    """A 4-D tensor stored densely in ``memory_format`` (no copy when it already is)."""
    return t.contiguous(memory_format=_torch_format(memory_format))


def dense_kernel(kernel: torch.Tensor, memory_format: str) -> torch.Tensor:
    """The kernel (B, G, K, K, Ho, Wo) as the kernels read it: contiguous for ``'nchw'``; for
    ``'nhwc'`` permuted to (B, Ho, Wo, G, K, K) and contiguous, which costs no copy when the
    kernel is a view of a channels_last (B, G*K*K, Ho, Wo) conv output."""
    if memory_format == "nhwc":
        return kernel.permute(0, 4, 5, 1, 2, 3).contiguous()
    return kernel.contiguous()


def alloc_output(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(B, C, Ho, Wo) in x's memory format."""
    b, c = x.shape[:2]
    ho, wo = kernel.shape[-2:]
    fmt = _torch_format(memory_format_of(x))
    return torch.empty((b, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)


def alloc_grad_input(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_torch_format(memory_format_of(x)))


def alloc_grad_kernel(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(B, G, K, K, Ho, Wo), stored as (B, Ho, Wo, G, K, K) when x is channels_last."""
    b, g, k, _, ho, wo = kernel.shape
    if memory_format_of(x) == "nhwc":
        gw = torch.empty((b, ho, wo, g, k, k), dtype=kernel.dtype, device=kernel.device)
        return gw.permute(0, 3, 4, 5, 1, 2)  # (B, G, K, K, Ho, Wo) view
    return torch.empty(kernel.shape, dtype=kernel.dtype, device=kernel.device)
