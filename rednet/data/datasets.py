"""Datasets: ImageNet-layout folders, scikit-learn's bundled digits, synthetic tensors."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

__all__ = ["DataError", "DigitsDataset", "SafeImageFolder", "SyntheticDataset"]

_logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset that cannot be used: missing split, empty, mismatched classes."""


class SafeImageFolder(ImageFolder):
    """``ImageFolder`` whose unreadable or corrupt images yield ``None`` instead of raising.

    The collate function (``rednet.data.collate_skip``) drops the ``None`` entries and
    counts them, so one bad file among a million costs one sample, not the run.

    Args:
        root: a folder with one sub-folder per class.
        transform: applied to the decoded PIL image.
    """

    def __init__(self, root: str | Path, transform: Optional[Callable] = None):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"dataset split {root} does not exist (expected one folder per class inside)")
        try:
            super().__init__(str(root), transform=transform)
        except FileNotFoundError as e:  # torchvision: no class folders / no image files
            raise DataError(f"dataset split {root} is empty: {e}") from e

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            img = self.loader(path)  # decodes fully (convert("RGB")), so bad files fail here
        except Exception as e:  # noqa: BLE001  PIL raises OSError, SyntaxError, ValueError... for bad files
            _logger.warning("skipping unreadable image %s: %s", path, e)
            return None
        # Outside the try: a failing transform is a bug to report, not an image to skip.
        return (self.transform(img) if self.transform is not None else img), target


class DigitsDataset(Dataset):
    """scikit-learn's bundled 8x8 digits (no download), one stratified split, as RGB images.

    The 1797 images are split once with a fixed seed; ``train=False`` gives the held-out
    part. Each 0-16 grey image is scaled to 0-255, upsampled (bilinear) to ``img_size``
    and repeated to three channels, then ``transform`` is applied to the PIL image.

    Args:
        train: the training part or the held-out part.
        img_size: side of the upsampled image.
        val_fraction: share of the held-out part.
        split_seed: seed of the split.
        transform: applied to the PIL image.
    """

    def __init__(self, *, train: bool, img_size: int = 32, val_fraction: float = 0.2, split_seed: int = 0,
                 transform: Optional[Callable] = None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8)
        tr, va = train_test_split(np.arange(len(images)), test_size=val_fraction, random_state=split_seed,
                                  stratify=digits.target)
        idx = tr if train else va
        self.images = images[idx]
        self.targets = digits.target[idx].astype(np.int64).tolist()
        self.classes = [str(c) for c in range(10)]
        self.img_size = img_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index]).resize((self.img_size, self.img_size), Image.BILINEAR)
        img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class SyntheticDataset(Dataset):
    """Random images with a class-dependent offset, reproducible per index; for smoke tests and benchmarks.

    Args:
        length: number of samples.
        num_classes: labels are ``index % num_classes``.
        img_size: side of the square image.
        in_chans: channels.
        seed: combined with the index, so every process sees the same sample for an index.
    """

    def __init__(self, length: int, num_classes: int, img_size: int, in_chans: int = 3, seed: int = 0):
        self.length = length
        self.num_classes = num_classes
        self.shape = (in_chans, img_size, img_size)
        self.seed = seed
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        target = index % self.num_classes
        # The offset makes the labels learnable, so a loss curve means something.
        img = torch.randn(self.shape, generator=g) + (target / max(1, self.num_classes - 1) - 0.5)
        return img, target
