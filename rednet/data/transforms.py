"""Train and eval transforms from timm's factory, parameterised by ``DataConfig``."""
from __future__ import annotations

from typing import Callable, Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

__all__ = ["build_eval_transform", "build_train_transform"]


def build_train_transform(data) -> Callable:
    """Random-resized-crop + flip (+ optional RandAugment / color jitter / random erasing).

    Args:
        data: a ``DataConfig``; the paper recipe leaves ``auto_augment``, ``color_jitter`` and ``reprob`` off.
    """
    return create_transform(
        data.img_size,
        is_training=True,
        scale=tuple(data.scale),
        ratio=tuple(data.ratio),
        hflip=data.hflip,
        # None keeps timm from inserting a ColorJitter(0.4) the paper does not use.
        color_jitter=data.color_jitter,
        auto_augment=data.auto_augment,
        interpolation=data.interpolation,
        mean=tuple(data.mean),
        std=tuple(data.std),
        re_prob=data.reprob,
    )


def build_eval_transform(img_size: int, crop_pct: float, interpolation: str = "bilinear",
                         mean: tuple = IMAGENET_DEFAULT_MEAN, std: tuple = IMAGENET_DEFAULT_STD,
                         crop_mode: Optional[str] = None) -> Callable:
    """Single crop: resize the shorter side to ``img_size / crop_pct``, center-crop ``img_size``.

    Args:
        img_size: the crop (224 in the paper).
        crop_pct: 0.875 gives the paper's resize 256 / crop 224; 1.0 only resizes.
        interpolation: resize filter.
        mean / std: normalisation on a 0-1 scale.
        crop_mode: timm's crop mode (``center``, ``squash``, ``border``), e.g. from a pretrained config.
    """
    return create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                            mean=tuple(mean), std=tuple(std), crop_mode=crop_mode)
