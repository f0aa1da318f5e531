"""The training step: ``train_step`` runs one optimizer step (micro-batches, DDP's ``no_sync``,
autocast, the non-finite and stop checks, clipping, the GradScaler, the schedule, EMA); the
epoch loop around it is ``loop``'s."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from ..data import DataError, DeviceInput
from .distributed import all_reduce
from .stepguard import DeferredChecks, NonFiniteLossError, scaler_found_inf

__all__ = ["StepContext", "StepResult", "TrainState", "autocast", "train_step"]


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


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> torch.autocast:
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
            with autocast(ctx.device, ctx.amp_dtype):
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

