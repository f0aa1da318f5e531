"""RedNet (Li et al., "Involution: Inverting the Inherence of Convolution for Visual
Recognition", CVPR 2021), exactly as the authors released it.

Module names follow the release (mmcls) without its ``backbone.`` / ``head.``
prefixes, so both public checkpoint layouts map onto this model by name. The blocks (stem,
bottleneck, stages, head) are ``_blocks``'; here are the network, its timm conventions, the
pretrained configs and the registered models.

No ``from __future__ import annotations`` here: an FX graph copies ``forward``'s annotations,
and TorchScript cannot read them as strings (it scripts timm's FX graphs, issue 20).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from ._blocks import Bottleneck, check_head, create_head, make_stages, make_stem
from ._loading import load_pretrained
from ._pretrained import WEIGHTS

__all__ = ["RedNet"]

_FEATURE_INDICES = (0, 1, 2, 3)


class RedNet(nn.Module):
    """RedNet: a ResNet whose spatial convolutions are involutions.

    Args:
        layers: number of bottleneck blocks in each of the four stages.
        num_classes: classifier outputs; 0 removes the classifier.
        in_chans: input image channels.
        global_pool: one of timm's pool types ``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'``
            (doubles the classifier's input width) or ``''`` (no pooling, only with ``num_classes=0``).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block; block ``i`` of ``n`` (from 0, over the
            whole network) drops its residual branch with probability ``drop_path_rate * i / (n - 1)``.
        drop_block_rate: DropBlock after the involution of every block in stages 3 and 4.
        zero_init_last: zero the last BatchNorm of every block, as released.
        device: where the parameters and buffers are created (as timm's models take it).
        dtype: the parameters' dtype.

    The three rates default to 0, the paper's recipe; at 0 the modules are not created, so the
    module tree is the release's.
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_block_rate: float = 0.0,
        zero_init_last: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        check_head(num_classes, global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stem = make_stem(in_chans, **dd)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_chs, self.feature_info = 64, []
        for i, (stage, in_chs) in enumerate(make_stages(layers, in_chs, drop_path_rate, drop_block_rate, **dd)):
            self.add_module(f"layer{i + 1}", stage)
            self.feature_info.append(dict(num_chs=in_chs, reduction=4 * 2**i, module=f"layer{i + 1}"))
        self.num_features = in_chs
        self.num_features = in_chs
        # An ``fc`` Linear, so the state dict keys are still ``fc.weight`` / ``fc.bias``; the 'avg'
        # pool is exactly ``x.mean((2, 3))``.
        self.global_pool, self.fc = create_head(in_chs, num_classes, global_pool, **dd)
        self.head_hidden_size = in_chs * self.global_pool.feat_mult()
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
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head, on the model's device and in its dtype.

        Args:
            num_classes: classifier outputs; 0 removes the classifier.
            global_pool: a pool type; ``None`` keeps the current one (as timm), except that a
                classifier on a model without a pool (``''``) gets the default ``'avg'``.
        """
        if global_pool is None:
            global_pool = self.global_pool.pool_type or ("avg" if num_classes > 0 else "")
        param = next(self.parameters(), None)
        dd = {"device": param.device, "dtype": param.dtype} if param is not None else {}
        self.global_pool, self.fc = create_head(self.num_features, num_classes, global_pool, **dd)
        self.num_classes = num_classes
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The stage outputs that ``indices`` selects, with or without the final features.

        Index ``i`` is ``feature_info[i]``, the output of stage ``i + 1`` (reduction 4, 8, 16, 32).
        timm's ResNet counts its stem as index 0; RedNet's features have always been the four
        stages (``features_only`` ``out_indices`` included), so the two agree here instead.

        Args:
            x: input images (B, C, H, W).
            indices: ``None`` for all four, an int ``n`` for the last ``n``, or a list (negative from the end).
            norm: accepted for timm's interface; RedNet has no final norm, so it changes nothing.
            stop_early: skip the stages after the last selected one.
            output_fmt: only ``'NCHW'``.
            intermediates_only: return only the list.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"RedNet.forward_intermediates: output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        if stop_early:
            stages = stages[: max_index + 1]
        intermediates = []
        x = self.maxpool(self.stem(x))
        for i, stage in enumerate(stages):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last of ``indices`` (and the head); returns the absolute indices.

        Args:
            indices: as in ``forward_intermediates``.
            prune_norm: accepted for timm's interface; there is no final norm.
            prune_head: remove the pool and classifier even if the last stage is kept.
        """
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for i in range(max_index + 1, len(self.feature_info)):
            # An empty Sequential (not Identity) so checkpoint_seq can still iterate it.
            setattr(self, f"layer{i + 1}", nn.Sequential())
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:
            # The head was sized for the last stage; the features now end earlier.
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_out_indices(out_indices) -> None:
    # timm indexes feature_info with them and fails with a bare IndexError; say what is valid instead.
    n = len(_FEATURE_INDICES)
    if isinstance(out_indices, int):
        valid = 1 <= out_indices <= n  # timm: an int n selects the last n
    else:
        picked = [i % n for i in out_indices if isinstance(i, int) and -n <= i < n]
        valid = len(picked) == len(out_indices) == len(set(picked)) > 0
    if not valid:
        raise ValueError(
            f"out_indices={out_indices!r} is not valid for RedNet: pick each at most once from its feature indices "
            f"{', '.join(map(str, _FEATURE_INDICES))} (stages 1 to {n}, reductions 4 to 32; -{n} to -1 count from "
            f"the end), or give an int from 1 to {n} for the last n"
        )


def _create_rednet(variant: str, layers: Sequence[int], pretrained=False, **kwargs) -> nn.Module:
    """Build through timm (pretrained_cfg, ``features_only``), then load weights ourselves.

    ``pretrained`` is ``False``, ``True`` (the variant's default weights), a local path or
    a URL. timm's own loader cannot read the foreign layouts, so it is never asked to.
    """
    # RedNet's default out_indices (timm's are 0..4, one more than RedNet has), also under a
    # feature_cfg that sets other keys only (feature_cfg=dict(feature_cls='fx')).
    kwargs["feature_cfg"] = {"out_indices": _FEATURE_INDICES, **(kwargs.get("feature_cfg") or {})}
    if kwargs.get("features_only"):
        _check_out_indices(kwargs.get("out_indices", kwargs["feature_cfg"]["out_indices"]))
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
