"""``TrainRun``: the state of one training process (model, optimizer, schedule, scaler, EMA,
where training stands, the epoch's statistics), what a checkpoint stores of it and how it is
restored; and ``end_epoch``, the bookkeeping of a finished epoch (metrics line, best.pt, the
rolling checkpoint).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from .builder import autocast_dtype, build_model, build_optimizer, build_scheduler, peak_lr
from .checkpoint import CheckpointError, capture_rng_state
from .config import Config
from .config_data import config_to_dict
from .distributed import DistInfo, barrier, gather_to_main, run_on_main
from .logger import RunLogger
from .meter import EpochStats, TrainMeter
from .rundir import RunDir
from .step import TrainState

__all__ = ["TrainRun", "end_epoch"]

_logger = logging.getLogger("rednet")


class TrainRun:
    """State of one training process: what a checkpoint stores and restores; ``fit`` is its only user.

    Args:
        cfg: the resolved config.
        run_dir: the run directory (a path or a ``RunDir``).
        dist_info: this process's place in the process group.
        model: the unwrapped network (no DDP, not compiled).
        optimizer / scheduler / scaler / ema: their training state (scaler and ema may be None).
    """

    def __init__(self, cfg: Config, run_dir: str | os.PathLike, dist_info: DistInfo, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                 scaler: Optional[torch.amp.GradScaler], ema: Optional[ModelEmaV3]):
        self.cfg, self.run_dir, self.dist = cfg, RunDir(run_dir), dist_info
        self.cfg_dict = config_to_dict(cfg)
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = model, optimizer, scheduler, scaler, ema
        self.state = TrainState()
        self.rng_state: Optional[dict] = None  # set by restore; applied just before the first step
        self.meter: Optional[TrainMeter] = None  # the epoch in progress's statistics; checkpointed with it
        self.resumed_meter: Optional[dict] = None  # set by restore: this rank's totals of the resumed epoch
        self.classes: Optional[list[str]] = None  # the training set's class names, by label

    @classmethod
    def build(cls, cfg: Config, run_dir: RunDir, dist_info: DistInfo, steps: int, pretrained: bool) -> TrainRun:
        """A fresh run: the model (pretrained weights unless a checkpoint follows), optimizer, schedule, EMA."""
        model = build_model(cfg, pretrained=pretrained).to(dist_info.device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if dist_info.distributed and cfg.train.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer = build_optimizer(cfg, model, peak_lr(cfg, dist_info.world_size))
        scheduler = build_scheduler(cfg, optimizer, steps)
        # The precision that applies on this device (train.amp is for CUDA unless train.amp_on_cpu).
        fp16 = autocast_dtype(cfg, dist_info.device) == torch.float16
        scaler = torch.amp.GradScaler(dist_info.device.type) if fp16 else None
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay) if cfg.train.ema else None
        return cls(cfg, run_dir, dist_info, model, optimizer, scheduler, scaler, ema)

    def start_epoch_meter(self) -> TrainMeter:
        """The statistics of the epoch about to run: from the resumed checkpoint's totals, if it was mid-epoch."""
        self.meter = TrainMeter(self.dist.device, self.dist.world_size, self.resumed_meter)
        self.resumed_meter = None
        return self.meter

    def checkpoint_state(self, rng: Optional[list[dict]] = None,
                         meters: Optional[list[Optional[dict]]] = None) -> dict[str, Any]:
        """What a checkpoint stores; ``rng`` / ``meters``: every rank's RNG states and epoch totals, indexed by rank."""
        return {
            "config": self.cfg_dict,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.state.epoch,
            "iteration": self.state.iteration,
            "global_step": self.state.global_step,
            "best_top1": self.state.best_top1,
            "rng": rng,
            "epoch_meter": meters,
            "world_size": self.dist.world_size,
            "classes": self.classes,
        }

    def save(self) -> Path:
        """Rolling checkpoint: rank 0 writes it; every rank waits, so none exits before it is on disk,
        and every rank raises rank 0's error (a full disk), so none waits for ever.

        Each rank draws its own augmentation stream (seeded with seed + rank), so each rank's RNG
        states go into the checkpoint, gathered to rank 0, and each rank takes its own back; so do
        the running totals of an epoch in progress.
        """
        step = self.state.global_step
        per_rank = gather_to_main((capture_rng_state(), self.meter.state() if self.meter is not None else None))

        def write() -> None:
            rng, meters = [r for r, _ in per_rank], [m for _, m in per_rank]
            self.run_dir.save_checkpoint(self.checkpoint_state(rng, meters if any(meters) else None), step)
            self.run_dir.prune(self.cfg.train.keep_last)

        run_on_main(write)
        # A broadcast lets rank 0 go on while its data is still on the way; the run may end
        # here, and a process that exits with gloo still sending dies in abort().
        barrier()
        return self.run_dir.checkpoint(step)

    def save_best(self, metrics: dict[str, Any]) -> None:
        """``best.pt``: the weights and bookkeeping of this epoch, without what only resuming needs."""
        if self.dist.is_main:
            best = {k: v for k, v in self.checkpoint_state().items() if k not in ("optimizer", "rng", "epoch_meter")}
            self.run_dir.save_best({**best, "metrics": metrics})

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint; its RNG states wait in ``rng_state`` until everything is built."""
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.module.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # only reachable with --allow-config-change
            raise CheckpointError(f"the checkpoint's weights or optimizer state do not fit the model and optimizer "
                                  f"of the current config: {str(e)[:500]}") from e
        self._restore_schedule_position(int(state["scheduler"]["last_epoch"]))
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(state["epoch"], state["iteration"], state["global_step"], state.get("best_top1", -1.0))
        self.rng_state = self._own_rng_state(state.get("rng"))
        meters = state.get("epoch_meter")
        if meters and state.get("world_size", 1) == self.dist.world_size and self.dist.rank < len(meters):
            self.resumed_meter = meters[self.dist.rank]

    def _own_rng_state(self, stored: Any) -> Optional[dict]:
        """This rank's RNG states in a checkpoint's ``rng`` (a list by rank; one dict in rednet-train/1)."""
        if isinstance(stored, dict):
            if self.dist.distributed:
                _logger.warning("the checkpoint (an earlier version's) holds the RNG states of rank 0 only; every "
                                "rank takes them, so augmentation differs from an uninterrupted run")
            return stored
        if stored and self.dist.rank < len(stored):
            return stored[self.dist.rank]
        return None  # a rank the checkpoint's run did not have keeps its fresh seed (seed + rank)

    def _restore_schedule_position(self, steps_done: int) -> None:
        """Put the schedule built for the current config at ``steps_done``.

        Only the step count is state: the lr curve follows the current config, so a resume
        with more train.epochs stretches the cosine. ``LambdaLR.load_state_dict`` would copy
        the stored schedule's attributes, its old length included, into this one.
        """
        self.scheduler.last_epoch = steps_done
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * fn(steps_done)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def end_epoch(run: TrainRun, stats: EpochStats, val: Optional[dict[str, Any]], logger: RunLogger) -> Path:
    """Record the finished epoch (metrics line, TensorBoard, log), checkpoint it, and keep it as best if it is.

    ``stats`` (``train_one_epoch``'s) is completed with ``val``, the best top-1 and the time, then written.
    """
    cfg, epoch, state = run.cfg, run.state.epoch, run.state
    improved = False
    if val is not None:
        stats.val = val
        logger.scalars("val", {"top1": val["top1"], "top5": val["top5"], "loss": val["loss"],
                               "images_per_s": val["images_per_s"]}, state.global_step)
        improved = val["top1"] > state.best_top1
        state.best_top1 = max(state.best_top1, val["top1"])
    stats.best_top1 = state.best_top1
    _logger.info("epoch %d/%d: train loss %.4f, lr %.4g, %.0f img/s%s", epoch + 1, cfg.train.epochs,
                 stats.train_loss, stats.lr, stats.images_per_s,
                 f", val top-1 {val['top1']:.2f} top-5 {val['top5']:.2f} loss {val['loss']:.4f}" if val else "")
    state.epoch, state.iteration = epoch + 1, 0
    stats.time = time.time()
    record = stats.record()

    def record_epoch() -> None:
        logger.epoch(record)
        # best.pt before the rolling checkpoint: once a checkpoint says this epoch is the best, best.pt
        # holds it. A kill in between resumes from the previous checkpoint and redoes this epoch.
        if improved:
            run.save_best(record)

    run_on_main(record_epoch)  # rank 0 writes; an error there (a full disk) reaches every rank
    return run.save()
