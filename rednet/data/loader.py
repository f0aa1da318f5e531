"""Samplers, collate and loaders: resumable training order, exact evaluation shards."""
from __future__ import annotations

import os
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torch.utils.data._utils.collate import default_collate
from torch.utils.data.distributed import DistributedSampler

from .datasets import DataError
from .gpudecode import EncodedBatch, EncodedImage

__all__ = ["ResumableSampler", "ShardSampler", "build_eval_loader", "build_train_loader", "collate_skip",
           "default_workers", "epoch_order"]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way, for mid-epoch resume.

    The epoch's order depends only on (seed, epoch), so after ``set_epoch(e, start=n)``
    the sampler yields exactly the indices an uninterrupted epoch would have yielded
    after its first ``n``.

    Args:
        dataset: the training set.
        num_replicas / rank: the process group's size and this process's rank.
        seed: shuffling seed, identical on every rank.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start`` samples (of this rank)."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` gets indices ``r, r + w, ...``: no padding, so no sample counts twice.

    Args:
        length: dataset length.
        num_replicas / rank: the process group's size and this process's rank.
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.indices = range(rank, length, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate_skip(batch: list) -> tuple[torch.Tensor | EncodedBatch, torch.Tensor, int]:
    """Collate, dropping samples the dataset returned as ``None`` (unreadable images).

    Images are stacked as they come (uint8 from every dataset here). A batch holding undecoded
    JPEGs (``data.decode: gpu``) becomes an ``EncodedBatch`` for the device to decode.

    Returns:
        ``(images, targets, skipped)``; images is empty when the whole batch was unreadable.
    """
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), skipped
    if any(isinstance(img, EncodedImage) for img, _ in kept):
        return EncodedBatch([img for img, _ in kept]), torch.tensor([t for _, t in kept]), skipped
    images, targets = default_collate(kept)
    return images, targets, skipped


def default_workers(most: Optional[int] = None) -> int:
    """Loader workers per process when the config names none: this process's share of the CPUs (at most ``most``).

    The CPUs are those this process may run on (``sched_getaffinity``: a container's or taskset's
    limit, not the host's count), shared by torchrun's processes on this node. More workers than
    CPUs only compete with each other, and torch's ``DataLoader`` warns about it on every run.
    There is no fixed cap: the input pipeline needs about as many cores per GPU as the node has
    to spare (README, "Input pipeline").
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, per_process if most is None else min(most, per_process))


def _loader_kwargs(workers: Optional[int], pin_memory: bool, persistent: bool, seed: int) -> dict:
    workers = default_workers() if workers is None else workers
    kwargs = dict(
        num_workers=workers,
        collate_fn=collate_skip,
        # Pinned memory helps only host->GPU copies; persistent workers only when there are workers.
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent and workers > 0,
        # A private generator: drawing the workers' base seed must not advance the global
        # torch RNG, or a mid-epoch resume would see a shifted augmentation stream.
        generator=torch.Generator().manual_seed(seed),
    )
    if workers > 0:
        kwargs["prefetch_factor"] = 4
    return kwargs


def build_train_loader(dataset: Dataset, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                       workers: Optional[int] = 0, pin_memory: bool = True,
                       persistent_workers: bool = True) -> DataLoader:
    """Shuffled, sharded training loader with whole batches (``drop_last``); ``loader.sampler`` is resumable.

    Args:
        dataset: the training set.
        batch_size: per-process batch.
        world_size / rank: the process group.
        seed: shuffling seed (same on all ranks).
        workers: loader processes; None: ``default_workers()``.
        pin_memory / persistent_workers: ``DataLoader`` options.

    Raises:
        DataError: the dataset is smaller than one batch per process.
    """
    if isinstance(dataset, IterableDataset):  # tar shards: the dataset orders itself (rednet.data.shards)
        dataset.configure(batch_size, world_size, rank, seed)
        if dataset.num_samples < batch_size:
            raise DataError(f"the training shards hold {sum(dataset.lengths)} images, fewer than one batch of "
                            f"{batch_size} per process over {world_size}; lower data.batch_size")
        return DataLoader(dataset, batch_size=batch_size, drop_last=True,
                          **_loader_kwargs(workers, pin_memory, persistent_workers, seed + rank))
    sampler = ResumableSampler(dataset, world_size, rank, seed=seed)
    if sampler.num_samples < batch_size:
        # drop_last: the loader would yield no batch at all.
        per_rank = f" ({sampler.num_samples} per process over {world_size})" if world_size > 1 else ""
        raise DataError(f"the training set has {len(dataset)} images{per_rank}, fewer than one batch of {batch_size}; "
                        "lower data.batch_size")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      **_loader_kwargs(workers, pin_memory, persistent_workers, seed + rank))


def build_eval_loader(dataset: Dataset, batch_size: int, world_size: int = 1, rank: int = 0,
                      workers: Optional[int] = 0, pin_memory: bool = True,
                      persistent_workers: bool = False) -> DataLoader:
    """Sequential loader over this rank's shard (no padding, no dropped tail).

    Args:
        dataset: the evaluation set.
        batch_size: per-process batch.
        world_size / rank: the process group.
        workers: loader processes; None: ``default_workers()``.
        pin_memory / persistent_workers: ``DataLoader`` options.
    """
    if isinstance(dataset, IterableDataset):  # tar shards: each sample once over ranks and workers
        dataset.configure(batch_size, world_size, rank)
        return DataLoader(dataset, batch_size=batch_size, drop_last=False,
                          **_loader_kwargs(workers, pin_memory, persistent_workers, rank))
    sampler = ShardSampler(len(dataset), world_size, rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False,
                      **_loader_kwargs(workers, pin_memory, persistent_workers, rank))


def epoch_order(loader: DataLoader):
    """What positions a training loader's epoch: its ``ResumableSampler``, or a shard dataset itself.

    Both have ``set_epoch(epoch, start)`` and ``num_samples`` (this process's samples per epoch).
    """
    return loader.dataset if isinstance(loader.dataset, IterableDataset) else loader.sampler
