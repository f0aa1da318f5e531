"""Image files to uint8 tensors: torchvision.io (libjpeg-turbo, libpng) where it gives PIL's pixels, PIL otherwise.

PIL opens every file first, which reads only the header: it names the format and mode and
refuses decompression bombs (``PIL.Image.MAX_IMAGE_PIXELS``) before anything is decoded.
8-bit RGB and grey JPEGs and 8-bit RGB(A) and grey(+alpha) PNGs then go to
``torchvision.io.decode_image``, which gives the same pixels as PIL's ``convert("RGB")``
(tested) at a lower CPU cost; what torchvision.io cannot decode the same way (CMYK JPEG,
palette, 16-bit or 1-bit PNG, GIF, WebP, TIFF, BMP...) is decoded by PIL as before.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

__all__ = ["decode_rgb", "load_rgb", "read_bytes", "torchvision_decodes"]

# Modes in which PIL holds a 16-bit grey image (a 16-bit PNG opens as one of them).
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# PNG colour types (IHDR byte 25) libpng turns into RGB as PIL does: grey, RGB, grey+alpha, RGBA.
_PNG_DIRECT_TYPES = (0, 2, 4, 6)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` fully decoded as 8-bit RGB.

    PIL's ``convert("RGB")`` clips 16-bit grey values at 255, so a 16-bit PNG came out
    almost white; such images are scaled to 8 bits first (65535 -> 255).
    """
    if img.mode == "RGB":  # convert would decode into a copy
        img.load()
        return img
    if img.mode in _WIDE_GREY_MODES:
        wide = np.asarray(img, dtype=np.float64)  # (H, W); mode "I" is int32, read as 16-bit data
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode an image file fully, as an 8-bit RGB PIL image (the ``pil`` decode path)."""
    with open(path, "rb") as f:
        return to_rgb(Image.open(f))


def read_bytes(path: str) -> torch.Tensor:
    """A file's bytes as a 1-D uint8 tensor (what ``torchvision.io`` decoders take)."""
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def torchvision_decodes(img: Image.Image, data: torch.Tensor) -> bool:
    """Whether ``torchvision.io`` decodes the file PIL opened as ``img`` to the pixels of ``to_rgb(img)``."""
    if img.format == "JPEG":
        return img.mode in ("RGB", "L")  # CMYK / YCCK JPEGs go to PIL
    if img.format == "PNG" and data.numel() > 25:
        # IHDR: bit depth at byte 24, colour type at 25. PIL reports a 16-bit RGB PNG as "RGB" too.
        return int(data[24]) == 8 and int(data[25]) in _PNG_DIRECT_TYPES
    return False


def decode_rgb(data: torch.Tensor, header: Optional[Image.Image] = None) -> torch.Tensor:
    """Decode a file's bytes to a (3, H, W) uint8 RGB tensor.

    Args:
        data: the file's bytes (``read_bytes``).
        header: the file already opened by PIL (``Image.open``), if the caller has it.

    Raises:
        PIL's or torchvision's errors for a file that is not a complete image, and
        ``PIL.Image.DecompressionBombError`` for one with too many pixels.
    """
    img = header if header is not None else Image.open(io.BytesIO(data.numpy()))
    if torchvision_decodes(img, data):
        return decode_image(data, mode=ImageReadMode.RGB)
    rgb = np.asarray(to_rgb(img))  # (H, W, 3)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)
