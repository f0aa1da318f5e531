"""Fused inference involution on the CPU: kernel generation, aggregation, BatchNorm and ReLU in one pass.

The Involution module at inference computes, for a channels_last float32 ``x`` (B, C, H, W)::

    r = relu(bn(reduce(AvgPool(s)(x))))      reduce: 1x1 conv C -> R
    k = span(r)                               span:   1x1 conv R -> G*K*K, with bias
    y = act(scale * involution(x, k) + shift) the BatchNorm (and ReLU) that follow the module

Unfused, ``k`` (G*K*K channels at the output resolution: 3x the input's channels in
RedNet-50's first stage) is written to memory by one convolution and read back by the
aggregation, and ``y`` passes through BatchNorm and ReLU twice more. The native pass
(``csrc/involution_cpu.cpp``, "Fused inference") computes ``r`` and ``k`` for 16 output
pixels at a time in per-thread scratch and aggregates them straight away, with the affine
map and ReLU applied before the single store of ``y``.

Weights travel in the layout the native pass reads (``FusedWeights``), built once per
weight version by ``pack_fused_weights``: the reduce conv with its BatchNorm folded in,
transposed to (C, R), and the span conv transposed to (R, N); R and N rounded up to
multiples of 16 with zeros. The same layout is what the ONNX Runtime op
(``rednet.Involution``, ``_ort``) takes as inputs.

``rednet::involution_fused`` is a PyTorch custom op (no autograd: inference only), so
``torch.compile`` keeps it as one opaque node and ``torch.export`` records it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _cpu
from ._memory_format import memory_format_of

__all__ = ["FusedWeights", "can_use_fused_kernel", "involution_fused", "pack_fused_weights"]


class FusedWeights(NamedTuple):
    """Kernel-generation weights in the fused pass's layout (float32, contiguous).

    Attributes:
        reduce_weight: (C, R) = (reduce conv weight * BatchNorm scale)^T, R padded to 16k.
        reduce_bias: (R,) = the BatchNorm's shift.
        span_weight: (R, N) = span conv weight^T, N = G*K*K padded to 16k.
        span_bias: (N,).
    """

    reduce_weight: torch.Tensor
    reduce_bias: torch.Tensor
    span_weight: torch.Tensor
    span_bias: torch.Tensor


def _up16(n: int) -> int:
    return (n + 15) // 16 * 16


def pack_fused_weights(reduce_weight: torch.Tensor, reduce_bias: torch.Tensor, span_weight: torch.Tensor,
                       span_bias: torch.Tensor) -> FusedWeights:
    """The fused pass's weights from the two 1x1 convolutions (reduce with its BatchNorm folded in).

    Plain tensor ops, so ``torch.compile`` with freezing folds them into constants.

    Args:
        reduce_weight: (R, C) or (R, C, 1, 1).
        reduce_bias: (R,).
        span_weight: (N, R) or (N, R, 1, 1), N = G*K*K in (g, u, v) order.
        span_bias: (N,).
    """
    r, n = reduce_weight.shape[0], span_weight.shape[0]
    rp, np_ = _up16(r), _up16(n)
    wr = F.pad(reduce_weight.reshape(r, -1).t(), (0, rp - r))  # (C, RP)
    ws = F.pad(span_weight.reshape(n, r).t(), (0, np_ - n, 0, rp - r))  # (RP, NP)
    return FusedWeights(wr.float().contiguous(), F.pad(reduce_bias, (0, rp - r)).float().contiguous(),
                        ws.float().contiguous(), F.pad(span_bias, (0, np_ - n)).float().contiguous())


def can_use_fused_kernel(x: torch.Tensor, channels: int, kernel_size: int, groups: int) -> tuple[bool, str]:
    """Whether the fused pass takes ``x`` for an involution of this shape, and if not, why.

    Says nothing of gradients or training mode: the caller (the Involution module) checks those.
    """
    if x.device.type != "cpu":
        return False, f"input is on {x.device.type}; the fused pass runs on the CPU"
    if x.dtype != torch.float32:
        return False, f"dtype {x.dtype}; the fused pass is float32"
    if x.dim() != 4 or x.shape[1] != channels:
        return False, f"input shape {tuple(x.shape)} is not (B, {channels}, H, W)"
    if memory_format_of(x) != "nhwc":  # as the operator decides: a tensor dense in both formats is NCHW
        return False, "input is not channels_last"
    if kernel_size % 2 == 0:
        return False, f"even kernel size {kernel_size}"
    if channels % groups or (channels // groups) % 16:
        return False, f"{channels // groups} channels per group; the fused pass needs a multiple of 16"
    return _cpu.available()


@torch.library.custom_op("rednet::involution_fused", mutates_args=(), device_types="cpu")
def _involution_fused_op(x: torch.Tensor, reduce_weight: torch.Tensor, reduce_bias: torch.Tensor,
                         span_weight: torch.Tensor, span_bias: torch.Tensor, scale: torch.Tensor | None,
                         shift: torch.Tensor | None, kernel_size: int, stride: int, groups: int,
                         relu: bool) -> torch.Tensor:
    return _cpu.fused_forward(x, reduce_weight, reduce_bias, span_weight, span_bias, scale, shift, kernel_size,
                              stride, groups, relu)


@_involution_fused_op.register_fake
def _(x, reduce_weight, reduce_bias, span_weight, span_bias, scale, shift, kernel_size, stride, groups, relu):
    b, c, h, w = x.shape
    return x.new_empty((b, c, (h + stride - 1) // stride, (w + stride - 1) // stride)).contiguous(
        memory_format=torch.channels_last)


def involution_fused(x: torch.Tensor, weights: FusedWeights, kernel_size: int, stride: int, groups: int,
                     scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                     relu: bool = False) -> torch.Tensor:
    """Involution with its kernel generated from ``x``, then ``act(scale * y + shift)``; no autograd.

    Equals ``involution(x, span(relu(bn(reduce(AvgPool(stride)(x))))), stride)`` (an Involution
    module in eval mode) followed by the affine map and an optional ReLU, to float rounding.

    Args:
        x: (B, C, H, W), float32, channels_last, on the CPU (``can_use_fused_kernel`` says).
        weights: from ``pack_fused_weights``.
        kernel_size: window K (odd); padding is "same", dilation 1.
        stride: output stride; the kernel is generated on the ceil-mode average-pooled input.
        groups: G; C / G must be a multiple of 16.
        scale: (C,) multiplies the output per channel (an inference BatchNorm), or None.
        shift: (C,) added after the scale; given exactly when scale is.
        relu: apply a ReLU last.
    """
    if (scale is None) != (shift is None):
        raise ValueError("involution_fused: pass scale and shift together, or neither")
    n = weights.span_weight.shape[1]
    if n < groups * kernel_size * kernel_size:
        raise ValueError(f"involution_fused: span_weight has {n} columns, fewer than G*K*K = "
                         f"{groups * kernel_size * kernel_size}")
    return _involution_fused_op(x, *weights, scale, shift, kernel_size, stride, groups, relu)
