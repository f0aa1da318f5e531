"""``fit``: builds a run from its config (or restores it from a checkpoint), then runs the epoch loop
with validation, logging, checkpoints and signal handling around ``train_one_epoch``.

The run's state and what a checkpoint keeps of it are ``trainrun``'s; the stop signals (the
handler, the loader workers that ignore them) are ``signals``'. On a stop signal, at the end of
the step in progress or at the next batch of a validation, every rank writes its part of a
checkpoint and the run raises ``TrainingInterrupted`` (the tools exit 128 + the signal's number).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import random
import signal
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..data import (
    DataError,
    build_datasets,
    build_device_input,
    build_eval_loader,
    build_train_loader,
    epoch_order,
)
from ..fileio import check_output_dir
from .builder import (
    autocast_dtype,
    build_loss_and_mixup,
    check_buildable,
    execution_summary,
    execution_warnings,
    format_summary,
    global_batch_size,
    peak_lr,
)
from .checkpoint import read_checkpoint, restore_rng_state
from .classes import check_resume_classes, data_name
from .config import Config
from .config_data import config_to_dict
from .distributed import (
    DistInfo,
    barrier,
    cleanup_distributed,
    group_initialized,
    init_distributed,
    is_restarted_worker,
    run_on_main,
)
from .kernelcheck import check_kernels
from .logger import RunLogger
from .loop import EvaluationStopped, evaluate, train_one_epoch
from .resume import StartPlan, carry_out, plan_start
from .rundir import RunDir
from .signals import StopSignals, shield_workers
from .step import StepContext, TrainState
from .trainrun import TrainRun, end_epoch

__all__ = ["TrainingInterrupted", "fit", "seed_everything"]

_logger = logging.getLogger("rednet")


class TrainingInterrupted(RuntimeError):
    """A stop signal (SIGINT, SIGTERM, SIGUSR1, SIGHUP) arrived; a checkpoint was written. ``signum`` says which.

    Args:
        signum: the signal.
        path: the checkpoint written.
        when: where the run stopped, if not in a training step (e.g. "during the validation of epoch 3").
    """

    def __init__(self, signum: int, path: Optional[Path], when: str = ""):
        super().__init__(f"stopped by {signal.Signals(signum).name}{' ' + when if when else ''}; checkpoint {path}")
        self.signum, self.path = signum, path


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; ``deterministic`` also forbids nondeterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True




def _steps_per_epoch(cfg: Config, samples: int) -> int:
    """Optimizer steps in one epoch of ``samples`` per process, capped by ``train.max_iters_per_epoch``."""
    steps = samples // cfg.data.batch_size // cfg.train.accum_steps
    if cfg.train.max_iters_per_epoch is not None:
        steps = min(steps, cfg.train.max_iters_per_epoch)
    return steps


def _build_loaders(cfg: Config, dist_info: DistInfo) -> tuple[DataLoader, DataLoader, int]:
    """Training and validation loaders, and the optimizer steps of one epoch."""
    train_set, val_set = build_datasets(cfg.data, cfg.model.num_classes, cfg.model.in_chans)
    train_loader = build_train_loader(train_set, cfg.data.batch_size, dist_info.world_size, dist_info.rank,
                                      cfg.train.seed, cfg.data.workers, cfg.data.pin_memory,
                                      cfg.data.persistent_workers)
    val_loader = build_eval_loader(val_set, cfg.data.eval_batch_size or cfg.data.batch_size, dist_info.world_size,
                                   dist_info.rank, cfg.data.workers, cfg.data.pin_memory, cfg.data.persistent_workers)
    for loader in (train_loader, val_loader):  # data.workers may be null: the loaders resolved it
        shield_workers(loader)
    steps = _steps_per_epoch(cfg, epoch_order(train_loader).num_samples)
    if steps == 0:
        raise DataError(f"the training set ({len(train_set)} images over {dist_info.world_size} processes) is "
                         f"smaller than one step of {cfg.data.batch_size} x {cfg.train.accum_steps} images")
    return train_loader, val_loader, steps


def fit(cfg: Config, resume: Optional[str] = None, *, restart: bool = False,
        allow_config_change: bool = False) -> dict[str, Any]:
    """Train ``cfg`` under torchrun or in a single process; returns the final validation metrics.

    Where the run starts follows ``rednet.engine.resume``: a run directory's results are never
    started over on or continued from an incompatible checkpoint unless asked.

    Args:
        cfg: the resolved config; ``train.output`` is the run directory.
        resume: None (fresh run; a run directory holding results is an error), ``"auto"`` (the
            newest usable checkpoint of the run directory; a fresh run where it holds no results)
            or a checkpoint path.
        restart: start over; the run directory's results are first moved into ``previous-<time>/``.
        allow_config_change: continue from a checkpoint whose config differs in more than
            ``RESUME_SAFE_KEYS``, or whose class names differ from the training data's.

    Raises:
        ConfigError: the config names what cannot be built here (a model, weights file, optimizer, CUDA device).
        OutputDirError: the run directory cannot be written.
        CheckpointError: the run directory or checkpoint does not allow what was asked (nothing was changed).
        NonFiniteLossError: the loss diverged (the last checkpoint stays as it was).
        TrainingInterrupted: SIGINT, SIGTERM, SIGUSR1 or SIGHUP; a checkpoint was written first.
        RunDirBusy: another trainer holds the run directory's lock (a ``CheckpointError``).
        NoSpaceError: the run directory's disk or quota is full, or a file reached the file-size
            limit (a ``CheckpointError``); the checkpoints already there are intact.

    A run directory whose checkpoint finished ``train.epochs`` is not trained or validated again:
    the result then holds ``finished: True``, the epochs done and the best top-1.
    """
    owns_group = not group_initialized()
    result = _fit(cfg, resume, restart=restart, allow_config_change=allow_config_change)
    if owns_group:
        # On a normal end only: after an error another rank may still wait in a collective, which
        # destroying the group would hang. A gloo group left to the interpreter's exit can abort
        # the process ("terminate called without an active exception").
        cleanup_distributed()
    return result


def _fit(cfg: Config, resume: Optional[str], *, restart: bool, allow_config_change: bool) -> dict[str, Any]:
    # Before any data is read: a typo or a missing GPU should not cost a scan of ImageNet.
    check_buildable(cfg)
    check_output_dir(cfg.train.output, "the run directory train.output (--output)")
    dist_info = init_distributed(cfg.train.device)
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    run_dir = RunDir(cfg.train.output)
    seed_everything(cfg.train.seed + dist_info.rank, cfg.train.deterministic)
    cfg_dict = config_to_dict(cfg)
    main_state: Optional[dict] = None

    def decide() -> StartPlan:
        nonlocal main_state
        run_dir.lock()  # before anything reads the directory; held until this process ends
        plan, main_state = plan_start(run_dir, cfg_dict, resume, restart=restart,
                                      allow_config_change=allow_config_change,
                                      restarted_worker=is_restarted_worker())
        return plan

    def prepare_run_dir() -> None:
        carry_out(plan, run_dir)
        run_dir.write_config(cfg_dict)

    # Rank 0 decides and changes the directory; the others wait (and see its errors), then
    # read the same checkpoint. The data's class names are checked against the checkpoint's
    # before anything in the directory changes.
    plan = run_on_main(decide)
    if plan.checkpoint is not None and plan.epoch >= cfg.train.epochs and plan.iteration == 0:
        barrier()  # see TrainRun.save
        return _finished(cfg, run_dir, plan)
    train_loader, val_loader, steps = _build_loaders(cfg, dist_info)
    classes = list(train_loader.dataset.classes)
    if plan.checkpoint is not None:
        run_on_main(lambda: check_resume_classes(main_state, classes, plan.checkpoint,
                                                 data_name(cfg.data, cfg.data.train_split), allow_config_change))
    run_on_main(prepare_run_dir)
    ckpt = main_state if dist_info.is_main or plan.checkpoint is None else read_checkpoint(plan.checkpoint)
    run = TrainRun.build(cfg, run_dir, dist_info, steps, pretrained=ckpt is None)
    run.classes = classes
    if ckpt is not None:
        if ckpt.get("world_size", 1) != dist_info.world_size:
            epoch_images = epoch_order(train_loader).num_samples * dist_info.world_size
            _logger.warning("%s", _world_size_change(cfg, ckpt, dist_info.world_size, epoch_images))
        run.restore(ckpt)
        run.state.best_top1 = max(run.state.best_top1, plan.best_top1)
        _logger.info("resumed from %s at epoch %d iteration %d (global step %d)", plan.checkpoint, run.state.epoch,
                     run.state.iteration, run.state.global_step)
        del ckpt, main_state
    return _train(run, train_loader, val_loader, steps)


def _finished(cfg: Config, run_dir: RunDir, plan: StartPlan) -> dict[str, Any]:
    """A resume of a run that has done its ``train.epochs``: say so, and how to train again, without
    touching the directory or validating again."""
    done = plan.epoch if plan.epoch == cfg.train.epochs else f"{plan.epoch} epochs (train.epochs is {cfg.train.epochs})"
    best = f", best top-1 {plan.best_top1:.2f}" if plan.best_top1 >= 0 else ""
    results = [p.name for p in (run_dir.best, run_dir.last, run_dir.metrics) if p.is_file()]
    _logger.info("%s holds a finished run: %s of %d epochs done%s; its results are there (%s). To train again: "
                 "--restart (moves them into %s/%s<time>/ and starts over), --set train.epochs=N with N > %d "
                 "(continues this run), or another --output", run_dir, done, cfg.train.epochs, best,
                 ", ".join(results), run_dir, RunDir.PREVIOUS, plan.epoch)
    return {"finished": True, "epochs": plan.epoch, "best_top1": plan.best_top1}


def _world_size_change(cfg: Config, state: dict, world_size: int, epoch_images: int) -> str:
    """What a resume with another number of processes changes, in words; an epoch covers ``epoch_images``."""
    old = int(state.get("world_size", 1))
    said = [f"resuming a run of {old} process{'es' if old > 1 else ''} with {world_size}: the global batch "
            f"changes from {global_batch_size(cfg, old)} to {global_batch_size(cfg, world_size)} images per step"]
    if cfg.optim.lr is None:
        said.append(f"optim.lr is null, so the peak lr follows it, from {peak_lr(cfg, old):.4g} to "
                    f"{peak_lr(cfg, world_size):.4g}")
    before, now = (_steps_per_epoch(cfg, math.ceil(epoch_images / n)) for n in (old, world_size))
    said.append(f"an epoch has {now} steps instead of {before}, so the schedule continues at step "
                f"{state['global_step']} of {now * cfg.train.epochs} (it was of {before * cfg.train.epochs})")
    done = int(state["iteration"])
    if done:
        per_process = done * cfg.data.batch_size * cfg.train.accum_steps
        seen, skipped = per_process * old, per_process * world_size
        twice = (f"{seen - skipped} of them are trained on twice" if seen > skipped else
                 f"{skipped - seen} of them are not trained on in this epoch")
        said.append(f"epoch {int(state['epoch']) + 1} was {done} steps in ({seen} images of its shuffled order); it "
                    f"continues after its first {skipped} images, so {twice}"
                    + (", and it ends at once" if done >= now else "")
                    + "; its record in metrics.jsonl covers only the steps after this resume")
    said.append("the data order differs from an uninterrupted run")
    return "; ".join(said)


def _train(run: TrainRun, train_loader: DataLoader, val_loader: DataLoader, steps: int) -> dict[str, Any]:
    """The epoch loop from ``run.state`` to ``train.epochs``: train, validate, log, checkpoint."""
    cfg, dist_info, device = run.cfg, run.dist, run.dist.device
    check_kernels(run.model, cfg, dist_info)  # every rank, one verdict, before anything is wrapped or traced
    train_model, no_sync = _wrap_for_training(run.model, cfg, dist_info)
    loss_fn, mixup = build_loss_and_mixup(cfg)
    resumed_at = run.state.global_step or None
    logger = RunLogger(run.run_dir, dist_info.is_main, purge_step=resumed_at and resumed_at + 1)
    amp_dtype = autocast_dtype(cfg, device)
    _logger.info("%s: %d train / %d val images, %d processes on %s, global batch %d, peak lr %.4g, %d steps x %d "
                 "epochs", cfg.model.name, len(train_loader.dataset), len(val_loader.dataset), dist_info.world_size,
                 device, global_batch_size(cfg, dist_info.world_size), peak_lr(cfg, dist_info.world_size), steps,
                 cfg.train.epochs)
    summary = execution_summary(run.model, cfg, device)
    _logger.info("execution: %s", format_summary(summary))
    if dist_info.is_main:  # once per run: every rank runs the same configuration
        for warning in execution_warnings(run.model, cfg, device, summary["involution_backend"]):
            _logger.warning("%s", warning)

    def on_step(state: TrainState) -> None:
        every = cfg.train.ckpt_every_iters
        if every and state.global_step % every == 0 and state.iteration < steps:
            run.save()

    signals = StopSignals()
    ctx = StepContext(
        model=train_model, optimizer=run.optimizer, scheduler=run.scheduler, loss_fn=loss_fn, device=device,
        accum_steps=cfg.train.accum_steps, amp_dtype=amp_dtype, scaler=run.scaler, clip_grad=cfg.optim.clip_grad,
        channels_last=cfg.train.channels_last, ema=run.ema, ema_source=run.model, mixup=mixup, no_sync=no_sync,
        stop_requested=signals.requested, on_step=on_step, log_every=cfg.train.log_every,
        world_size=dist_info.world_size, ckpt_every=cfg.train.ckpt_every_iters,
        input=build_device_input(cfg.data, device, train_loader.dataset, train=True),
    )
    eval_model = run.ema.module if run.ema is not None and cfg.train.eval_ema else run.model
    validate = functools.partial(evaluate, eval_model, val_loader, device, amp_dtype, cfg.train.channels_last,
                                 dist_info.is_main, stop_requested=signals.requested,
                                 device_input=build_device_input(cfg.data, device, val_loader.dataset, train=False))

    final: dict[str, Any] = {}
    # RNG states last: building the run (loaders, model init) consumed the same draws as in
    # the run that wrote the checkpoint, and the epoch loop continues its stream exactly.
    if run.rng_state is not None:
        restore_rng_state(run.rng_state)
    with signals:
        try:
            while run.state.epoch < cfg.train.epochs:
                epoch = run.state.epoch
                per_step = cfg.data.batch_size * cfg.train.accum_steps
                epoch_order(train_loader).set_epoch(epoch, start=run.state.iteration * per_step)
                result = train_one_epoch(ctx, train_loader, run.state, steps, logger,
                                         desc=f"epoch {epoch + 1}/{cfg.train.epochs}", main_process=dist_info.is_main,
                                         meter=run.start_epoch_meter())
                if result.stopped or signals.signum is not None:
                    path = run.save()
                    raise TrainingInterrupted(signals.signum or signal.SIGTERM, path)
                if result.stats.skipped_images:
                    _logger.warning("epoch %d: skipped %d unreadable images", epoch + 1, result.stats.skipped_images)
                val = None
                if (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs:
                    try:
                        val = final = validate(desc=f"val {epoch + 1}")
                    except EvaluationStopped:
                        # The epoch's training is done and checkpointed as such (its last iteration,
                        # with its statistics); a resume validates it again, then ends it.
                        raise TrainingInterrupted(signals.signum or signal.SIGTERM, run.save(),
                                                  f"during the validation of epoch {epoch + 1} (a resume "
                                                  "validates it again)") from None
                run.meter = None  # the epoch ends: the checkpoint that says so holds no epoch in progress
                path = end_epoch(run, result.stats, val, logger)
                if signals.signum is not None:
                    raise TrainingInterrupted(signals.signum, path)
        finally:
            logger.close()
    return {**final, "best_top1": run.state.best_top1, "epochs": cfg.train.epochs}


def _wrap_for_training(model: nn.Module, cfg: Config, dist_info: DistInfo) -> tuple[nn.Module, Optional[Callable]]:
    """The model the forward pass calls (DDP, compiled, as configured) and DDP's ``no_sync``, if any."""
    wrapped, no_sync = model, None
    if dist_info.distributed:
        device = dist_info.device
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        no_sync = wrapped.no_sync
    if cfg.train.compile:
        # reduce-overhead: CUDA graphs (cudagraph trees) replay the compiled forward and backward; the
        # involution op is capturable: its first-contact check and first synchronised launch happen
        # eagerly, while tracing and in the warm-up run, never during capture.
        mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
        wrapped = torch.compile(wrapped, mode=mode)
    return wrapped, no_sync
