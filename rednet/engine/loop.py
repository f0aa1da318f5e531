"""The training step, the epoch loop around it, and one evaluation pass; the trainer and the tests call these."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data import DataError
from .distributed import all_reduce
from .logger import Progress, RunLogger
from .meter import EpochStats, TrainMeter

__all__ = [
    "EpochResult",
    "EvaluationStopped",
    "NonFiniteLossError",
    "StepContext",
    "StepResult",
    "TrainState",
    "evaluate",
    "train_one_epoch",
    "train_step",
]

_logger = logging.getLogger("rednet")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before the optimizer step."""


class EvaluationStopped(Exception):
    """``evaluate`` stopped before the end of the data: a stop was requested on some rank."""


@dataclass
class TrainState:
    """Where training stands; stored in every checkpoint.

    Args:
        epoch: the epoch in progress (0-based).
        iteration: optimizer steps done in that epoch.
        global_step: optimizer steps since the start.
        best_top1: best validation top-1 so far (-1 before the first validation).
    """

    epoch: int = 0
    iteration: int = 0
    global_step: int = 0
    best_top1: float = -1.0


@dataclass
class StepContext:
    """What one optimizer step needs besides the batch.

    Args:
        model: the (possibly DDP-wrapped / compiled) model called in the forward pass.
        optimizer / scheduler: stepped once per optimizer step (the scheduler per iteration).
        loss_fn: ``loss_fn(logits, targets)``.
        device: where batches go.
        accum_steps: micro-batches per optimizer step.
        amp_dtype: autocast dtype, or None for fp32.
        scaler: a ``GradScaler`` for fp16, else None.
        clip_grad: max global gradient norm, or None.
        channels_last: NHWC inputs.
        ema: a timm ``ModelEmaV3`` updated after each step, or None.
        ema_source: the unwrapped model the EMA follows.
        mixup: a timm ``Mixup`` applied to each batch, or None.
        no_sync: ``model.no_sync`` for DDP (skip the all-reduce on non-final micro-batches), or None.
        stop_requested: returns True once a signal asked training to stop (the trainer's ``_Signals``).
        on_step: called after each optimizer step with the state; may write a checkpoint.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Callable
    device: torch.device
    accum_steps: int = 1
    amp_dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    clip_grad: Optional[float] = None
    channels_last: bool = False
    ema: Optional[nn.Module] = None
    ema_source: Optional[nn.Module] = None
    mixup: Optional[Callable] = None
    no_sync: Optional[Callable] = None
    stop_requested: Callable[[], bool] = lambda: False
    on_step: Callable[["TrainState"], None] = lambda state: None
    log_every: int = 50
    world_size: int = 1


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> torch.autocast:
    """Autocast to ``dtype``; disabled (fp32) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _to_device(images: torch.Tensor, targets: torch.Tensor, device: torch.device,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's batch on ``device``, the images in the memory format the model runs in."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
    return images, targets.to(device, non_blocking=True)


@dataclass
class StepResult:
    """What one ``train_step`` did on this rank.

    Args:
        loss: the step's loss; None when every image of the step was unreadable (no optimizer step).
        images: images trained on.
        skipped: unreadable images.
        wait_s: seconds spent waiting for the loader.
        lr: the learning rate the optimizer step used.
        stop: a stop was requested (on any rank, agreed by all): the epoch ends after this step.
    """

    loss: Optional[float]
    images: int
    skipped: int
    wait_s: float
    lr: float = 0.0
    stop: bool = False


def train_step(ctx: StepContext, batches: Iterator, state: TrainState) -> StepResult:
    """One optimizer step over ``ctx.accum_steps`` micro-batches drawn from ``batches``; advances ``state``.

    A step whose images were all unreadable moves the position in the epoch
    (``state.iteration``) but is not an optimizer step.

    Args:
        ctx: model, optimizer and step options.
        batches: yields ``(images, targets, skipped)``.
        state: where training stands; updated in place.

    Raises:
        NonFiniteLossError: the loss was NaN/inf on some rank; raised before the optimizer step.
        DataError: with several processes, every image of a micro-batch was unreadable.
    """
    loss_sum, images, skipped, wait = _forward_backward(ctx, batches, state)
    if images == 0:
        # Every image of this step was unreadable (one process; several raise above). An
        # optimizer step would still apply momentum and weight decay and advance the schedule
        # on no data, so it is not a step; the position in the epoch still moves on.
        state.iteration += 1
        return StepResult(None, 0, skipped, wait, stop=ctx.stop_requested())
    stop = _agree_on_step(ctx, loss_sum, state)
    if ctx.clip_grad is not None:
        if ctx.scaler is not None:
            ctx.scaler.unscale_(ctx.optimizer)
        params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, ctx.clip_grad)
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    lr = ctx.optimizer.param_groups[0]["lr"]
    ctx.scheduler.step()
    if ctx.ema is not None:
        ctx.ema.update(ctx.ema_source, step=state.global_step)
    state.iteration += 1
    state.global_step += 1
    return StepResult(loss_sum.item(), images, skipped, wait, lr, stop)


