"""Tar shards (webdataset layout) for many nodes: writing them from an ImageFolder, and reading them.

A split is a set of tar files ``<split>-00000.tar`` ... of about ``shard_bytes`` each, holding
``<key>.<ext>`` (the image file's bytes, unchanged) and ``<key>.cls`` (its class index) per
sample, in a random order fixed by a seed, plus ``_info.json`` beside them: timm's
``splits`` entries (``name``, ``num_samples``, ``filenames``, ``shard_lengths``) and the
``classes``. Reading goes through webdataset's tar iterator.

Training order (``TarShardDataset`` with ``train=True``): every epoch the shards are shuffled
(seed + epoch; samples keep their order inside a shard) and dealt to the processes' loader
workers; each worker cycles over its shards to fill its share of the epoch's whole batches,
so every process takes the same number of steps, and with shards of unequal length a few
samples repeat in an epoch while others wait for the next. A resume continues the epoch at
the batch it stopped before: the same samples in the same order, for the same number of
processes and loader workers (the augmentation is exact only with ``data.workers: 0``, as for
ImageFolders). Evaluation reads every sample exactly once over all processes and workers.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .datasets import DataError, SafeImageFolder, read_image
from .decode import to_rgb
from .gpudecode import EncodedImage
from .transforms import uses_pil

__all__ = ["INFO_FILE", "TarShardDataset", "ShardPlan", "plan_shards", "write_shard"]

_logger = logging.getLogger(__name__)

INFO_FILE = "_info.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm")
_TAR_BLOCK = 512


@dataclass
class ShardPlan:
    """Which sample goes into which shard: a deterministic function of the source and the options.

    Args:
        split: the split's name (shard file prefix and ``_info.json`` key).
        classes: class names, by index.
        shards: per shard, its samples as (relative path, class index, size in bytes).
        digest: sha256 of everything above, to recognise an interrupted run of the same plan.
    """

    split: str
    classes: list[str]
    shards: list[list[tuple[str, int, int]]]
    digest: str

    def filename(self, index: int) -> str:
        return f"{self.split}-{index:05d}.tar"


def plan_shards(source: Path, split: str, shard_bytes: int, seed: int = 0) -> ShardPlan:
    """Deal the ImageFolder ``source``'s images, shuffled with ``seed``, into shards of about ``shard_bytes``.

    Raises:
        DataError: ``source`` is not an ImageFolder split with images.
    """
    folder = SafeImageFolder(source)  # its checks: class folders, images, no folder reached twice
    samples = [(os.path.relpath(path, source), target, os.path.getsize(path)) for path, target in folder.samples]
    random.Random(seed).shuffle(samples)
    shards: list[list[tuple[str, int, int]]] = [[]]
    size = 0
    for sample in samples:
        member = _member_bytes(sample[2]) + _member_bytes(len(str(sample[1])))
        if shards[-1] and size + member > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(sample)
        size += member
    digest = hashlib.sha256(json.dumps([split, folder.classes, shards, seed]).encode()).hexdigest()
    return ShardPlan(split, folder.classes, shards, digest)


def _member_bytes(size: int) -> int:
    return _TAR_BLOCK + math.ceil(size / _TAR_BLOCK) * _TAR_BLOCK


def _key(position: int) -> str:
    return f"{position:09d}"


def write_shard(plan: ShardPlan, index: int, source: Path, out: Path) -> Path:
    """Write shard ``index`` of ``plan`` to ``out`` atomically (a ``.partial`` file renamed when complete).

    The tar is byte-for-byte a function of the plan and the files: fixed member order, names,
    times and owners.
    """
    first = sum(len(s) for s in plan.shards[:index])
    final = out / plan.filename(index)
    partial = final.with_name(final.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
        for offset, (rel, target, _) in enumerate(plan.shards[index]):
            key = _key(first + offset)
            ext = Path(rel).suffix.lstrip(".").lower() or "img"
            data = (source / rel).read_bytes()
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(target).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid = len(payload), 0, 0o644, 0, 0
                tar.addfile(info, io.BytesIO(payload))
    os.replace(partial, final)
    return final


def read_info(root: Path) -> dict:
    """``root``'s ``_info.json``, or a DataError saying what is missing."""
    path = Path(root) / INFO_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: data.dataset wds reads shards written by tools/make_shards.py "
                        "(the shards and their _info.json)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


