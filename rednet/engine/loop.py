"""The training step, the epoch loop around it, and one evaluation pass; the trainer and the tests call these."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data import DataError, DeviceInput
from .distributed import all_reduce
from .logger import Progress, RunLogger
from .meter import EpochStats, TrainMeter
from .stepguard import DeferredChecks, NonFiniteLossError, scaler_found_inf

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
        stop_requested: returns True once a signal asked training to stop (the trainer's ``StopSignals``).
        on_step: called after each optimizer step with the state; may write a checkpoint.
        log_every: steps between log points, where the loss and the checks are read.
        world_size: processes.
        input: turns loader batches into model input on ``device`` (normalisation, GPU decode).
        check_every_step: read the loss and the non-finite / stop flags on the host every step and
            raise before a bad step (None: on a CPU, where reading costs nothing). Otherwise they stay
            on the device (``rednet.engine.stepguard``): a bad step is undone there and the host
            reads them at log points, every ``ckpt_every`` steps and at the epoch's end.
        ckpt_every: the steps at which ``on_step`` writes a checkpoint (checks are read before it); 0: none.
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
    input: DeviceInput = field(default_factory=DeviceInput)
    check_every_step: Optional[bool] = None
    ckpt_every: int = 0

    @property
    def deferred(self) -> bool:
        """Checks stay on the device between reads."""
        return not (self.device.type != "cuda" if self.check_every_step is None else self.check_every_step)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> torch.autocast:
    """Autocast to ``dtype``; disabled (fp32) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@dataclass
class StepResult:
    """What one ``train_step`` did on this rank.

    Args:
        loss: the step's loss, a 0-dim tensor on the device (not read here); None when every image of
            the step was unreadable (no optimizer step).
        images: images trained on.
        skipped: unreadable images.
        wait_s: seconds spent waiting for the loader.
        lr: the learning rate the optimizer step used.
        stop: a stop was requested (on any rank, agreed by all): the epoch ends after this step. With
            deferred checks (``StepContext.deferred``) it is known only at a read, never here.
    """

    loss: Optional[torch.Tensor]
    images: int
    skipped: int
    wait_s: float
    lr: float = 0.0
    stop: bool = False


def train_step(ctx: StepContext, batches: Iterator, state: TrainState,
               checks: Optional[DeferredChecks] = None) -> StepResult:
    """One optimizer step over ``ctx.accum_steps`` micro-batches drawn from ``batches``; advances ``state``.

    A step whose images were all unreadable moves the position in the epoch
    (``state.iteration``) but is not an optimizer step.

    Args:
        ctx: model, optimizer and step options.
        batches: yields ``(images, targets, skipped)`` on the device (``DeviceInput.batches``).
        state: where training stands; updated in place.
        checks: the epoch's deferred checks (``ctx.deferred``); None: this step's own, read at its end.

    Raises:
        NonFiniteLossError: the loss was NaN/inf on some rank; its optimizer step was not taken.
        DataError: with several processes, every image of a micro-batch was unreadable.
    """
    own_checks = ctx.deferred and checks is None
    if own_checks:
        checks = DeferredChecks(ctx.model, ctx.optimizer, ctx.device)
    if checks is not None:
        checks.guard.snapshot()
    loss_sum, images, skipped, wait = _forward_backward(ctx, batches, state)
    if images == 0:
        # Every image of this step was unreadable (one process; several raise above). An
        # optimizer step would still apply momentum and weight decay and advance the schedule
        # on no data, so it is not a step; the position in the epoch still moves on.
        state.iteration += 1
        return StepResult(None, 0, skipped, wait, stop=ctx.stop_requested())
    if checks is None:
        stop = _agree_on_step(ctx, loss_sum, state)
        _optimizer_step(ctx)
    else:
        stop = False
        ok = checks.check(loss_sum, ctx.stop_requested(), (state.epoch, state.iteration, state.global_step))
        _optimizer_step(ctx, checks, ok)
    lr = ctx.optimizer.param_groups[0]["lr"]
    ctx.scheduler.step()
    if ctx.ema is not None:
        ctx.ema.update(ctx.ema_source, step=state.global_step)
    state.iteration += 1
    state.global_step += 1
    if own_checks:
        stop = checks.read(ctx.scheduler, state)
    return StepResult(loss_sum, images, skipped, wait, lr, stop)


def _optimizer_step(ctx: StepContext, checks: Optional[DeferredChecks] = None,
                    ok: Optional[torch.Tensor] = None) -> None:
    """Clip, step (through the GradScaler for fp16) and clear the gradients.

    With ``checks``, the step is kept only where ``ok`` and fp16 found no overflow, decided on the
    device: the GradScaler is told of its overflow through ``unscale_`` and ``update`` only, since
    its ``step`` reads the overflow flag on the host.
    """
    if ctx.scaler is not None and (checks is not None or ctx.clip_grad is not None):
        ctx.scaler.unscale_(ctx.optimizer)
    if ctx.clip_grad is not None:
        params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, ctx.clip_grad)
    if checks is not None:
        ctx.optimizer.step()
        if ctx.scaler is not None:
            found_inf = scaler_found_inf(ctx.scaler, ctx.optimizer)
            if found_inf is not None:
                ok = ok & (found_inf == 0)
            ctx.scaler.update()
        checks.guard.keep_if(ok)
    elif ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)


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
        if ctx.mixup is not None:  # on the device, after DeviceInput normalised the batch
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
    """Whether to stop after this step; raises ``NonFiniteLossError`` instead of taking it (eager checks).

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
