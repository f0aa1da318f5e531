"""Where a run starts, fresh or from which checkpoint, and what a run directory's results allow.

A run directory's results are its rolling checkpoints, ``best.pt``, ``last.pt`` and
``metrics.jsonl``. A run never starts over on top of them, and never continues from a
checkpoint written by an incompatible config, unless the command says so:

- no ``--resume``: a directory holding results is refused. ``--restart`` first moves them
  (with ``config.yaml``, ``tb/``, ``eval.json``) into ``previous-<time>/`` and starts over.
- ``--resume auto``: reads the rolling checkpoints newest first (then ``last.pt`` if it is a
  separate file) and continues from the first one that is readable, holds an optimizer state
  and is compatible. It skips the others with a warning. A skipped checkpoint of another config
  that is newer than the chosen one is renamed ``<name>.other-config``, so that the run neither
  overwrites it when it reaches that step nor prunes it. If nothing fits and the directory
  holds results, it refuses. With no results at all, the run starts from scratch.
- ``--resume PATH``: the file must be readable, hold an optimizer state (``best.pt`` does
  not) and be compatible. A file from outside the run directory is refused if the directory
  holds results, and so is one older than the directory's newest checkpoint.
- ``--allow-config-change``: accepts any config difference. The weights must still fit the model.

Compatible means that the stored config differs from the current one only in
``RESUME_SAFE_KEYS``: the run's length, where its files and data are, how it executes and
logs, but not its recipe. Any other difference is incompatible, for example the model
(name, classes, input channels, kwargs), the data, the augmentation, the optimizer or the loss.
Once the plan is made and the data is found, ``fit`` also refuses a checkpoint whose stored
class names differ from the training data's (``classes.check_resume_classes``), before the
directory changes; ``--allow-config-change`` accepts that too.

A worker that ``torchrun --max-restarts`` restarted continues the run as ``--resume auto``.

A run whose checkpoint has done ``train.epochs`` is finished: ``fit`` says so, and how to train
again, without changing the directory or validating again.

Rank 0 takes the run directory's lock (``RunDir.lock``) before it reads the directory, so a
second trainer there is refused before it decides anything. Before the run builds anything,
rank 0 removes the temporary files interrupted writes left behind. On a resume it also drops
the ``metrics.jsonl`` records of epochs after the checkpoint's, which the run writes again, and
its damaged lines. An epoch then replaces ``best.pt`` only by beating the top-1 it holds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..models import redact_url
from .checkpoint import CheckpointError, read_checkpoint
from .config import ConfigError
from .config_data import config_from_dict, config_to_dict
from .rundir import RunDir

__all__ = ["RESUME_SAFE_KEYS", "StartPlan", "carry_out", "config_changes", "plan_start"]

_logger = logging.getLogger("rednet")

# The config keys a resume may change without --allow-config-change, and why each is safe.
RESUME_SAFE_KEYS: dict[str, str] = {
    "train.epochs": "the schedule is rebuilt for the new length (the cosine stretches or shrinks)",
    "train.output": "the run directory may move",
    "train.log_every": "logging only",
    "train.val_every": "when validation runs, not what is trained",
    "train.ckpt_every_iters": "when checkpoints are written",
    "train.keep_last": "how many checkpoints are kept",
    "train.cpu_threads": "how the CPU runs it",
    "train.device": "where it runs",
    "train.compile": "how it runs",
    "train.compile_mode": "how it runs (with CUDA graphs or without)",
    "data.root": "the same dataset at another path",
    "data.workers": "loader processes",
    "data.pin_memory": "loader option",
    "data.persistent_workers": "loader option",
    "data.eval_batch_size": "validation batching",
}


@dataclass
class StartPlan:
    """What ``plan_start`` decided; rank 0 carries it out (``carry_out``) before any rank builds the run.

    Args:
        checkpoint: the checkpoint to continue from; None starts from scratch.
        epoch: the checkpoint's epoch in progress; later records in ``metrics.jsonl`` are dropped.
        iteration: the optimizer steps the checkpoint had done in that epoch.
        best_top1: the best top-1 the directory's ``best.pt`` holds; an epoch replaces it only by beating it.
        restart_dir: ``--restart``: the folder the directory's results move into.
        move_aside: the entries that move there.
        set_aside: checkpoints of another config, renamed ``<name>.other-config``.
    """

    checkpoint: Optional[Path] = None
    epoch: int = 0
    iteration: int = 0
    best_top1: float = -1.0
    restart_dir: Optional[Path] = None
    move_aside: list[Path] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)


def _flatten(config: dict) -> dict[str, Any]:
    # Two levels, section.key: a value such as model.kwargs compares as a whole.
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def _shown(value: Any) -> Any:
    # These lines are logged: a URL's token or password (model.pretrained) stays out of the log.
    return redact_url(value) if isinstance(value, str) else value


def config_changes(current: dict, stored: dict) -> tuple[list[str], list[str]]:
    """The differences ``key: stored -> current`` between two resolved configs, split into (safe, unsafe).

    A stored config the current schema cannot read is one unsafe change.
    """
    try:
        stored = config_to_dict(config_from_dict(stored))  # fills keys added since it was written
    except ConfigError as e:
        return [], [f"its config does not fit this version's schema ({e})"]
    a, b = _flatten(current), _flatten(stored)
    safe, unsafe = [], []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) != b.get(key):
            (safe if key in RESUME_SAFE_KEYS else unsafe).append(f"{key}: {_shown(b.get(key))!r} -> "
                                                                 f"{_shown(a.get(key))!r}")
    return safe, unsafe


def _unusable(state: dict, config: dict, allow_config_change: bool) -> Optional[tuple[str, bool]]:
    """Why a run cannot continue from a readable checkpoint, and whether the reason is another config."""
    if state.get("optimizer") is None:
        return "it holds no optimizer state (best.pt keeps only what evaluation needs)", False
    _, unsafe = config_changes(config, state["config"])
    if unsafe and not allow_config_change:
        return f"it was written by another config ({'; '.join(unsafe)})", True
    return None


def _misfit(config: dict, weights: dict) -> Optional[str]:
    """How a checkpoint's weights do not fit the config's model (None: they fit), checked on the meta
    device so that nothing is allocated and nothing in the run directory has changed yet."""
    from .builder import build_model  # imports the model zoo; only a resume with a changed config needs it

    with torch.device("meta"):
        expected = build_model(config_from_dict(config), pretrained=False).state_dict()
    problems = [f"missing {k}" for k in sorted(expected.keys() - weights.keys())]
    problems += [f"unexpected {k}" for k in sorted(weights.keys() - expected.keys())]
    problems += [f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
                 for k in sorted(expected.keys() & weights.keys()) if weights[k].shape != expected[k].shape]
    return ", ".join(problems[:8]) + (f" and {len(problems) - 8} more" if len(problems) > 8 else "") or None


def _continue_from(path: Path, state: dict, config: dict, run_dir: RunDir) -> StartPlan:
    safe, unsafe = config_changes(config, state["config"])
    if safe:
        _logger.info("config changes a resume allows: %s", "; ".join(safe))
    if unsafe:
        misfit = _misfit(config, state["model"])
        if misfit:
            raise CheckpointError(f"the weights in {path} do not fit the model of the current config ({misfit})")
        _logger.warning("--allow-config-change: continuing from %s despite config changes: %s", path,
                        "; ".join(unsafe))
    plan = StartPlan(checkpoint=path, epoch=int(state["epoch"]), iteration=int(state.get("iteration", 0)),
                     best_top1=float(state.get("best_top1", -1.0)))
    best = run_dir.best
    if best.is_file() and not best.samefile(path):
        try:
            best_state = read_checkpoint(best)
        except CheckpointError as e:
            _logger.warning("%s; the next epoch that sets a best top-1 replaces it", e)
            return plan
        _, best_unsafe = config_changes(config, best_state["config"])
        if best_unsafe and not unsafe:
            _logger.warning("%s was written by another config (%s): renaming it %s%s", best, "; ".join(best_unsafe),
                            best.name, RunDir.OTHER_CONFIG)
            plan.set_aside.append(best)
        else:
            # A kill after best.pt and before the epoch's checkpoint: this run redoes that epoch,
            # and must not replace best.pt with anything worse than what it holds.
            plan.best_top1 = max(plan.best_top1, float(best_state.get("best_top1", -1.0)))
    return plan


def _choices(run_dir: RunDir, other_config: bool) -> str:
    choices = ["--output DIR to train in another directory",
               f"--restart to move these results into {run_dir}/{RunDir.PREVIOUS}<time>/ and start over"]
    if other_config:
        choices.append("--allow-config-change to continue from the newest readable checkpoint anyway")
    return "; ".join(choices[:-1]) + "; or " + choices[-1]


def _plan_auto(run_dir: RunDir, config: dict, allow_config_change: bool) -> tuple[StartPlan, Optional[dict]]:
    skipped: list[tuple[Path, str, bool]] = []  # path, why, written by another config
    for path, state in run_dir.scan():
        if isinstance(state, CheckpointError):
            why, other = str(state), False
        else:
            unusable = _unusable(state, config, allow_config_change)
            if unusable is None:
                plan = _continue_from(path, state, config, run_dir)
                plan.set_aside += [p for p, _, other in skipped if other and p.name != RunDir.LAST]
                return plan, state
            why, other = f"{path}: {unusable[0]}", unusable[1]
        _logger.warning("resume: skipping %s", why)
        skipped.append((path, why, other))
    results = run_dir.results()
    if not results:
        _logger.info("no checkpoint in %s: starting from scratch", run_dir)
        return StartPlan(), None
    why = "; ".join(w for _, w, _ in skipped) if skipped else "it has none"
    raise CheckpointError(f"{run_dir} holds results ({', '.join(results)}) but no checkpoint this run can continue "
                          f"from ({why}). Refusing to start over there: use "
                          f"{_choices(run_dir, any(o for _, _, o in skipped))}")


def _plan_path(path: Path, run_dir: RunDir, config: dict, allow_config_change: bool) -> tuple[StartPlan, dict]:
    state = read_checkpoint(path)
    unusable = _unusable(state, config, allow_config_change)
    if unusable is not None:
        why, other = unusable
        hint = "pass --allow-config-change to continue anyway" if other else "resume from last.pt or a checkpoint-*.pt"
        raise CheckpointError(f"cannot resume from {path}: {why}; {hint}")
    if path.resolve().parent != run_dir.path.resolve():
        results = run_dir.results()
        if results:
            raise CheckpointError(f"{run_dir} already holds results ({', '.join(results)}); continuing {path} there "
                                  "would mix two runs: choose another --output")
    else:
        newer = [p.name for p in run_dir.checkpoints() if run_dir.step_of(p) > int(state["global_step"])]
        if newer:
            raise CheckpointError(f"{run_dir} holds checkpoints newer than {path.name} ({', '.join(newer)}); "
                                  "continuing from an older one would mix two histories in one directory: use "
                                  "--resume auto, or copy the file into another --output")
    return _continue_from(path, state, config, run_dir), state


def _plan_restart(run_dir: RunDir) -> StartPlan:
    entries = run_dir.run_files()
    if not entries:
        return StartPlan()
    dest = run_dir.previous_dir()
    _logger.warning("--restart: moving %s from %s into %s, then starting over",
                    ", ".join(p.name for p in entries), run_dir, dest)
    return StartPlan(restart_dir=dest, move_aside=entries)


def plan_start(run_dir: RunDir, config: dict, resume: Optional[str] = None, *, restart: bool = False,
               allow_config_change: bool = False, restarted_worker: bool = False) -> tuple[StartPlan, Optional[dict]]:
    """Decide where a run starts, reading the run directory only; ``carry_out`` applies the decision.

    Args:
        run_dir: the run directory.
        config: the current resolved config (``config_to_dict``).
        resume: None, ``"auto"`` or a checkpoint path (see the module docstring).
        restart: move the directory's results aside and start over.
        allow_config_change: accept a checkpoint of any config whose weights fit the model.
        restarted_worker: this process is a worker ``torchrun`` restarted: it continues the run.

    Returns:
        the plan, and the chosen checkpoint's state (None for a fresh start).

    Raises:
        CheckpointError: what the command asks for would overwrite, bury or mix results, or
            the checkpoint named cannot be used; the message names what was found and the choices.
    """
    if restarted_worker:
        _logger.info("restarted by torchrun: resuming from the newest checkpoint in %s", run_dir)
        plan, state = _plan_auto(run_dir, config, allow_config_change)
        if state is None and resume not in (None, "auto"):
            return _plan_path(Path(resume), run_dir, config, allow_config_change)
        return plan, state
    if restart:
        return _plan_restart(run_dir), None
    if resume is None:
        results = run_dir.results()
        if results:
            raise CheckpointError(f"{run_dir} already holds results ({', '.join(results)}); pass --resume auto to "
                                  f"continue that run, or use {_choices(run_dir, False)}")
        return StartPlan(), None
    if resume == "auto":
        return _plan_auto(run_dir, config, allow_config_change)
    return _plan_path(Path(resume), run_dir, config, allow_config_change)


def carry_out(plan: StartPlan, run_dir: RunDir) -> None:
    """Apply a plan to the run directory (rank 0 only, under its lock, before any rank writes to it)."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if run_dir.locked:  # without the lock (a file system without flock) another trainer's files may be live
        run_dir.remove_orphans()
    if plan.restart_dir is not None:
        run_dir.move_aside(plan.move_aside, plan.restart_dir)
    for p in plan.set_aside:
        target = run_dir.set_aside(p)
        _logger.warning("renamed %s (another config's) to %s: this run neither resumes from it nor overwrites it",
                        p, target.name)
    if plan.checkpoint is not None:
        run_dir.trim_metrics(plan.epoch)
