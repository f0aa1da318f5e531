"""Datasets: ImageNet-layout folders, scikit-learn's bundled digits, synthetic tensors."""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import has_file_allowed_extension

from .decode import decode_rgb, load_rgb, read_bytes
from .gpudecode import EncodedImage
from .transforms import uses_pil

__all__ = ["DataError", "DigitsDataset", "SafeImageFolder", "SyntheticDataset", "load_rgb", "read_image"]

_logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset that cannot be used: missing split, empty, mismatched classes."""


def _walk_each_folder_once(top: str, seen: dict[tuple[int, int], str], split: Path):
    """``os.walk(top, followlinks=True)``, raising a DataError on a folder reached a second time.

    torchvision walks class folders following symlinks; a link back up the tree made it
    read the same images over and over (16 images became 697 samples, most under the wrong
    class), and a second link to one folder counts its images twice. ``seen`` maps each
    folder's (device, inode) to the path it was first reached by, across the whole split.
    """
    for root, dirs, files in os.walk(top, followlinks=True):
        st = os.stat(root)
        first = seen.setdefault((st.st_dev, st.st_ino), root)
        if first != root:
            raise DataError(
                f"dataset split {split}: folder {root} is {first} again (a symlink loop or a second link to it), "
                "so its images would be read more than once, some under the wrong class; remove the link"
            )
        yield root, dirs, files


class SafeImageFolder(ImageFolder):
    """``ImageFolder`` whose unreadable or corrupt images yield ``None`` instead of raising.

    The collate function (``rednet.data.collate_skip``) drops the ``None`` entries and
    counts them, so one bad file among a million costs one sample, not the run. A split
    that reaches a folder twice through symlinks is refused (``DataError``), 16-bit
    grey images are scaled to 8 bits rather than clipped, and decompression bombs
    (more than twice ``PIL.Image.MAX_IMAGE_PIXELS``) are refused before decoding.

    Images are decoded for the transform: a tensor transform (``TrainCrop``, ``EvalCrop``)
    gets a (3, H, W) uint8 tensor from ``rednet.data.decode.decode_rgb`` (torchvision.io where
    it gives PIL's pixels), any other transform, or none, a PIL RGB image.

    Args:
        root: a folder with one sub-folder per class.
        transform: applied to the decoded image.
        gpu_decode: JPEGs are returned undecoded, as ``EncodedImage`` with the transform's crop
            drawn (``data.decode: gpu``; the transform must be a ``TrainCrop`` or ``EvalCrop``).
    """

    def __init__(self, root: str | Path, transform: Optional[Callable] = None, gpu_decode: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"dataset split {root} does not exist (expected one folder per class inside)")
        if gpu_decode and uses_pil(transform):
            raise ValueError("gpu_decode needs a TrainCrop or EvalCrop transform")
        self.gpu_decode = gpu_decode
        try:
            super().__init__(str(root), transform=transform, loader=load_rgb)
        except FileNotFoundError as e:  # torchvision: no class folders / no image files
            raise DataError(f"dataset split {root} is empty: {e}") from e

    @staticmethod
    def make_dataset(directory: str, class_to_idx: dict[str, int], extensions: Optional[tuple[str, ...]] = None,
                     is_valid_file: Optional[Callable[[str], bool]] = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """torchvision's ``make_dataset`` (same samples, same order) over a walk that visits each folder once."""
        if is_valid_file is None:
            def is_valid_file(path: str) -> bool:
                return has_file_allowed_extension(path, extensions)
        st = os.stat(directory)
        seen = {(st.st_dev, st.st_ino): directory}  # a link back to the split itself is a loop too
        samples, found = [], set()
        for name in sorted(class_to_idx):
            top = os.path.join(directory, name)
            if not os.path.isdir(top):
                continue
            # torchvision sorts the walk's (root, dirs, files) tuples, i.e. by folder path.
            for folder, _, files in sorted(_walk_each_folder_once(top, seen, Path(directory))):
                for file in sorted(files):
                    path = os.path.join(folder, file)
                    if is_valid_file(path):
                        samples.append((path, class_to_idx[name]))
                        found.add(name)
        empty = sorted(set(class_to_idx) - found)
        if empty and not allow_empty:
            raise FileNotFoundError(f"no image files in the class folders {', '.join(empty[:5])}"
                                    + (f" and {len(empty) - 5} more" if len(empty) > 5 else ""))
        return samples

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            img = self._read(path)  # decodes fully, so bad files fail here
        except Exception as e:  # noqa: BLE001  PIL raises OSError, SyntaxError, ValueError... for bad files
            _logger.warning("skipping unreadable image %s: %s", path, e)
            return None
        if isinstance(img, EncodedImage):
            return img, target
        # Outside the try: a failing transform is a bug to report, not an image to skip.
        return (self.transform(img) if self.transform is not None else img), target

    def _read(self, path: str):
        """The image at ``path`` as the transform takes it, or as an ``EncodedImage`` for GPU decode."""
        if self.transform is None or uses_pil(self.transform):
            return self.loader(path)
        return read_image(path, self.transform if self.gpu_decode else None)

    def check_decodable(self, tries: int = 16) -> None:
        """Decode images spread over the split until one works; a DataError if none of ``tries`` does.

        Unreadable images are skipped one by one during training, so a split in which every
        file is broken (a failed copy, a wrong mount) would "train" at loss 0 or fail only at
        the end of an epoch. This costs one decode when the first image is fine.

        Raises:
            DataError: naming the split and one of the files with its error.
        """
        n = len(self.samples)
        picks = sorted(set(np.linspace(0, n - 1, num=min(tries, n)).round().astype(int).tolist())) if n else []
        errors = []
        for i in picks:
            path = self.samples[i][0]
            try:
                self.loader(path)
                return
            except Exception as e:  # noqa: BLE001  the same failures __getitem__ skips
                errors.append(f"{path}: {type(e).__name__}: {e}")
        if errors:
            what = f"its {n} images" if len(picks) == n else f"{len(picks)} images spread over its {n}"
            raise DataError(f"dataset split {self.root}: none of {what} can be decoded (e.g. {errors[0]}); "
                            "check that the files are complete images")


def read_image(source: str | torch.Tensor, crop=None):
    """A file (a path, or its bytes as a uint8 tensor) as a (3, H, W) uint8 tensor; with ``crop`` (a
    ``TrainCrop`` or ``EvalCrop``), a JPEG that torchvision.io decodes comes back undecoded, as an
    ``EncodedImage`` with the crop drawn."""
    data = read_bytes(source) if isinstance(source, str) else source
    header = Image.open(io.BytesIO(data.numpy()))  # reads the header only; refuses decompression bombs
    if crop is not None and header.format == "JPEG" and header.mode in ("RGB", "L"):
        if hasattr(crop, "draw"):
            box, flip = crop.draw(*header.size)
            return EncodedImage(data, box, flip)
        return EncodedImage(data)
    return decode_rgb(data, header)


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
    """Random uint8 images with a class-dependent offset, reproducible per index; for smoke tests and benchmarks.

    Like every dataset here it yields (C, H, W) uint8 tensors, normalised on the device.

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
        return (127.5 + 48.0 * img).round_().clamp_(0, 255).to(torch.uint8), target