class TarShardDataset(IterableDataset):
    """The samples of one split of tar shards (see the module docstring for the order).

    Yields ``(image, target)`` as ``SafeImageFolder`` does (``None`` for an unreadable image,
    which ``collate_skip`` counts). ``build_train_loader`` / ``build_eval_loader`` call
    ``configure`` with the batch size and the process group.

    Args:
        root: the folder with the shards and ``_info.json``.
        split: a split name in ``_info.json``.
        transform: a ``TrainCrop`` / ``EvalCrop`` (uint8 tensors) or a PIL transform.
        train: training order (shuffled shards, whole batches) or evaluation order (each sample once).
        gpu_decode: JPEGs are returned undecoded (``data.decode: gpu``).
    """

    def __init__(self, root: str | Path, split: str, transform: Optional[Callable] = None, train: bool = True,
                 gpu_decode: bool = False):
        self.root, self.transform, self.train, self.gpu_decode = Path(root), transform, train, gpu_decode
        info = read_info(self.root)
        entry = info.get("splits", {}).get(split)
        if entry is None:
            raise DataError(f"split {split!r} is not in {self.root / INFO_FILE} (it has: "
                            f"{', '.join(info.get('splits', {})) or 'none'})")
        self.classes = list(info.get("classes") or [])
        self.filenames, self.lengths = list(entry["filenames"]), [int(n) for n in entry["shard_lengths"]]
        missing = [f for f in self.filenames if not (self.root / f).is_file()]
        if missing:
            raise DataError(f"shard {self.root / missing[0]} is missing ({len(missing)} of {len(self.filenames)} "
                            "shards of the split); finish tools/make_shards.py or fix the mount")
        self.batch_size, self.world_size, self.rank, self.seed = 1, 1, 0, 0
        # Shared with the loader workers (which copy the dataset once, when they start).
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        self._start = multiprocessing.Value("q", 0, lock=False)

    def configure(self, batch_size: int = 1, world_size: int = 1, rank: int = 0, seed: int = 0) -> None:
        """The loader's batch size, the process group and the shuffling seed (same on every rank)."""
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed

    def __len__(self) -> int:
        return self.num_samples if self.train else sum(self.lengths)

    @property
    def num_samples(self) -> int:
        """This process's samples per training epoch: whole batches, the same on every rank."""
        return sum(self.lengths) // self.world_size // self.batch_size * self.batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's shard order and skip its first ``start`` samples (of this rank; whole batches)."""
        self._epoch.value, self._start.value = epoch, start

    def _streams(self, count: int) -> list[list[int]]:
        """The shard indices of each of ``count`` streams (all processes' workers), this epoch."""
        order = list(range(len(self.filenames)))
        if self.train:
            random.Random(self.seed * 1_000_003 + self._epoch.value).shuffle(order)
        streams = [order[g::count] for g in range(count)]
        if self.train:  # more streams than shards: some share (training cycles anyway)
            streams = [s or [order[g % len(order)]] for g, s in enumerate(streams)]
        return streams

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if not self.train:
            streams = self._streams(self.world_size * workers)
            for sample in self._samples(streams[self.rank * workers + worker], cycle=False):
                yield self._decode(sample)
            return
        # Batch j of this rank's epoch comes from logical worker j % workers. On a resume at batch
        # k0, physical worker p plays logical worker (p + k0) % workers, so that the loader's
        # round robin, which starts at worker 0, yields batches k0, k0 + 1, ... in order.
        batches, k0 = self.num_samples // self.batch_size, self._start.value // self.batch_size
        logical = (worker + k0) % workers
        mine, done = len(range(logical, batches, workers)), len(range(logical, k0, workers))
        streams = self._streams(self.world_size * workers)
        samples = self._samples(streams[self.rank * workers + logical], cycle=True)
        for _ in range(done * self.batch_size):
            next(samples)
        for _ in range((mine - done) * self.batch_size):
            yield self._decode(next(samples))

    def _samples(self, shards: list[int], cycle: bool) -> Iterator[dict]:
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        while True:
            for index in shards:
                path = self.root / self.filenames[index]
                with open(path, "rb") as f:
                    yield from group_by_keys(dict(member, __url__=str(path)) for member in tar_file_iterator(f))
            if not cycle:
                return

    def _decode(self, sample: dict):
        try:
            target = int(sample["cls"])
            ext = next(e for e in IMAGE_EXTENSIONS if e in sample)
            data = torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8)
            if self.transform is None or uses_pil(self.transform):
                img = to_rgb(Image.open(io.BytesIO(sample[ext])))
            else:
                img = read_image(data, self.transform if self.gpu_decode else None)
        except Exception as e:  # noqa: BLE001  a bad sample costs one image, as in SafeImageFolder
            _logger.warning("skipping unreadable sample %s of %s: %s", sample.get("__key__"),
                            sample.get("__url__", "a shard"), e)
            return None
        if isinstance(img, EncodedImage) or self.transform is None:
            return img, target
        return self.transform(img), target

    def jpeg_samples(self, n: int = 4) -> list[torch.Tensor]:
        """The bytes of up to ``n`` JPEGs of the first shard (the GPU decode check)."""
        found = []
        for sample in self._samples([0], cycle=False):
            data = sample.get("jpg", sample.get("jpeg"))
            if data is not None:
                found.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                if len(found) == n:
                    break
        return found

    def check_decodable(self, tries: int = 16) -> None:
        """Decode samples of the first shard until one works; a DataError if none of ``tries`` does."""
        errors = []
        for i, sample in enumerate(self._samples([0], cycle=False)):
            if i == tries:
                break
            try:
                ext = next(e for e in IMAGE_EXTENSIONS if e in sample)
                to_rgb(Image.open(io.BytesIO(sample[ext])))
                return
            except Exception as e:  # noqa: BLE001  the failures _decode skips
                errors.append(f"{sample.get('__key__')}: {type(e).__name__}: {e}")
        raise DataError(f"shard {self.root / self.filenames[0]}: none of its first {len(errors)} samples can be "
                        f"decoded (e.g. {errors[0] if errors else 'no samples'})")
