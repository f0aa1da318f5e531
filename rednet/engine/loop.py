"""The epoch loop around ``train_step`` (``train_one_epoch``) and one evaluation pass (``evaluate``);
the trainer and the tests call these."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data import DataError, DeviceInput
from .distributed import all_reduce
from .logger import Progress, RunLogger
from .meter import EpochStats, TrainMeter
from .step import StepContext, TrainState, autocast, train_step
from .stepguard import DeferredChecks

__all__ = ["EpochResult", "EvaluationStopped", "evaluate", "train_one_epoch"]

_logger = logging.getLogger("rednet")


class EvaluationStopped(Exception):
    """``evaluate`` stopped before the end of the data: a stop was requested on some rank."""


@dataclass
class EpochResult:
    """What ``train_one_epoch`` returns.

    Args:
        stats: the epoch's statistics, for ``metrics.jsonl`` once the trainer has ended the epoch.
        steps: optimizer steps done in this call (all ranks took the same).
        stopped: a stop was requested; the epoch ended early, at the same step on every rank.
    """

    stats: EpochStats
    steps: int
    stopped: bool


def _until_steps(batches: Iterator, state: TrainState, steps: int) -> Iterator:
    yield from batches
    # Only when max_iters/epoch arithmetic disagrees with the loader.
    raise RuntimeError(f"the loader ran out after {state.iteration} of {steps} steps")


def train_one_epoch(
    ctx: StepContext,
    loader: DataLoader,
    state: TrainState,
    steps: int,
    logger: Optional[RunLogger] = None,
    desc: str = "",
    main_process: bool = True,
    meter: Optional[TrainMeter] = None,
) -> EpochResult:
    """Train from ``state.iteration`` to ``steps`` optimizer steps of epoch ``state.epoch``.

    The caller positions ``loader.sampler`` (``set_epoch(epoch, start=...)``) so the loader
    yields the rest of the epoch. Stops early, with the state consistent, when
    ``ctx.stop_requested()`` is true on any rank (the caller then checkpoints and exits).

    Args:
        ctx: model, optimizer and step options.
        loader: yields ``(images, targets, skipped)``.
        state: updated in place after every optimizer step.
        steps: optimizer steps in a full epoch.
        logger: TensorBoard / JSON sink (rank 0).
        desc: progress prefix.
        main_process: rank 0 shows progress.
        meter: the epoch's running statistics; a fresh one when None. The trainer passes its own,
            holding the totals of the steps before a resume, and checkpoints it with the run.

    Raises:
        NonFiniteLossError: the loss was NaN/inf; its optimizer step was not taken, so no bad weights are saved.
        DataError: every image of the epoch was unreadable, or, with several processes, of one step.
    """
    ctx.model.train()
    progress = Progress(steps, state.iteration, desc, main_process, ctx.log_every)
    batches = _until_steps(ctx.input.batches(loader, ctx.device, ctx.channels_last), state, steps)
    meter = meter if meter is not None else TrainMeter(ctx.device, ctx.world_size)
    checks = DeferredChecks(ctx.model, ctx.optimizer, ctx.device) if ctx.deferred else None
    stopped, shown, taken = False, {}, 0
    while state.iteration < steps and not stopped:
        step = train_step(ctx, batches, state, checks)
        meter.update(step.loss, step.images, step.skipped, step.wait_s)
        stopped = step.stop
        if step.loss is None:
            continue
        taken += 1
        logged = state.global_step % ctx.log_every == 0
        due = logged or state.iteration >= steps or (ctx.ckpt_every and state.global_step % ctx.ckpt_every == 0)
        if checks is not None and due:
            stopped = checks.read(ctx.scheduler, state)
        if logged:  # the loss is read here, not at every step
            window = meter.take_window(step.lr)
            shown = {"loss": window["loss"], "lr": step.lr}
            if logger is not None:
                logger.scalars("train", window, state.global_step)
        progress.update(shown)
        if not stopped:
            ctx.on_step(state)
    if checks is not None:  # steps since the last read (the epoch ended on unreadable batches)
        stopped = checks.read(ctx.scheduler, state) or stopped
    progress.close()
    _, done, skipped = meter.reduce()
    if not stopped and done == 0 and skipped > 0:
        raise DataError(f"every image of epoch {state.epoch + 1} was unreadable ({int(skipped)} skipped): "
                        "check the training split")
    stats = meter.epoch_stats(state.epoch + 1, state.global_step, ctx.optimizer.param_groups[0]["lr"])
    return EpochResult(stats, taken, stopped)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    main_process: bool = True,
    desc: str = "eval",
    device_input: Optional[DeviceInput] = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> dict[str, float]:
    """Single-pass top-1/top-5/loss over the loader's samples, summed exactly across ranks.

    Use an unwrapped model (not DDP): ranks may hold one batch more or less (see
    ``ShardSampler``), so no collective may run inside the loop.

    A stop request is checked before every batch; this rank then leaves the loop. With no
    collective in the loop, the ranks agree in the one all-reduce at its end, where each
    brings a stop flag with its sums: every rank raises ``EvaluationStopped`` if any rank was
    asked to stop. A signal that reaches every rank (SLURM, ``scancel``, ``kill -- -PGID``,
    torchrun forwarding it) stops them all within one batch; a rank that received none
    finishes its shard first.

    Args:
        model: the network.
        loader: yields ``(images, targets, skipped)`` over this rank's shard.
        device: where batches go.
        amp_dtype: autocast dtype or None.
        channels_last: NHWC inputs.
        main_process: show progress on rank 0.
        desc: progress prefix.
        device_input: turns loader batches into model input (normalisation); None: ImageNet's mean and std.
        stop_requested: returns True once the evaluation should stop (a signal arrived).

    Returns:
        ``top1``, ``top5`` (percent), ``loss`` (plain cross-entropy), ``count`` (images scored over all
        ranks), ``skipped`` (unreadable), ``images_per_s``.

    Raises:
        EvaluationStopped: a stop was requested on some rank (on every rank alike).
        DataError: no image could be scored.
    """
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss, top-1, top-5, count, skipped, stopped
    progress = Progress(len(loader), 0, desc, main_process, max(1, len(loader) // 4))
    t0 = time.perf_counter()
    for images, targets, skipped in (device_input or DeviceInput()).batches(loader, device, channels_last):
        if stop_requested():
            sums[5] = 1
            break
        sums[4] += skipped
        if images.numel() == 0:
            progress.update({})
            continue
        with autocast(device, amp_dtype):
            logits = model(images)
        _add_scores(sums, logits.float(), targets)
        progress.update({})
    progress.close()
    all_reduce(sums, "sum")
    elapsed = time.perf_counter() - t0
    loss, c1, c5, n, skipped, stopped = sums.tolist()
    if stopped:
        raise EvaluationStopped(f"{desc}: stopped after {int(n)} images")
    if n == 0:
        raise DataError("evaluation scored no images (empty or entirely unreadable validation set)")
    if not math.isfinite(loss):
        _logger.warning("evaluation loss is not finite")
    return {
        "top1": 100.0 * c1 / n,
        "top5": 100.0 * c5 / n,
        "loss": loss / n,
        "count": int(n),
        "skipped": int(skipped),
        "images_per_s": n / max(elapsed, 1e-9),
    }


def _add_scores(sums: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Add one batch's summed loss, top-1 and top-5 hits and image count to ``sums`` (``evaluate``'s)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (B, k)
    hit = top.eq(targets[:, None])
    sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
    sums[1] += hit[:, 0].sum()
    sums[2] += hit.any(dim=1).sum()
    sums[3] += targets.numel()
