"""``fit``: builds a run from its config (or restores it from a checkpoint), then runs the epoch loop
with validation, logging, checkpoints and signal handling around ``train_one_epoch``.

Signals: SIGINT, SIGTERM, SIGUSR1 (SLURM's ``--signal=USR1@N``) and SIGHUP each ask the run to
stop: at the end of the step in progress, or at the next batch of a validation, every rank
writes its part of a checkpoint and the run raises ``TrainingInterrupted`` (the tools exit
128 + the signal's number). A second signal acts at once, without a checkpoint. The loader
workers ignore all four, but for a SIGTERM from the trainer itself: a scheduler signals the
whole process group, and a worker that died of it would take the run down before its
checkpoint, while torch and multiprocessing end a worker that does not stop by itself with
their own SIGTERM (``terminate()``), and would wait for it for ever.
"""
from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3
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
    build_model,
    build_optimizer,
    build_scheduler,
    check_buildable,
    execution_summary,
    execution_warnings,
    format_summary,
    global_batch_size,
    peak_lr,
)
from .checkpoint import CheckpointError, capture_rng_state, read_checkpoint, restore_rng_state
from .classes import check_resume_classes, data_name
from .config import Config
from .config_data import config_to_dict
from .distributed import DistInfo, barrier, gather_to_main, init_distributed, is_restarted_worker, run_on_main
from .kernelcheck import check_kernels
from .logger import RunLogger
from .loop import EvaluationStopped, StepContext, TrainState, evaluate, train_one_epoch
from .meter import EpochStats, TrainMeter
from .resume import StartPlan, carry_out, plan_start
from .rundir import RunDir

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


# What asks a run to checkpoint and stop: Ctrl-C, kill / scancel / a time limit, SLURM's
# --signal=USR1@N warning, a closed terminal. (SIGUSR1 and SIGHUP do not exist on Windows.)
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP")
                      if hasattr(signal, name))


class _Signals:
    """First stop signal: ask the loop to checkpoint and stop; a second one: that signal's usual effect."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in _STOP_SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        _logger.warning("received %s: stopping after this step (or validation batch) with a checkpoint "
                        "(send it again to stop at once, without one)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# Where a worker can learn who sent a SIGTERM (Linux, most Unixes; not macOS or Windows).
_CAN_TELL_SENDER = hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")


def _ignore_stop_signals(init: Optional[Callable[[int], None]], worker_id: int) -> None:
    """A loader worker's ``worker_init_fn``: ignore the stop signals, then call the loader's own ``init``.

    SIGTERM is the exception: ``terminate()`` (torch ends workers that do not stop by themselves
    with it, and multiprocessing every worker still alive at exit) sends it from the trainer, and
    a worker deaf to it would be waited for for ever. It stays blocked, and a thread takes each
    one with its sender: the trainer's ends the worker, anyone else's is dropped. Where the sender
    cannot be known, the worker keeps SIGTERM's default.
    """
    # The worker was started with these signals blocked (see _WorkerContext): ignoring them
    # discards one that arrived meanwhile.
    ignored = tuple(s for s in _STOP_SIGNALS if s != signal.SIGTERM)
    for s in ignored:
        signal.signal(s, signal.SIG_IGN)
    if _CAN_TELL_SENDER:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not torch's handler, which prints first
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_end_on_the_trainers_sigterm, args=(os.getppid(),), name="rednet-sigterm",
                         daemon=True).start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, ignored)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if init is not None:
        init(worker_id)


def _end_on_the_trainers_sigterm(trainer: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == trainer:
            # This thread alone lets SIGTERM through: its default action ends the worker.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)


if hasattr(multiprocessing.context, "ForkProcess"):  # POSIX

    class _SignalsBlockedProcess(multiprocessing.context.ForkProcess):
        """A forked loader worker that starts with the stop signals blocked.

        torch's worker loop installs its own SIGTERM handler (print, then die) before it calls
        ``worker_init_fn``; blocked, a signal waits until ``_ignore_stop_signals`` deals with it.
        """

        def start(self) -> None:
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                super().start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    class _WorkerContext(multiprocessing.context.ForkContext):
        Process = _SignalsBlockedProcess


def _shield_workers(loader: DataLoader) -> None:
    """Make ``loader``'s workers ignore the stop signals (but the trainer's SIGTERM) from their first instruction on."""
    if loader.num_workers == 0:
        return
    loader.worker_init_fn = functools.partial(_ignore_stop_signals, loader.worker_init_fn)
    # The signals are blocked across the fork only where workers are forked (Linux's default
    # before Python 3.14); under another start method a signal in the worker's first
    # milliseconds can still end it.
    if loader.multiprocessing_context is None and multiprocessing.get_start_method() == "fork" \
            and hasattr(signal, "pthread_sigmask"):
        loader.multiprocessing_context = _WorkerContext()


class _Run:
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
    def build(cls, cfg: Config, run_dir: RunDir, dist_info: DistInfo, steps: int, pretrained: bool) -> _Run:
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
        _shield_workers(loader)
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
        barrier()  # see _Run.save
        return _finished(cfg, run_dir, plan)
    train_loader, val_loader, steps = _build_loaders(cfg, dist_info)
    classes = list(train_loader.dataset.classes)
    if plan.checkpoint is not None:
        run_on_main(lambda: check_resume_classes(main_state, classes, plan.checkpoint,
                                                 data_name(cfg.data, cfg.data.train_split), allow_config_change))
    run_on_main(prepare_run_dir)
    ckpt = main_state if dist_info.is_main or plan.checkpoint is None else read_checkpoint(plan.checkpoint)
    run = _Run.build(cfg, run_dir, dist_info, steps, pretrained=ckpt is None)
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


def _train(run: _Run, train_loader: DataLoader, val_loader: DataLoader, steps: int) -> dict[str, Any]:
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

    signals = _Signals()
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
                path = _end_epoch(run, result.stats, val, logger)
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


def _end_epoch(run: _Run, stats: EpochStats, val: Optional[dict[str, Any]], logger: RunLogger) -> Path:
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
