"""Involution as a handful of standard ops, for graphs that leave PyTorch.

The reference accumulates K*K shifted slices, which an exporter records as K*K
(slice, multiply, add) triples: 49 per 7x7 layer, and RedNet-26's ONNX export took
over six minutes mostly optimising that graph. Here the K*K taps are gathered by ONE
convolution whose K*K filters are one-hot (each copies one tap of a single-channel
image), then weighted by the generated kernel and summed: about five nodes per layer,
all in the default ONNX opset and every runtime.

Costs: the taps tensor is K*K times the input, as with unfold, so this is not the
training path; and a non-finite input value spreads NaN (``0 * inf``) to its
neighbours' taps. Products are exact (each tap is ``1 * x`` plus zeros), so results
match the reference to rounding of the final sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["involution_export", "is_exporting"]


def is_exporting() -> bool:
    """Whether a graph is being captured for use outside eager PyTorch.

    ``torch.export`` (and ``torch.onnx.export(dynamo=True)``, built on it), the
    TorchScript-based ``torch.onnx.export(dynamo=False)`` and ``torch.jit.trace``.
    ``torch.compile`` and ``torch.fx.symbolic_trace`` are not: the first keeps the
    backends, the second records the front door as one call.
    """
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def involution_export(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """Involution by a one-hot tap convolution. Inputs are assumed validated.

    Written for ``torch.jit.script`` as well (typed, no Python-only constructs).
    """
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    g, k, ho, wo = kernel.shape[1], kernel.shape[2], kernel.shape[4], kernel.shape[5]
    # Filter t is 1 at tap t: conv of a single-channel image yields its K*K shifted copies.
    taps = torch.eye(k * k, dtype=x.dtype, device=x.device).view(k * k, 1, k, k)
    # Batch and channels fold into the conv batch (-1 keeps the batch dimension dynamic).
    cols = F.conv2d(x.reshape(-1, 1, h, w), taps, None, stride, padding, dilation)  # (B*C, K*K, Ho, Wo)
    cols = cols.view(-1, g, c // g, k * k, ho, wo)  # (B, G, C/G, K*K, Ho, Wo)
    out = (cols * kernel.reshape(-1, g, 1, k * k, ho, wo)).sum(3)  # (B, G, C/G, Ho, Wo)
    return out.reshape(-1, c, ho, wo)
