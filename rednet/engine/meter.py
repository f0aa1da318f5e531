"""What a training epoch reports (``EpochStats``, one line of ``metrics.jsonl``) and the running
statistics it is made from (``TrainMeter``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch

from .distributed import all_reduce

__all__ = ["EpochStats", "TrainMeter"]


@dataclass
class EpochStats:
    """One finished epoch, as written to ``metrics.jsonl``: the field names are the record's keys.

    ``train_one_epoch`` fills in the training part; the trainer adds ``val``, ``best_top1`` and
    ``time`` when it ends the epoch.

    Args:
        epoch: the epoch's number, from 1.
        global_step: optimizer steps since the start, at the end of the epoch.
        train_loss: mean training loss over the epoch's steps and all ranks.
        lr: the learning rate after the epoch's last step.
        images_per_s: training images per second, all ranks together.
        data_wait_s: mean time per step spent waiting for the loader.
        epoch_time_s: the epoch's wall time (without validation).
        skipped_images: unreadable images, all ranks.
        val: ``evaluate``'s result, written as ``val_<key>``; None when the epoch was not validated.
        best_top1: the best validation top-1 so far (-1 before the first validation).
        time: when the epoch ended (``time.time()``).
    """

    epoch: int
    global_step: int
    train_loss: float
    lr: float
    images_per_s: float
    data_wait_s: float
    epoch_time_s: float
    skipped_images: int
    val: Optional[dict[str, Any]] = None
    best_top1: float = -1.0
    time: Optional[float] = None

    def record(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` line: every field in order, ``val`` spread into ``val_<key>``."""
        record: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "val":
                record.update({f"val_{k}": v for k, v in (value or {}).items()})
            else:
                record[f.name] = value
        return record


@dataclass
class _Window:
    """Sums since the last TensorBoard point (the loss sum stays on the device until it is taken)."""

    steps: int = 0
    images: int = 0
    wait: float = 0.0


class TrainMeter:
    """Running statistics of one training epoch on this rank: totals for ``EpochStats`` and a window
    of them for the TensorBoard scalars every ``train.log_every`` steps.

    Losses are summed on the device and read only by ``take_window``, ``reduce`` and ``state``, so
    counting a step does not make the host wait for the GPU.

    A checkpoint written in mid-epoch stores each rank's totals (``state``); the run that resumes
    from it starts from them (``resumed``), so that the epoch's record covers all its steps, not
    only those after the resume.

    Args:
        device: where training runs (CUDA adds the peak memory to the scalars).
        world_size: processes; images/s counts them all.
        resumed: ``state()`` of this rank's meter in the checkpoint the run resumed from, or None.
    """

    def __init__(self, device: torch.device, world_size: int, resumed: Optional[dict[str, float]] = None):
        self.device, self.world_size = device, world_size
        resumed = resumed or {}
        # the epoch's loss sum
        self._loss = torch.tensor(float(resumed.get("loss_sum", 0.0)), dtype=torch.float64, device=device)
        self._window_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.steps, self.skipped = int(resumed.get("steps", 0)), int(resumed.get("skipped", 0))
        self._reduced: Optional[tuple[float, float, float]] = None
        self.wait_s = float(resumed.get("wait_s", 0.0))
        self.images = int(resumed.get("images", 0))
        self._elapsed_before = float(resumed.get("elapsed_s", 0.0))  # the epoch's time before the resume
        self.start = self._window_start = time.perf_counter()
        self._window = _Window()

    def state(self) -> dict[str, float]:
        """This rank's totals so far, for a checkpoint (plain numbers; reads the loss)."""
        return {"loss_sum": self._loss.item(), "steps": self.steps, "skipped": self.skipped, "images": self.images,
                "wait_s": self.wait_s, "elapsed_s": self.elapsed()}

    def elapsed(self) -> float:
        """Seconds of training in this epoch, the runs before a resume included."""
        return self._elapsed_before + time.perf_counter() - self.start

    def update(self, loss: Optional[torch.Tensor], images: int, skipped: int, wait_s: float) -> None:
        """Count one step; ``loss`` None: a step of only unreadable images, which only counts those."""
        self.skipped += skipped
        if loss is None:
            return
        loss = torch.as_tensor(loss).detach().to(self._loss)
        self._loss += loss
        self._window_loss += loss
        self.steps += 1
        self.wait_s += wait_s
        self.images += images
        w = self._window
        w.steps, w.images, w.wait = w.steps + 1, w.images + images, w.wait + wait_s

    def take_window(self, lr: float) -> dict[str, float]:
        """The scalars since the last call (or the epoch's start), and a new window; reads the loss."""
        now, w = time.perf_counter(), self._window
        window_loss = self._window_loss.item()
        self._window_loss.zero_()
        scalars = {
            "loss": window_loss / w.steps,
            "lr": lr,
            "images_per_s": w.images * self.world_size / max(now - self._window_start, 1e-9),
            "data_wait_s": w.wait / w.steps,
        }
        if self.device.type == "cuda":
            scalars["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._window_start, self._window = now, _Window()
        return scalars

    def reduce(self) -> tuple[float, float, float]:
        """Sum the totals over all ranks (a collective: every rank calls it); returns (loss sum, steps, skipped)."""
        totals = torch.stack([self._loss, torch.tensor(float(self.steps), dtype=torch.float64, device=self.device),
                              torch.tensor(float(self.skipped), dtype=torch.float64, device=self.device)])
        all_reduce(totals, "sum")
        loss_sum, steps, skipped = totals.tolist()
        self._reduced = (loss_sum, steps, skipped)
        return self._reduced

    def epoch_stats(self, epoch: int, global_step: int, lr: float) -> EpochStats:
        """The epoch's statistics, from the totals ``reduce`` summed."""
        if self._reduced is None:  # this rank's own totals
            self._reduced = (self._loss.item(), float(self.steps), float(self.skipped))
        loss_sum, steps, skipped = self._reduced
        elapsed = self.elapsed()
        return EpochStats(
            epoch=epoch,
            global_step=global_step,
            train_loss=loss_sum / max(1.0, steps),
            lr=lr,
            images_per_s=self.images * self.world_size / max(elapsed, 1e-9),
            data_wait_s=self.wait_s / max(1, steps / self.world_size),
            epoch_time_s=elapsed,
            skipped_images=int(skipped),
        )
