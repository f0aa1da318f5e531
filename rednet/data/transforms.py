"""Train and eval transforms: timm's crop and flip on uint8 tensors, or timm's PIL pipeline; eval data configs.

Both kinds end in a (3, H, W) uint8 tensor: normalisation happens on the device
(``rednet.data.DeviceInput``). ``TrainCrop`` and ``EvalCrop`` work on the tensors
``torchvision.io`` decodes; timm's PIL pipeline (``create_transform(..., use_prefetcher=True)``)
serves what needs PIL: ``data.decode: pil``, RandAugment / AutoAugment, color jitter and the
``border`` crop mode.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from torchvision.transforms.v2 import functional as F

__all__ = ["EvalCrop", "TrainCrop", "build_eval_transform", "build_train_transform", "eval_data_config",
           "format_eval_transform", "resolve_eval_transform", "uses_pil"]

# The DataConfig fields that shape the eval transform, and timm's data-config key for each.
EVAL_TRANSFORM_FIELDS = {"img_size": "input_size", "eval_crop_pct": "crop_pct", "interpolation": "interpolation",
                         "mean": "mean", "std": "std"}

Box = tuple[int, int, int, int]  # top, left, height, width


def _as_tensor(img: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
    return img if isinstance(img, torch.Tensor) else F.pil_to_tensor(img.convert("RGB"))


class TrainCrop:
    """timm's random-resized crop and horizontal flip on a (3, H, W) uint8 tensor (or a PIL image).

    The crop box comes from timm's ``RandomResizedCropAndInterpolation.get_params`` (python's
    ``random``) and the flip from ``torch.rand(1) < hflip`` as in torchvision's
    ``RandomHorizontalFlip``, in that order: the same draws as timm's PIL pipeline, so the same
    seeds give the same boxes and flips. The resize is torchvision's antialiased one on uint8.

    Args:
        size: side of the square output.
        scale / ratio: area fraction and aspect-ratio ranges of the box.
        interpolation: ``bilinear``, ``bicubic`` or ``nearest``.
        hflip: flip probability.
    """

    takes_tensor = True

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bilinear", hflip: float = 0.5):
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip
        self.interpolation = str_to_interp_mode(interpolation)

    def draw(self, width: int, height: int) -> tuple[Box, bool]:
        """The random box and flip for an image of ``width`` x ``height``."""
        # get_params reads only the size; an expanded scalar stands in for the image without memory.
        stand_in = torch.empty((), dtype=torch.uint8).expand(1, height, width)
        box = RandomResizedCropAndInterpolation.get_params(stand_in, self.scale, self.ratio)
        flip = bool(torch.rand(1) < self.hflip) if self.hflip > 0 else False
        return box, flip

    def apply(self, img: torch.Tensor, box: Box, flip: bool) -> torch.Tensor:
        """Crop ``box`` out of ``img`` (3, H, W), resize it to ``size``, flip it if asked."""
        out = F.resized_crop(img, *box, [self.size, self.size], self.interpolation, antialias=True)
        return F.horizontal_flip(out) if flip else out

    def __call__(self, img: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
        img = _as_tensor(img)
        box, flip = self.draw(img.shape[-1], img.shape[-2])
        return self.apply(img, box, flip)

    def __repr__(self) -> str:
        return (f"TrainCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation.value}, hflip={self.hflip})")


class EvalCrop:
    """timm's single-crop eval transform on a (3, H, W) uint8 tensor (or a PIL image).

    ``center``: resize the shorter side to ``floor(size / crop_pct)``, then center-crop ``size``;
    ``squash``: resize both sides to it, then center-crop.

    Args:
        size: side of the square crop.
        crop_pct: the crop's share of the resized image.
        interpolation: ``bilinear``, ``bicubic`` or ``nearest``.
        crop_mode: ``center`` or ``squash``.
    """

    takes_tensor = True

    def __init__(self, size: int, crop_pct: float = 0.875, interpolation: str = "bilinear",
                 crop_mode: str = "center"):
        if crop_mode not in ("center", "squash"):
            raise ValueError(f"EvalCrop supports crop_mode center and squash, not {crop_mode!r}")
        self.size, self.crop_pct, self.crop_mode = size, crop_pct, crop_mode
        self.interpolation = str_to_interp_mode(interpolation)
        self.scale_size = math.floor(size / crop_pct)

    def __call__(self, img: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
        img = _as_tensor(img)
        resize = [self.scale_size] if self.crop_mode == "center" else [self.scale_size, self.scale_size]
        img = F.resize(img, resize, self.interpolation, antialias=True)
        return F.center_crop(img, [self.size, self.size])

    def __repr__(self) -> str:
        return (f"EvalCrop(size={self.size}, crop_pct={self.crop_pct}, interpolation={self.interpolation.value}, "
                f"crop_mode={self.crop_mode})")


def uses_pil(transform: Optional[Callable]) -> bool:
    """Whether ``transform`` takes PIL images (timm's PIL pipeline) rather than uint8 tensors."""
    return transform is not None and not getattr(transform, "takes_tensor", False)


def build_train_transform(data) -> Callable:
    """Random-resized-crop + flip (+ optional RandAugment / color jitter), ending in a uint8 tensor.

    ``TrainCrop`` on tensors unless ``data.decode`` is ``pil`` or a PIL-only augmentation is on
    (``auto_augment``, ``color_jitter``): then timm's PIL pipeline. Random erasing (``reprob``)
    works on normalised pixels, so it runs on the device (``build_device_input``).

    Args:
        data: a ``DataConfig``; the paper recipe leaves ``auto_augment``, ``color_jitter`` and ``reprob`` off.
    """
    if data.decode != "pil" and not data.auto_augment and data.color_jitter is None:
        return TrainCrop(data.img_size, data.scale, data.ratio, data.interpolation, data.hflip)
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
        use_prefetcher=True,  # uint8 out: no ToTensor / Normalize / RandomErasing here
    )


def build_eval_transform(img_size: int, crop_pct: float, interpolation: str = "bilinear",
                         mean: tuple = IMAGENET_DEFAULT_MEAN, std: tuple = IMAGENET_DEFAULT_STD,
                         crop_mode: Optional[str] = None, decode: str = "cpu") -> Callable:
    """Single crop: resize the shorter side to ``img_size / crop_pct``, center-crop ``img_size``; uint8 out.

    Args:
        img_size: the crop (224 in the paper).
        crop_pct: 0.875 gives the paper's resize 256 / crop 224; 1.0 only resizes.
        interpolation: resize filter.
        mean / std: the normalisation (on a 0-1 scale), applied on the device; ``border`` pads with the mean.
        crop_mode: timm's crop mode (``center``, ``squash``, ``border``), e.g. from a pretrained config.
        decode: ``data.decode``; ``pil`` (or the ``border`` mode) gives timm's PIL pipeline.
    """
    crop_mode = crop_mode or "center"
    if decode != "pil" and crop_mode in ("center", "squash"):
        return EvalCrop(img_size, crop_pct, interpolation, crop_mode)
    return create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                            mean=tuple(mean), std=tuple(std), crop_mode=crop_mode, use_prefetcher=True)


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
