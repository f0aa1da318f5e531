"""One training epoch and one evaluation pass; the trainer and the tests both call these."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data import DataError
from .distributed import all_reduce
from .logger import Progress, RunLogger

__all__ = ["NonFiniteLossError", "StepContext", "TrainState", "evaluate", "train_one_epoch"]

_logger = logging.getLogger("rednet")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before the optimizer step."""


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
        stop_requested: returns True once a SIGTERM/SIGINT arrived.
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


def _to_device(images: torch.Tensor, targets: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    images = images.to(ctx.device, non_blocking=True).contiguous(memory_format=fmt)
    return images, targets.to(ctx.device, non_blocking=True)


def train_one_epoch(
    ctx: StepContext,
    loader: DataLoader,
    state: TrainState,
    steps: int,
    logger: Optional[RunLogger] = None,
    desc: str = "",
    main_process: bool = True,
) -> dict[str, float]:
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

    Returns:
        ``loss`` (mean over ranks and steps), ``lr``, ``images_per_s``, ``data_wait_s`` (mean per step),
        ``skipped`` (unreadable images, all ranks), ``steps`` done now and ``stopped``.

    Raises:
        NonFiniteLossError: the loss was NaN/inf; raised before the optimizer step, so no bad weights are saved.
        DataError: every image of the epoch was unreadable, or, with several processes, of one step.
    """
    ctx.model.train()
    progress = Progress(steps, state.iteration, desc, main_process, ctx.log_every)
    it = iter(loader)
    cuda = ctx.device.type == "cuda"
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, steps, skipped images
    wait_total = 0.0
    images_seen = 0
    t_epoch = t_last = time.perf_counter()
    window = dict(loss=0.0, steps=0, images=0, wait=0.0)
    stopped = False
    while state.iteration < steps:
        loss_sum = torch.zeros((), device=ctx.device)
        n_images = 0
        wait = 0.0
        for micro in range(ctx.accum_steps):
            t0 = time.perf_counter()
            try:
                images, targets, skipped = next(it)
            except StopIteration:  # only when max_iters/epoch arithmetic disagrees with the loader
                raise RuntimeError(f"the loader ran out after {state.iteration} of {steps} steps") from None
            wait += time.perf_counter() - t0
            totals[2] += skipped
            if images.numel() == 0:
                if ctx.world_size > 1:
                    raise DataError(
                        f"every image of a batch at epoch {state.epoch} step {state.iteration} was unreadable; "
                        "with several processes the step cannot be skipped on one rank only"
                    )
                continue
            images, targets = _to_device(images, targets, ctx)
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
        if n_images == 0:
            # Every image of this step was unreadable (one process; several raise above). An
            # optimizer step would still apply momentum and weight decay and advance the schedule
            # on no data, so it is not a step; the position in the epoch still moves on.
            state.iteration += 1
            if ctx.stop_requested():
                stopped = True
                break
            continue

        # One small collective per step: every rank learns whether any rank saw a non-finite
        # loss or received a stop signal, so all ranks stop at the same step.
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

        loss_value = loss_sum.item()
        totals[0] += loss_value
        totals[1] += 1
        wait_total += wait
        images_seen += n_images
        window["loss"] += loss_value
        window["steps"] += 1
        window["images"] += n_images
        window["wait"] += wait
        progress.update({"loss": loss_value, "lr": lr})
        if logger is not None and state.global_step % ctx.log_every == 0:
            now = time.perf_counter()
            scalars = {
                "loss": window["loss"] / window["steps"],
                "lr": lr,
                "images_per_s": window["images"] * ctx.world_size / max(now - t_last, 1e-9),
                "data_wait_s": window["wait"] / window["steps"],
            }
            if cuda:
                scalars["gpu_mem_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
            logger.scalars("train", scalars, state.global_step)
            t_last, window = now, dict(loss=0.0, steps=0, images=0, wait=0.0)
        if stop:
            stopped = True
            break
        ctx.on_step(state)
    progress.close()
    all_reduce(totals, "sum")
    if not stopped and totals[1] == 0 and totals[2] > 0:
        raise DataError(f"every image of epoch {state.epoch + 1} was unreadable ({int(totals[2])} skipped): "
                        "check the training split")
    elapsed = time.perf_counter() - t_epoch
    n_steps = max(1.0, totals[1].item())
    return {
        "loss": totals[0].item() / n_steps,
        "lr": ctx.optimizer.param_groups[0]["lr"],
        "images_per_s": images_seen * ctx.world_size / max(elapsed, 1e-9),
        "data_wait_s": wait_total / max(1, totals[1].item() / ctx.world_size),
        "skipped": int(totals[2].item()),
        "steps": int(totals[1].item()) // ctx.world_size,
        "time_s": elapsed,
        "stopped": stopped,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    main_process: bool = True,
    desc: str = "eval",
) -> dict[str, float]:
    """Single-pass top-1/top-5/loss over the loader's samples, summed exactly across ranks.

    Use an unwrapped model (not DDP): ranks may hold one batch more or less (see
    ``ShardSampler``), so no collective may run inside the loop.

    Args:
        model: the network.
        loader: yields ``(images, targets, skipped)`` over this rank's shard.
        device: where batches go.
        amp_dtype: autocast dtype or None.
        channels_last: NHWC inputs.
        main_process: show progress on rank 0.
        desc: progress prefix.

    Returns:
        ``top1``, ``top5`` (percent), ``loss`` (plain cross-entropy), ``count`` (images scored over all
        ranks), ``skipped`` (unreadable), ``images_per_s``.
    """
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top-1, top-5, count, skipped
    progress = Progress(len(loader), 0, desc, main_process, max(1, len(loader) // 4))
    t0 = time.perf_counter()
    for images, targets, skipped in loader:
        sums[4] += skipped
        if images.numel() == 0:
            progress.update({})
            continue
        images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
        targets = targets.to(device, non_blocking=True)
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
    loss, c1, c5, n, skipped = sums.tolist()
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
