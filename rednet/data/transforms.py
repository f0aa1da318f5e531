"""Train and eval transforms from timm's factory, parameterised by ``DataConfig`` or a model's data config."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config

__all__ = ["build_eval_transform", "build_train_transform", "eval_data_config", "format_eval_transform",
           "resolve_eval_transform"]

# The DataConfig fields that shape the eval transform, and timm's data-config key for each.
EVAL_TRANSFORM_FIELDS = {"img_size": "input_size", "eval_crop_pct": "crop_pct", "interpolation": "interpolation",
                         "mean": "mean", "std": "std"}


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


def eval_data_config(model: nn.Module, run_config: Optional[dict] = None,
                     img_size: Optional[int] = None) -> dict[str, Any]:
    """``model``'s eval data config, as ``timm.data.resolve_data_config`` gives it.

    The keys are timm's: ``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``,
    ``crop_mode``. It starts from the model's pretrained config. A training run evaluates at its own size, crop
    and normalisation (a digits run is not ImageNet's 224 / 0.875), so ``run_config``, the
    resolved config stored in a training checkpoint, overrides those.

    Args:
        model: a timm-style model with a ``pretrained_cfg``.
        run_config: a training checkpoint's ``config``, or None.
        img_size: a square crop size overriding both.
    """
    overrides = _run_data_config(run_config) if run_config else {}
    # The crop must have the channels the first conv takes (1 for a grayscale-trained model),
    # which the pretrained config's ImageNet size does not know.
    first_conv = model.pretrained_cfg.get("first_conv")
    in_chans = model.get_submodule(first_conv).in_channels if first_conv else 3
    size = img_size or overrides.get("input_size", model.pretrained_cfg["input_size"])[-1]
    overrides["input_size"] = (in_chans, size, size)
    return resolve_data_config(overrides, model=model)


def resolve_eval_transform(data, in_chans: int = 3, model: Optional[nn.Module] = None,
                           named: Iterable[str] = ()) -> dict[str, Any]:
    """The settings of the eval transform, in timm's keys, and where they came from.

    Without ``model`` they are ``data``'s, the run's own recipe. With ``model`` they start from
    its pretrained config (``eval_data_config``), and the fields of ``data`` in ``named`` win over
    it: those the user gave for this run (``--set data.img_size=32``, ``--img-size``). A size the
    user typed must not give way silently to the 224 px of the weights' ImageNet config.

    Args:
        data: a ``DataConfig``.
        in_chans: the model's input channels (the first entry of ``input_size``) when ``model`` is None.
        model: a timm-style model whose pretrained config to start from, or None.
        named: ``DataConfig`` field names (``img_size``, ``eval_crop_pct``, ``interpolation``,
            ``mean``, ``std``) given for this run; others are ignored.

    Returns:
        ``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``, ``crop_mode`` and ``source``
        (in words, e.g. ``the pretrained config, data.img_size from the command line``).
    """
    mine = {"input_size": (in_chans, data.img_size, data.img_size), "crop_pct": data.eval_crop_pct,
            "interpolation": data.interpolation, "mean": tuple(data.mean), "std": tuple(data.std)}
    if model is None:
        return {**mine, "crop_mode": "center", "source": "the run config"}
    named = [f for f in EVAL_TRANSFORM_FIELDS if f in set(named)]
    dc = eval_data_config(model, img_size=data.img_size if "img_size" in named else None)
    for f in named:
        if f != "img_size":  # the size keeps the channels eval_data_config found in the model
            dc[EVAL_TRANSFORM_FIELDS[f]] = mine[EVAL_TRANSFORM_FIELDS[f]]
    given = f", {', '.join(f'data.{f}' for f in named)} from the command line" if named else ""
    return {**dc, "crop_mode": dc.get("crop_mode") or "center", "source": f"the pretrained config{given}"}


def format_eval_transform(settings: dict[str, Any]) -> str:
    """``resolve_eval_transform``'s answer as one log line."""
    size = "x".join(str(n) for n in settings["input_size"])

    def numbers(values: tuple) -> str:
        return "/".join(f"{v:.4g}" for v in values)

    return (f"eval transform from {settings['source']}: input {size}, crop_pct {settings['crop_pct']:.4g}, "
            f"crop_mode {settings['crop_mode']}, interpolation {settings['interpolation']}, "
            f"mean {numbers(settings['mean'])}, std {numbers(settings['std'])}")


def _run_data_config(config: dict) -> dict[str, Any]:
    """What a run validated with, from its stored config's ``data`` section, in timm's keys."""
    data = config.get("data", {})
    out: dict[str, Any] = {}
    if data.get("img_size"):
        out["input_size"] = (config["model"].get("in_chans", 3), data["img_size"], data["img_size"])
    if data.get("eval_crop_pct"):
        out["crop_pct"] = data["eval_crop_pct"]
    for key in ("interpolation", "mean", "std"):
        if data.get(key) is not None:
            out[key] = tuple(data[key]) if isinstance(data[key], list) else data[key]
    return out
