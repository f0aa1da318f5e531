"""Loader batches onto the device: the one place where uint8 pixels become the model's float input.

Batches leave the loader workers as uint8 (a quarter of float32's bytes to collate, send
between processes and copy to the GPU). ``DeviceInput`` copies each batch to the device,
converts it to float, normalises it with the data config's mean and std, puts it in the
model's memory format and, for training, applies random erasing. On CUDA the next batch is
copied from pinned memory on a side stream while the current one computes (as timm's
``PrefetchLoader`` does); on a CPU the same code runs in the main process.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator, Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing

from .decode import read_bytes
from .gpudecode import EncodedBatch, GpuDecoder, check_gpu_decode, warn_fallback

__all__ = ["DeviceInput", "build_device_input"]

_logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, int]  # images, targets, skipped images


class DeviceInput:
    """How loader batches become model input on a device.

    uint8 batches are normalised, ``(x - 255 mean) / (255 std)``, equal to torchvision's
    ``ToTensor`` + ``Normalize`` of the same pixels within float rounding (tested within 1e-6);
    float batches (a dataset of one's own that normalises itself) are only moved.

    Args:
        mean / std: per channel, on a 0-1 scale (timm's data-config convention).
        random_erasing: timm's ``RandomErasing`` for normalised batches (training), or None.
        decoder: decodes ``EncodedBatch`` batches on the device (``data.decode: gpu``), or None.
    """

    def __init__(self, mean: tuple = IMAGENET_DEFAULT_MEAN, std: tuple = IMAGENET_DEFAULT_STD,
                 random_erasing: Optional[RandomErasing] = None, decoder: Optional[GpuDecoder] = None):
        self.mean, self.std = tuple(mean), tuple(std)
        self.random_erasing, self.decoder = random_erasing, decoder
        self._stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _scaled_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._stats:
            mean = torch.tensor(self.mean, dtype=torch.float32).mul_(255).view(1, -1, 1, 1)  # (1, C, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).mul_(255).view(1, -1, 1, 1)
            self._stats[key] = (mean.to(device), std.to(device))
        return self._stats[key]

    def prepare(self, images, targets: torch.Tensor, device: torch.device,
                channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One batch as model input on ``device``; also returns how many images decoding there dropped."""
        dropped = 0
        if isinstance(images, EncodedBatch):
            if self.decoder is None:
                raise RuntimeError("a batch of undecoded images, but this DeviceInput has no decoder")
            images, keep = self.decoder(images, device)
            if not bool(keep.all()):  # keep is a CPU tensor: no device synchronisation
                targets, dropped = targets[keep], int((~keep).sum())
        targets = targets.to(device, non_blocking=True)
        if images.numel() == 0:
            return images, targets, dropped
        fmt = torch.channels_last if channels_last and images.dim() == 4 else torch.contiguous_format
        images = images.to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            mean, std = self._scaled_stats(device)
            images = images.to(torch.float32, memory_format=fmt).sub_(mean).div_(std)
        else:
            images = images.contiguous(memory_format=fmt)
        if self.random_erasing is not None:
            images = self.random_erasing(images)
        return images, targets, dropped

    def batches(self, loader: Iterable, device: torch.device, channels_last: bool = False,
                lookahead: Optional[bool] = None) -> Iterator[Batch]:
        """``loader``'s ``(images, targets, skipped)`` batches, prepared on ``device``.

        Args:
            loader: yields ``(images, targets, skipped)`` (``collate_skip``).
            device: where the model runs.
            channels_last: NHWC input.
            lookahead: prepare batch n + 1 before batch n is used, so that its copy overlaps
                batch n's compute. Default: on CUDA with loader workers. Never with ``workers: 0``
                by default: fetching ahead there draws batch n + 1's augmentation before step n's
                checkpoint, so a resume would not be exact.
        """
        if lookahead is None:
            lookahead = device.type == "cuda" and getattr(loader, "num_workers", 0) > 0
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        source = iter(loader)

        def load() -> Optional[Batch]:
            try:
                images, targets, skipped = next(source)
            except StopIteration:
                return None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                images, targets, dropped = self.prepare(images, targets, device, channels_last)
            return images, targets, skipped + dropped

        def ready(batch: Batch) -> Batch:
            if stream is not None:  # the compute stream waits for the copy, and owns the tensors from here
                current = torch.cuda.current_stream(device)
                current.wait_stream(stream)
                for t in batch[:2]:
                    if t.is_cuda:
                        t.record_stream(current)
            return batch

        upcoming = load() if lookahead else None
        while True:
            batch = upcoming if lookahead else load()
            if batch is None:
                return
            batch = ready(batch)
            if lookahead:
                upcoming = load()
            yield batch


_fallback_warned = False


def build_device_input(data, device: torch.device, dataset=None, train: bool = True,
                       mean: Optional[tuple] = None, std: Optional[tuple] = None) -> DeviceInput:
    """The ``DeviceInput`` of a loader over ``dataset`` for ``data`` (a ``DataConfig``).

    With ``data.decode: gpu`` and a dataset that returns undecoded JPEGs, GPU decode is checked
    here, at first contact: on a device without CUDA, or when device and CPU decode disagree
    (``check_gpu_decode``), the dataset goes back to CPU decode, with one warning per process.
    Call it before the loader's workers start (they copy the dataset).

    Args:
        data: the data section of the config.
        device: where the model runs.
        dataset: the loader's dataset (for GPU decode), or None.
        train: a training loader (random erasing applies).
        mean / std: override ``data``'s (an eval transform from a pretrained config).
    """
    global _fallback_warned
    erasing = None
    if train and data.reprob > 0:
        erasing = RandomErasing(data.reprob, mode="const", max_count=1, device=str(device))
    decoder = None
    if getattr(dataset, "gpu_decode", False):
        why = "no CUDA device" if device.type != "cuda" else check_gpu_decode(device, _jpeg_samples(dataset))
        if why is None:
            decoder = GpuDecoder(dataset.transform)
        else:
            dataset.gpu_decode = False
            if not _fallback_warned:
                _fallback_warned = True
                warn_fallback(why)
    return DeviceInput(mean or data.mean, std or data.std, erasing, decoder)


def _jpeg_samples(dataset, n: int = 4) -> list[torch.Tensor]:
    """The bytes of up to ``n`` of the dataset's JPEG files, for the GPU decode check."""
    if hasattr(dataset, "jpeg_samples"):
        return dataset.jpeg_samples(n)
    found = []
    for path, _ in getattr(dataset, "samples", [])[: 16 * n]:
        try:
            data = read_bytes(path)
        except OSError:
            continue
        if data.numel() > 3 and data[:3].tolist() == [0xFF, 0xD8, 0xFF]:  # the JPEG signature
            found.append(data)
            if len(found) == n:
                break
    return found
