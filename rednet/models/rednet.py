"""RedNet (Li et al., "Involution: Inverting the Inherence of Convolution for Visual
Recognition", CVPR 2021), exactly as the authors released it.

Module names follow the release (mmcls) without its ``backbone.`` / ``head.``
prefixes, so both public checkpoint layouts map onto this model by name.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq

from ..layers import Involution
from ._loading import load_pretrained
from ._pretrained import WEIGHTS

__all__ = ["Bottleneck", "RedNet"]


def _conv_bn_act(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    # The release's ConvModule: names conv / bn / act.
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False),
        bn=nn.BatchNorm2d(out_chs),
        act=nn.ReLU(inplace=True),
    ))


class Bottleneck(nn.Module):
    """ResNet bottleneck whose 3x3 convolution is a 7x7 involution carrying the stride.

    Args:
        in_chs: input channels.
        mid_chs: width of the involution; the block outputs ``mid_chs * 4``.
        stride: stride of the involution (and of the projection shortcut).
        kernel_size: involution window.
    """

    expansion = 4

    def __init__(self, in_chs: int, mid_chs: int, stride: int = 1, kernel_size: int = 7):
        super().__init__()
        out_chs = mid_chs * self.expansion
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.conv2 = Involution(mid_chs, kernel_size, stride)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.relu(x + shortcut)


class RedNet(nn.Module):
    """RedNet: a ResNet whose spatial convolutions are involutions.

    Args:
        layers: number of bottleneck blocks in each of the four stages.
        num_classes: classifier outputs; 0 removes the classifier.
        in_chans: input image channels.
        global_pool: ``'avg'`` or ``''`` (no pooling, only with ``num_classes=0``).
        drop_rate: dropout before the classifier.
        zero_init_last: zero the last BatchNorm of every block, as released.
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        zero_init_last: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        # Stem: conv(s2) -> involution -> BN -> ReLU -> conv, indices as released.
        self.stem = nn.Sequential(
            _conv_bn_act(in_chans, 32, 3, stride=2),
            Involution(32, 3, 1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            _conv_bn_act(32, 64, 3),
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_chs, self.feature_info = 64, []
        for i, (depth, mid) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(Bottleneck(in_chs, mid, stride if j == 0 else 1))
                in_chs = mid * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=4 * 2**i, module=f"layer{i + 1}"))
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = global_pool
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(zero_init_last)

    @torch.no_grad()
    def init_weights(self, zero_init_last: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_rednet(variant: str, layers: Sequence[int], pretrained=False, **kwargs) -> nn.Module:
    """Build through timm (pretrained_cfg, ``features_only``), then load weights ourselves.

    ``pretrained`` is ``False``, ``True`` (the variant's default weights), a local path or
    a URL. timm's own loader cannot read the foreign layouts, so it is never asked to.
    """
    kwargs.setdefault("feature_cfg", dict(out_indices=(0, 1, 2, 3)))
    model = build_model_with_cfg(RedNet, variant, pretrained=False, layers=layers, **kwargs)
    if pretrained is True:
        cfg = model.pretrained_cfg
        weights = WEIGHTS.get(f"{cfg['architecture']}.{cfg['tag']}")
        # A user's pretrained_cfg_overlay=dict(file=...) wins over the published URL.
        source = cfg.get("file") or cfg.get("url")
        load_pretrained(model, source, sha256=weights.sha256 if weights and source == weights.url else None)
    elif pretrained:
        load_pretrained(model, pretrained)
    return model


def _cfg(variant: str) -> dict:
    w = WEIGHTS[variant]
    return dict(
        url=w.url,
        num_classes=w.num_classes,
        input_size=w.input_size,
        pool_size=(7, 7),
        crop_pct=w.crop_pct,
        interpolation=w.interpolation,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="stem.0.conv",
        classifier="fc",
        license="apache-2.0",
        origin_url="https://github.com/PaddlePaddle/PaddleClas",
        paper_ids="arXiv:2103.06255",
    )


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in WEIGHTS})


@register_model
def rednet26(pretrained: bool | str = False, **kwargs) -> RedNet:
    """RedNet-26: stages of (1, 2, 4, 1) blocks.

    Args:
        pretrained: ``True`` for the PaddleClas ImageNet weights, or a weights file path / URL.
        **kwargs: model arguments (``num_classes``, ``in_chans``, ``features_only``, ...).
    """
    return _create_rednet("rednet26", (1, 2, 4, 1), pretrained, **kwargs)


@register_model
def rednet38(pretrained: bool | str = False, **kwargs) -> RedNet:
    """RedNet-38: stages of (2, 3, 5, 2) blocks.

    Args:
        pretrained: ``True`` for the PaddleClas ImageNet weights, or a weights file path / URL.
        **kwargs: model arguments (``num_classes``, ``in_chans``, ``features_only``, ...).
    """
    return _create_rednet("rednet38", (2, 3, 5, 2), pretrained, **kwargs)


@register_model
def rednet50(pretrained: bool | str = False, **kwargs) -> RedNet:
    """RedNet-50: stages of (3, 4, 6, 3) blocks.

    Args:
        pretrained: ``True`` for the PaddleClas ImageNet weights, or a weights file path / URL.
        **kwargs: model arguments (``num_classes``, ``in_chans``, ``features_only``, ...).
    """
    return _create_rednet("rednet50", (3, 4, 6, 3), pretrained, **kwargs)


@register_model
def rednet101(pretrained: bool | str = False, **kwargs) -> RedNet:
    """RedNet-101: stages of (3, 4, 23, 3) blocks.

    Args:
        pretrained: ``True`` for the PaddleClas ImageNet weights, or a weights file path / URL.
        **kwargs: model arguments (``num_classes``, ``in_chans``, ``features_only``, ...).
    """
    return _create_rednet("rednet101", (3, 4, 23, 3), pretrained, **kwargs)


@register_model
def rednet152(pretrained: bool | str = False, **kwargs) -> RedNet:
    """RedNet-152: stages of (3, 8, 36, 3) blocks.

    Args:
        pretrained: ``True`` for the PaddleClas ImageNet weights, or a weights file path / URL.
        **kwargs: model arguments (``num_classes``, ``in_chans``, ``features_only``, ...).
    """
    return _create_rednet("rednet152", (3, 8, 36, 3), pretrained, **kwargs)
