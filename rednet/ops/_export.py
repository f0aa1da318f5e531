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

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = ["export_fused", "exporting_fused", "involution_export", "is_exporting"]

# Set by export_fused(); a module global like use_backend's (process-wide, read while tracing).
_fused_export = False


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


@contextlib.contextmanager
def export_fused() -> Iterator[None]:
    """Inside the block, an exported graph records each eval-mode Involution (with the BatchNorm and
    ReLU after it) as one fused ``rednet::involution_fused`` node instead of the portable formulation.

    ``tools/export.py --involution custom`` exports this way and translates the node to the ONNX
    Runtime op ``rednet.Involution`` (``rednet.ops.onnx_translation_table``); such a graph needs
    ``rednet.ops.ort_library_path()`` registered to run.
    """
    global _fused_export
    previous, _fused_export = _fused_export, True
    try:
        yield
    finally:
        _fused_export = previous


def exporting_fused() -> bool:
    """Whether a graph is being exported inside ``export_fused()``."""
    return _fused_export and is_exporting()
