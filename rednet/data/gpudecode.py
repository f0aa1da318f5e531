"""JPEG decode on the GPU (``data.decode: gpu``): workers read bytes, nvJPEG decodes whole batches.

Loader workers only read each file and its header and draw the crop box and flip
(``TrainCrop.draw``: the same draws as on the CPU path); ``GpuDecoder`` then decodes the
batch with ``torchvision.io.decode_jpeg(..., device=...)`` and crops and resizes on the
device. Files torchvision.io does not decode like PIL (see ``rednet.data.decode``) are
decoded and transformed on the CPU in the worker as usual, and travel in the same batch.

On first contact ``check_gpu_decode`` decodes a few of the dataset's JPEGs on the device
and on the CPU and compares them; ``build_device_input`` falls back to CPU decode, with one
warning, when that fails, as the involution kernel falls back to the reference.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .decode import decode_rgb

__all__ = ["EncodedBatch", "EncodedImage", "GpuDecodeWarning", "GpuDecoder", "check_gpu_decode"]

_logger = logging.getLogger(__name__)

# Largest mean absolute difference (0-255 scale) between device and CPU decode of one image.
# nvJPEG and libjpeg-turbo differ in IDCT and chroma upsampling by about one level; a broken
# decoder (wrong colour space, channel order, garbage) is tens of levels off.
CHECK_TOLERANCE = 2.0


class GpuDecodeWarning(UserWarning):
    """GPU decode was asked for but cannot be used here; CPU decode is used instead."""


@dataclass
class EncodedImage:
    """A JPEG file's bytes and what to do with them once decoded.

    Args:
        data: the file's bytes, 1-D uint8.
        box: the training crop (top, left, height, width); None: the eval resize and center crop.
        flip: flip horizontally after the crop.
    """

    data: torch.Tensor
    box: Optional[tuple[int, int, int, int]] = None
    flip: bool = False


@dataclass
class EncodedBatch:
    """A batch some of whose images still need decoding: each entry is an ``EncodedImage`` or a ready
    (3, S, S) uint8 tensor (a file decoded on the CPU)."""

    items: list

    def __len__(self) -> int:
        return len(self.items)


class GpuDecoder:
    """Decodes an ``EncodedBatch`` on a device and applies the crop: (B, 3, S, S) uint8 there.

    Args:
        crop: the dataset's ``TrainCrop`` (images come with their box) or ``EvalCrop``.
    """

    def __init__(self, crop):
        self.crop = crop

    def __call__(self, batch: EncodedBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded batch on ``device`` and a bool mask of the images kept (unreadable ones are dropped)."""
        encoded = [i for i, item in enumerate(batch.items) if isinstance(item, EncodedImage)]
        pixels = decode_on_device([batch.items[i].data for i in encoded], device)
        out: list[Optional[torch.Tensor]] = [None] * len(batch)
        for i, item in enumerate(batch.items):
            if not isinstance(item, EncodedImage):
                out[i] = item.to(device, non_blocking=True)
        for i, img in zip(encoded, pixels):
            item = batch.items[i]
            if img is None:  # the device could not decode it: the CPU decides whether it is an image
                try:
                    img = decode_rgb(item.data).to(device)
                except Exception as e:  # noqa: BLE001  the same failures the dataset skips
                    _logger.warning("skipping unreadable image in a GPU-decoded batch: %s", e)
                    continue
            out[i] = self.crop.apply(img, item.box, item.flip) if item.box is not None else self.crop(img)
        keep = torch.tensor([o is not None for o in out], dtype=torch.bool)
        kept = [o for o in out if o is not None]
        if not kept:
            return torch.empty(0, dtype=torch.uint8, device=device), keep
        return torch.stack(kept), keep  # (B', 3, S, S)


def decode_on_device(datas: Sequence[torch.Tensor], device: torch.device) -> list[Optional[torch.Tensor]]:
    """``decode_jpeg`` of every file on ``device`` (nvJPEG on CUDA), in one call when all decode; None per failure."""
    if not datas:
        return []
    try:
        return list(decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass  # one bad file fails the batched call: decode them one by one
    out: list[Optional[torch.Tensor]] = []
    for data in datas:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out


_checked: dict[str, Optional[str]] = {}  # device -> None (works) or why not


def check_gpu_decode(device: torch.device, files: Sequence[torch.Tensor]) -> Optional[str]:
    """Decode ``files`` (JPEG bytes) on ``device`` and on the CPU; None if they agree, else why not.

    Done once per device and process; later calls return the first answer.
    """
    key = str(device)
    if key in _checked:
        return _checked[key]
    why = None
    try:
        on_device = decode_on_device(files, device)
        for data, img in zip(files, on_device):
            if img is None:
                why = "the device could not decode a JPEG the CPU decodes"
                break
            ref = decode_rgb(data)
            if img.shape != ref.shape:
                why = f"decoded shape {tuple(img.shape)} instead of {tuple(ref.shape)}"
                break
            diff = (img.cpu().float() - ref.float()).abs().mean().item()
            if diff > CHECK_TOLERANCE:
                why = f"decoded pixels differ from the CPU's by {diff:.2f} levels on average (> {CHECK_TOLERANCE})"
                break
    except Exception as e:  # noqa: BLE001  any failure of the decoder means: do not use it
        why = f"{type(e).__name__}: {e}"
    _checked[key] = why
    return why


def warn_fallback(why: str) -> None:
    """The one warning of a run that asked for GPU decode and got CPU decode."""
    warnings.warn(f"data.decode: gpu cannot be used ({why}); decoding on the CPU instead", GpuDecodeWarning,
                  stacklevel=3)
