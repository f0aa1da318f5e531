"""RedNet's building blocks, as the authors released them: the stem, the involution bottleneck,
the four stages of bottlenecks and the head (pool and classifier); ``rednet`` assembles them.

No ``from __future__ import annotations`` here: an FX graph copies ``forward``'s annotations,
and TorchScript cannot read them as strings (it scripts timm's FX graphs, issue 20).
"""
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import DropBlock2d, DropPath, create_classifier

from ..layers import Involution

__all__ = ["POOL_TYPES", "Bottleneck", "Stem", "check_head", "create_head", "make_stages", "make_stem"]


# timm's pool types (timm.layers.SelectAdaptivePool2d); '' keeps the (B, C, H, W) map.
POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "")
# DropBlock per stage exactly as timm's ResNet applies it (timm.models.resnet.drop_blocks): the
# last two stages only, where the DropBlock paper (Ghiasi et al., 2018) found it helps ResNet-50.
_DROP_BLOCK_CFG = (None, None, dict(block_size=5, gamma_scale=0.25), dict(block_size=3, gamma_scale=1.0))
# Feature index i is the output of stage i + 1 (feature_info); features_only returns all four by default.


def _conv_bn_act(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, **dd) -> nn.Sequential:
    # The release's ConvModule: names conv / bn / act.
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False, **dd),
        bn=nn.BatchNorm2d(out_chs, **dd),
        act=nn.ReLU(inplace=True),
    ))


class Stem(nn.Sequential):
    """The release's stem, ``Sequential(conv, involution, bn, relu, conv)`` (its indices name the weights).

    At inference on a CPU the involution, BatchNorm and ReLU run as one fused native pass, as in
    the blocks (``Involution.can_fuse``); otherwise it is the plain sequence.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self[0](x)
        fused = False
        if not torch.jit.is_scripting():  # TorchScript compiles only the plain sequence
            if self[1].can_fuse(x, self[2]):
                x, fused = self[1].forward_fused(x, self[2], relu=True), True
        if not fused:
            x = self[3](self[2](self[1](x)))
        return self[4](x)


class Bottleneck(nn.Module):
    """ResNet bottleneck whose 3x3 convolution is a 7x7 involution carrying the stride.

    Args:
        in_chs: input channels.
        mid_chs: width of the involution; the block outputs ``mid_chs * 4``.
        stride: stride of the involution (and of the projection shortcut).
        kernel_size: involution window.
        drop_block: applied after the involution's BatchNorm (timm's DropBlock2d), or None.
        drop_path: applied to the residual branch before the sum (timm's DropPath), or None.
        device: where the parameters are created.
        dtype: the parameters' dtype.
    """

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        mid_chs: int,
        stride: int = 1,
        kernel_size: int = 7,
        drop_block: Optional[nn.Module] = None,
        drop_path: Optional[nn.Module] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        out_chs = mid_chs * self.expansion
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(mid_chs, **dd)
        self.conv2 = Involution(mid_chs, kernel_size, stride, **dd)
        self.bn2 = nn.BatchNorm2d(mid_chs, **dd)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(out_chs, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False, **dd),
                                            nn.BatchNorm2d(out_chs, **dd))
        # None rather than nn.Identity when off, so the default model's module tree is the
        # release's (neither has parameters, so the state dict is unchanged either way).
        self.drop_block = drop_block
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.bn3(self.conv3(self._involution_bn_relu(self.relu(self.bn1(self.conv1(x))))))
        if self.drop_path is not None:
            x = self.drop_path(x)
        # In place, as timm's ResNet: an out-of-place sum allocates (and first touches) one more
        # block-sized tensor per block, which cost RedNet-50 6-11% of its CPU inference time.
        # Neither bn3 nor drop_path keeps its output for backward, so autograd allows it.
        x += shortcut
        return self.relu(x)

    def _involution_bn_relu(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles only the plain sequence below
            if self.conv2.can_fuse(x, self.bn2):
                # Inference on a CPU: involution, bn2 and ReLU in one native pass (DropBlock is off in eval).
                return self.conv2.forward_fused(x, self.bn2, relu=True)
        x = self.bn2(self.conv2(x))
        if self.drop_block is not None:
            x = self.drop_block(x)
        return self.relu(x)


def check_head(num_classes: int, global_pool: str) -> None:
    # timm's SelectAdaptivePool2d asserts on an unknown type; say what is valid instead.
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
    if not global_pool and num_classes > 0:
        raise ValueError("global_pool='' keeps the (B, C, H, W) map, which the classifier cannot take; "
                         "pass num_classes=0 or a pool type")


def create_head(num_features: int, num_classes: int, global_pool: str, **dd) -> Tuple[nn.Module, nn.Module]:
    """The parameter-free pool (timm's SelectAdaptivePool2d) and the classifier ``fc``."""
    check_head(num_classes, global_pool)
    pool, _ = create_classifier(num_features, 0, pool_type=global_pool)
    # The Linear is built here, not by create_classifier, which takes device and dtype only from timm 1.0.21.
    fc = nn.Linear(num_features * pool.feat_mult(), num_classes, **dd) if num_classes > 0 else nn.Identity()
    return pool, fc


def make_stem(in_chans: int, **dd) -> Stem:
    """conv(s2) -> involution -> BN -> ReLU -> conv, 32 then 64 channels, indices as released."""
    return Stem(
        _conv_bn_act(in_chans, 32, 3, stride=2, **dd),
        Involution(32, 3, 1, **dd),
        nn.BatchNorm2d(32, **dd),
        nn.ReLU(inplace=True),
        _conv_bn_act(32, 64, 3, **dd),
    )


def make_stages(layers: Sequence[int], in_chs: int, drop_path_rate: float, drop_block_rate: float,
                **dd) -> List[Tuple[nn.Sequential, int]]:
    """The four stages of bottlenecks and their output channels (see ``RedNet`` for the rates).

    Stage ``i`` has ``layers[i]`` blocks of width ``64 * 2**i``; its first block carries the
    stride (2, but 1 in stage 1).
    """
    stages = []
    net_blocks, block_idx = sum(layers), 0
    for i, (depth, mid, db_cfg) in enumerate(zip(layers, (64, 128, 256, 512), _DROP_BLOCK_CFG)):
        stride = 1 if i == 0 else 2
        blocks = []
        for j in range(depth):
            # timm ResNet's linear decay rule; max(.., 1) keeps a one-block network defined.
            dpr = drop_path_rate * block_idx / max(net_blocks - 1, 1)
            blocks.append(Bottleneck(
                in_chs,
                mid,
                stride if j == 0 else 1,
                drop_block=DropBlock2d(drop_block_rate, **db_cfg) if drop_block_rate and db_cfg else None,
                drop_path=DropPath(dpr) if dpr > 0 else None,
                **dd,
            ))
            in_chs = mid * Bottleneck.expansion
            block_idx += 1
        stages.append((nn.Sequential(*blocks), in_chs))
    return stages
