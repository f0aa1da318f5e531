"""The Involution module: kernel generation (the paper's Eqn. 6) plus the operator.

At inference on a CPU the module can also run as one fused native pass that includes the
BatchNorm and ReLU after it (``forward_fused``; RedNet's blocks and stem use it when
``can_fuse`` says so). Training, autograd and every other device take ``forward``.
"""
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn

from ..ops import (
    FusedWeights,
    can_use_fused_kernel,
    exporting_fused,
    involution,
    involution_export,
    involution_fused,
    is_exporting,
    pack_fused_weights,
    select_backend,
)

__all__ = ["Involution"]

# torch.fx records the operator as one call node instead of tracing into its input checks and
# backend choice, whose Python control flow on shapes cannot be traced symbolically. Every FX
# tracer honours this (torchvision's create_feature_extractor, timm's FX features), and the
# graph keeps the kernel-generating convolutions as nodes. Must name the global of this module.
torch.fx.wrap("involution")


class Involution(nn.Module):
    """Involution with kernels generated from the input at each output position.

    ``kernel = span(reduce(x'))``, ``x' = AvgPool(s)(x)`` when ``stride > 1``; no activation
    is applied to the kernel (the paper's ablation: a softmax costs over 1% top-1).
    Submodule names follow the authors' release (``conv1.conv``, ``conv1.bn``,
    ``conv2.conv``) so their checkpoints load by name.

    Args:
        channels: input and output channels C.
        kernel_size: window size K (odd).
        stride: output stride; the kernel is generated on the average-pooled input.
        reduction: channel reduction ratio r of the reduce branch.
        group_channels: channels that share one kernel; G = channels / group_channels.
        device: where the parameters are created (as for ``nn.Conv2d``).
        dtype: the parameters' dtype.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, reduction: int = 4, group_channels: int = 16,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if channels % group_channels:
            raise ValueError(f"Involution: channels={channels} must be divisible by group_channels={group_channels}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = channels // group_channels
        mid = channels // reduction
        # ceil_mode: on odd sizes the output is ceil(H / s); the released floor-mode pool
        # produced a kernel one pixel short there. Even sizes are unchanged.
        self.avgpool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.conv1 = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(channels, mid, 1, bias=False, **dd),
            bn=nn.BatchNorm2d(mid, **dd),
            act=nn.ReLU(inplace=True),
        ))
        self.conv2 = nn.Sequential(OrderedDict(conv=nn.Conv2d(mid, kernel_size * kernel_size * self.groups, 1, **dd)))
        # (key, folded weights) of the last forward_fused: packed once per weight version.
        self._fused_cache: Optional[tuple] = None

    def generate_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The per-pixel kernels, shape (B, G, K, K, Ho, Wo)."""
        k = self.conv2(self.conv1(self.avgpool(x)))  # (B, G*K*K, Ho, Wo)
        b, _, ho, wo = k.shape
        return k.view(b, self.groups, self.kernel_size, self.kernel_size, ho, wo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.generate_kernel(x)
        padding = (self.kernel_size - 1) // 2
        if torch.jit.is_scripting():
            # TorchScript cannot compile the backend dispatch; this branch is all it compiles.
            return involution_export(x, kernel, self.stride, padding, 1)
        return involution(x, kernel, self.stride, padding)

    def can_fuse(self, x: torch.Tensor, bn: Optional[nn.BatchNorm2d] = None) -> bool:
        """Whether ``forward_fused(x, bn)`` may replace ``bn(self(x))``: inference on a CPU.

        Needs eval mode (this module and ``bn``, with running statistics), no gradient to
        record, no autocast, the native backend (``use_backend('reference')`` or
        ``$REDNET_INVOLUTION_BACKEND=reference`` turn fusion off) and an input the fused
        pass takes (``rednet.ops.can_use_fused_kernel``: float32, channels_last, groups of
        16k channels). While a graph is exported, only inside ``rednet.ops.export_fused()``;
        never while scripted.
        """
        if self.training or self.conv1.bn.training or self.conv1.bn.running_mean is None:
            return False
        if bn is not None and (bn.training or bn.running_mean is None):
            return False
        if not isinstance(x, torch.Tensor):  # FX proxies
            return False
        if is_exporting():  # a portable graph unless export_fused() asks for the fused node
            return exporting_fused() and x.dtype == torch.float32 and self.kernel_size % 2 == 1 \
                and (self.channels // self.groups) % 16 == 0
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self._fused_inputs(bn))):
            return False
        if torch.is_autocast_enabled("cpu") or select_backend(x) != "native":
            return False
        return can_use_fused_kernel(x, self.channels, self.kernel_size, self.groups)[0]

    def forward_fused(self, x: torch.Tensor, bn: Optional[nn.BatchNorm2d] = None, relu: bool = False) -> torch.Tensor:
        """``relu(bn(self(x)))`` (without ``relu`` or ``bn`` when not given) in one native pass.

        Only where ``can_fuse(x, bn)``; the result equals the unfused path's to float rounding.

        Args:
            x: input (B, C, H, W), float32, channels_last.
            bn: an eval-mode BatchNorm applied to the output, folded into the pass.
            relu: apply a ReLU last.
        """
        weights, scale, shift = self._folded(bn)
        return involution_fused(x, weights, self.kernel_size, self.stride, self.groups, scale, shift, relu)

    def _fused_inputs(self, bn: Optional[nn.BatchNorm2d]) -> list[torch.Tensor]:
        reduce, norm, span = self.conv1.conv, self.conv1.bn, self.conv2.conv
        tensors = [reduce.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var, span.weight, span.bias]
        if bn is not None:
            tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        return [t for t in tensors if t is not None]

    def _folded(self, bn: Optional[nn.BatchNorm2d]) -> tuple[FusedWeights, Optional[torch.Tensor],
                                                                Optional[torch.Tensor]]:
        """The packed kernel-generation weights and ``bn``'s (scale, shift), reused while no tensor changes."""
        # Under torch.compile and export the cache is skipped: the ops are traced and folded into constants.
        cache = not (torch.compiler.is_compiling() or is_exporting())
        if cache:
            key = tuple((id(t), t.data_ptr(), t._version) for t in self._fused_inputs(bn))
            key += (self.conv1.bn.eps, None if bn is None else bn.eps)
            if self._fused_cache is not None and self._fused_cache[0] == key:
                return self._fused_cache[1]
        with torch.no_grad():  # inference weights: nothing to differentiate
            scale, shift = _fold_batchnorm(self.conv1.bn)
            weights = pack_fused_weights(self.conv1.conv.weight.flatten(1) * scale[:, None], shift,
                                         self.conv2.conv.weight, self.conv2.conv.bias)
            folded = (weights, *(_fold_batchnorm(bn) if bn is not None else (None, None)))
        if cache:
            self._fused_cache = (key, folded)
        return folded

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, groups={self.groups}"


def _fold_batchnorm(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``bn(x) == x * scale + shift`` per channel, in eval mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift
