"""The Involution module: kernel generation (the paper's Eqn. 6) plus the operator."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from ..ops import involution, involution_export

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
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, reduction: int = 4, group_channels: int = 16):
        super().__init__()
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
            conv=nn.Conv2d(channels, mid, 1, bias=False),
            bn=nn.BatchNorm2d(mid),
            act=nn.ReLU(inplace=True),
        ))
        self.conv2 = nn.Sequential(OrderedDict(conv=nn.Conv2d(mid, kernel_size * kernel_size * self.groups, 1)))

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

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, groups={self.groups}"
