"""torch.hub entry points: ``torch.hub.load('<repo or dir>', 'rednet50', pretrained=True)``.

Each entry point takes ``pretrained`` (``True`` for the model's default PaddleClas
weights, or a local path / URL of a checkpoint in any supported layout: this
project's safetensors, the authors' mmcls ``.pth``, a PaddleClas ``.pdparams``) and
the model arguments of ``rednet.create_model`` (``num_classes``, ``in_chans``,
``features_only``, ``drop_rate``, ...). Importing this file builds nothing.
"""
from __future__ import annotations

dependencies = ["torch", "timm", "numpy", "safetensors"]

import torch.nn as nn  # noqa: E402

from rednet.models import create_model as _create_model  # noqa: E402


def rednet26(pretrained: bool | str = False, **kwargs) -> nn.Module:
    """RedNet-26: stages of (1, 2, 4, 1) blocks.

    Args:
        pretrained: ``True`` for the PaddleClas ImageNet weights, or a checkpoint path / URL.
        **kwargs: model arguments (``num_classes``, ``in_chans``, ``features_only``, ...).
    """
    return _create_model("rednet26", pretrained=pretrained, **kwargs)


def rednet38(pretrained: bool | str = False, **kwargs) -> nn.Module:
    """RedNet-38: stages of (2, 3, 5, 2) blocks.

    Args:
        pretrained: ``True`` for the PaddleClas ImageNet weights, or a checkpoint path / URL.
        **kwargs: model arguments (``num_classes``, ``in_chans``, ``features_only``, ...).
    """
    return _create_model("rednet38", pretrained=pretrained, **kwargs)


def rednet50(pretrained: bool | str = False, **kwargs) -> nn.Module:
    """RedNet-50: stages of (3, 4, 6, 3) blocks.

    Args:
        pretrained: ``True`` for the PaddleClas ImageNet weights, or a checkpoint path / URL.
        **kwargs: model arguments (``num_classes``, ``in_chans``, ``features_only``, ...).
    """
    return _create_model("rednet50", pretrained=pretrained, **kwargs)


def rednet101(pretrained: bool | str = False, **kwargs) -> nn.Module:
    """RedNet-101: stages of (3, 4, 23, 3) blocks.

    Args:
        pretrained: ``True`` for the PaddleClas ImageNet weights, or a checkpoint path / URL.
        **kwargs: model arguments (``num_classes``, ``in_chans``, ``features_only``, ...).
    """
    return _create_model("rednet101", pretrained=pretrained, **kwargs)


def rednet152(pretrained: bool | str = False, **kwargs) -> nn.Module:
    """RedNet-152: stages of (3, 8, 36, 3) blocks.

    Args:
        pretrained: ``True`` for the PaddleClas ImageNet weights, or a checkpoint path / URL.
        **kwargs: model arguments (``num_classes``, ``in_chans``, ``features_only``, ...).
    """
    return _create_model("rednet152", pretrained=pretrained, **kwargs)
