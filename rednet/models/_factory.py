"""``create_model`` / ``list_models`` over timm's registry, limited to this package's models."""
from __future__ import annotations

import timm
import torch.nn as nn

from . import rednet as _rednet  # noqa: F401  registers the models with timm


def list_models(pattern: str = "rednet*") -> list[str]:
    """Registered RedNet model names matching ``pattern``."""
    return timm.list_models(pattern, module="rednet")


def create_model(name: str, pretrained: bool | str | None = None, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: a model name such as ``'rednet50'`` (any timm model also works).
        pretrained: ``True`` for the model's default weights, a local path or a URL.
        **kwargs: model arguments (``num_classes``, ``in_chans``, ``features_only``, ...).
    """
    return timm.create_model(name, pretrained=pretrained or False, **kwargs)