def _forward_backward(ctx: StepContext, batches: Iterator,
                      state: TrainState) -> tuple[torch.Tensor, int, int, float]:
    """Forward and backward over one step's micro-batches; returns (loss, images, skipped, loader wait)."""
    loss_sum = torch.zeros((), device=ctx.device)
    n_images, n_skipped, wait = 0, 0, 0.0
    for micro in range(ctx.accum_steps):
        t0 = time.perf_counter()
        images, targets, skipped = next(batches)
        wait += time.perf_counter() - t0
        n_skipped += skipped
        if images.numel() == 0:
            if ctx.world_size > 1:
                raise DataError(
                    f"every image of a batch at epoch {state.epoch} step {state.iteration} was unreadable; "
                    "with several processes the step cannot be skipped on one rank only"
                )
            continue
        images, targets = _to_device(images, targets, ctx.device, ctx.channels_last)
        if ctx.mixup is not None:
            images, targets = ctx.mixup(images, targets)
        last = micro == ctx.accum_steps - 1
        sync = contextlib.nullcontext() if last or ctx.no_sync is None else ctx.no_sync()
        with sync:
            with _autocast(ctx.device, ctx.amp_dtype):
                logits = ctx.model(images)
                loss = ctx.loss_fn(logits, targets) / ctx.accum_steps
            if ctx.scaler is not None:
                ctx.scaler.scale(loss).backward()
            else:
                loss.backward()
        loss_sum += loss.detach().float()
        n_images += images.shape[0]
    return loss_sum, n_images, n_skipped, wait


def _agree_on_step(ctx: StepContext, loss_sum: torch.Tensor, state: TrainState) -> bool:
    """Whether to stop after this step; raises ``NonFiniteLossError`` instead of taking it.

    One small collective per step: every rank learns whether any rank saw a non-finite
    loss or received a stop signal, so all ranks stop at the same step.
    """
    nonfinite_flag = (~torch.isfinite(loss_sum)).float()
    flags = torch.stack([nonfinite_flag, torch.tensor(float(ctx.stop_requested()), device=ctx.device)])
    all_reduce(flags, "max")
    nonfinite, stop = flags.tolist()
    if nonfinite:
        ctx.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"non-finite loss ({loss_sum.item()}) at epoch {state.epoch} iteration {state.iteration} "
            f"(global step {state.global_step}); stopped before the optimizer step, "
            "the last checkpoint is untouched"
        )
    return bool(stop)


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


def _until_steps(loader: DataLoader, state: TrainState, steps: int) -> Iterator:
    # A generator, so the loader (and its workers) starts only when a step asks for a batch:
    # an epoch resumed after its last step takes none.
    yield from loader
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
        NonFiniteLossError: the loss was NaN/inf; raised before the optimizer step, so no bad weights are saved.
        DataError: every image of the epoch was unreadable, or, with several processes, of one step.
    """
    ctx.model.train()
    progress = Progress(steps, state.iteration, desc, main_process, ctx.log_every)
    batches = _until_steps(loader, state, steps)
    meter = meter if meter is not None else TrainMeter(ctx.device, ctx.world_size)
    stopped, taken = False, 0
    while state.iteration < steps and not stopped:
        step = train_step(ctx, batches, state)
        meter.update(step.loss, step.images, step.skipped, step.wait_s)
        stopped = step.stop
        if step.loss is None:
            continue
        taken += 1
        progress.update({"loss": step.loss, "lr": step.lr})
        if logger is not None and state.global_step % ctx.log_every == 0:
            logger.scalars("train", meter.take_window(step.lr), state.global_step)
        if not stopped:
            ctx.on_step(state)
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
    for images, targets, skipped in loader:
        if stop_requested():
            sums[5] = 1
            break
        sums[4] += skipped
        if images.numel() == 0:
            progress.update({})
            continue
        images, targets = _to_device(images, targets, device, channels_last)
        with _autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (B, k)
        hit = top.eq(targets[:, None])
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[1] += hit[:, 0].sum()
        sums[2] += hit.any(dim=1).sum()
        sums[3] += targets.numel()
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
