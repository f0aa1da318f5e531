"""``RunDir``: the one owner of a run directory's file names and of the housekeeping on them.

What a run directory (``train.output``) holds, and who writes it:

    config.yaml                 the resolved config, written at every start (``write_config``)
    metrics.jsonl               one JSON line per finished epoch (``RunLogger``; ``trim_metrics``)
    tb/                         TensorBoard scalars (``RunLogger``)
    checkpoint-<step>.pt        rolling checkpoints, the global step in 9 digits; the newest
                                ``train.keep_last`` stay (``save_checkpoint``, ``prune``)
    last.pt                     a hard link to the newest of them; a copy where the file
                                system has no hard links
    best.pt                     the epoch with the best validation top-1, without what only
                                resuming needs (``save_best``)
    eval.json                   what ``make train``'s evaluation writes
    previous-<time>/            what ``--restart`` moved aside (``move_aside``)
    <name>.other-config[-N]     a checkpoint of another config that ``--resume auto`` set aside
    .<name>.<random>.tmp, .last.pt.link   left by interrupted writes (``remove_orphans``)
    .lock                       the trainer's lock; while one holds it, the text of who does (``lock``)

The bytes of a checkpoint are ``checkpoint.py``'s; which checkpoint a run continues from, and
what a command may do to a directory's results, is ``resume.py``'s. This module only names,
lists, writes, links, rotates and moves.

One trainer writes to a run directory at a time: ``lock`` takes the directory's lock, which is
``runlock``'s; ``remove_orphans`` runs only under it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import yaml

from ..fileio import atomic_temp_pattern, atomic_write
from .checkpoint import SIDECAR_SUFFIX, CheckpointError, read_checkpoint, save_checkpoint, sidecar
from .runlock import holds_lock, take_lock

__all__ = ["RunDir"]

_logger = logging.getLogger("rednet")


class RunDir:
    """The files of one run directory: their names, and the housekeeping on them.

    Cheap to build: it holds only the path, and touches the disk only when a method is called.
    ``str()`` and ``os.fspath()`` give the directory's path.

    Args:
        path: the run directory (it need not exist yet).
    """

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    TENSORBOARD = "tb"
    BEST = "best.pt"
    LAST = "last.pt"
    EVAL = "eval.json"
    PREVIOUS = "previous-"  # + the time of the --restart
    OTHER_CONFIG = ".other-config"
    LOCK = ".lock"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- names ------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def best(self) -> Path:
        return self.path / self.BEST

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    @property
    def lock_file(self) -> Path:
        return self.path / self.LOCK

    def checkpoint(self, step: int) -> Path:
        """The rolling checkpoint written after ``step`` optimizer steps."""
        return self.path / f"checkpoint-{step:09d}.pt"

    @staticmethod
    def step_of(path: str | os.PathLike) -> Optional[int]:
        """The global step a rolling checkpoint's name holds; None for any other name."""
        m = _ROLLING.fullmatch(Path(path).name)
        return int(m.group(1)) if m else None

    # --- the lock ---------------------------------------------------------------------

    @property
    def locked(self) -> bool:
        """Whether this process holds the directory's lock."""
        return holds_lock(self.path)

    def lock(self) -> bool:
        """Take the directory's lock for the rest of this process's life (creating the directory).

        Taking it again in the same process is a no-op. Forked children (loader workers) do not
        hold it: they close their copy, so the lock goes when the trainer goes.

        Returns:
            True: held. False: the file system does not support flock; a warning said that
            nothing keeps two trainers apart here.

        Raises:
            RunDirBusy: another process holds it; the message names it (host, pid, start time).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        return take_lock(self.path, self.lock_file)

    # --- checkpoints ------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """The rolling checkpoints, newest (highest step) first."""
        if not self.path.is_dir():
            return []
        found = [(step, p) for p in self.path.iterdir() if (step := self.step_of(p)) is not None]
        return [p for _, p in sorted(found, reverse=True)]

    def scan(self, map_location: str | torch.device = "cpu"
             ) -> Iterator[tuple[Path, dict[str, Any] | CheckpointError]]:
        """Each candidate to resume from, newest first, read: its state, or the error that makes it unusable.

        The rolling checkpoints, then ``last.pt`` when it is not a link to one of them (a copy, or
        the only file left). The caller decides which one fits; reading stops when it stops iterating.
        """
        candidates = self.checkpoints()
        last = self.last
        if last.is_file() and not any(last.samefile(p) for p in candidates):
            candidates.append(last)
        for path in candidates:
            try:
                yield path, read_checkpoint(path, map_location)
            except CheckpointError as e:
                yield path, e

    def find_resume(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
        """The newest readable checkpoint and its state, skipping (and reporting) bad ones."""
        for path, state in self.scan(map_location):
            if isinstance(state, CheckpointError):
                _logger.warning("resume: skipping %s; trying the previous one", state)
                continue
            return path, state
        return None

    def save_checkpoint(self, state: dict[str, Any], step: int) -> Path:
        """Write the rolling checkpoint of ``step``, then make ``last.pt`` it; returns the checkpoint's path.

        ``last.pt`` is a hard link, so it costs no second write and survives pruning; a copy
        where the file system has no hard links. Either way it replaces the old ``last.pt``
        in one rename.

        Args:
            state: the checkpoint's contents (``checkpoint.save_checkpoint``).
            step: the global step, which names the file.
        """
        path = save_checkpoint(state, self.checkpoint(step))
        link = self.path / _LAST_LINK
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
        except OSError:  # no hard links on this file system
            save_checkpoint(state, self.last)
            return path
        os.replace(link, self.last)
        sidecar(self.last).unlink(missing_ok=True)  # an earlier version's would describe the old file
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        """Write ``best.pt``."""
        return save_checkpoint(state, self.best)

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` rolling checkpoints (and any sidecars of earlier versions)."""
        for path in self.checkpoints()[keep:]:
            path.unlink(missing_ok=True)
            sidecar(path).unlink(missing_ok=True)

    # --- the rest of the directory ----------------------------------------------------

    def write_config(self, config: dict[str, Any]) -> None:
        """Write the resolved config (``config_to_dict``) as ``config.yaml``."""
        text = yaml.safe_dump(config, sort_keys=False).encode()
        atomic_write(self.config, lambda f: f.write(text))

    def trim_metrics(self, epochs_done: int) -> int:
        """Keep the records of epochs 1..``epochs_done`` in ``metrics.jsonl``; returns how many lines were dropped.

        A resumed run writes again the records of the epochs after its checkpoint: a kill between
        an epoch's metrics line and its checkpoint left one, and a kill in mid-line a torn one. A
        damaged line (torn, not JSON, not UTF-8) is dropped too, and counted. The file is rewritten
        atomically.
        """
        path = self.metrics
        if not path.is_file():
            return 0
        lines = path.read_bytes().splitlines()
        kept, damaged = [], 0
        for line in lines:
            try:
                record = json.loads(line.decode("utf-8"))
            except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
                damaged += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] <= epochs_done:
                kept.append(line + b"\n")
            elif not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                damaged += 1
        dropped = len(lines) - len(kept)
        if dropped:
            atomic_write(path, lambda f: f.write(b"".join(kept)))
            later = dropped - damaged
            what = [f"{later} record(s) after epoch {epochs_done}, which this run writes again"] if later else []
            what += [f"{damaged} damaged line(s)"] if damaged else []
            _logger.warning("%s: dropped %s", path, " and ".join(what))
        return dropped

    def results(self) -> list[str]:
        """What the directory holds that a fresh start would bury, in words (empty: nothing)."""
        found = []
        checkpoints = self.checkpoints()
        if checkpoints:
            found.append(f"{len(checkpoints)} rolling checkpoint{'s' if len(checkpoints) > 1 else ''}")
        found += [name for name in (self.BEST, self.LAST) if (self.path / name).is_file()]
        metrics = self.metrics
        if metrics.is_file() and metrics.stat().st_size:
            found.append(f"{self.METRICS} ({len(metrics.read_bytes().splitlines())} epoch records)")
        return found

    def run_files(self) -> list[Path]:
        """Everything the trainer and ``make train`` write here, sorted: what ``--restart`` moves aside."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if _RUN_FILES.fullmatch(p.name))

    def previous_dir(self) -> Path:
        """A new ``previous-<time>`` folder's path (not created), ``-2``, ``-3``... if one exists."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, n = self.path / f"{self.PREVIOUS}{stamp}", 1
        while dest.exists():
            n += 1
            dest = self.path / f"{self.PREVIOUS}{stamp}-{n}"
        return dest

    def move_aside(self, entries: list[Path], dest: Path) -> None:
        """Create ``dest`` and move ``entries`` into it."""
        dest.mkdir()
        for p in entries:
            os.replace(p, dest / p.name)

    def set_aside(self, path: Path) -> Path:
        """Rename a checkpoint of another config ``<name>.other-config`` (``-2``, ... if taken); returns the new path.

        The run then neither resumes from it, nor overwrites it when it reaches that step, nor prunes it.
        """
        target, n = path.with_name(path.name + self.OTHER_CONFIG), 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}{self.OTHER_CONFIG}-{n}")
        os.replace(path, target)
        return target

    def remove_orphans(self) -> list[Path]:
        """Delete the temporary files interrupted writes left; returns what was removed.

        Only under the lock (``lock``), which keeps every other trainer out: the trainer calls
        it at start, before the first write of the run.
        """
        if not self.locked:
            raise RuntimeError(f"remove_orphans needs the lock of {self} (RunDir.lock): another trainer may be "
                               "writing the files it would remove")
        if not self.path.is_dir():
            return []
        removed, size = [], 0
        for p in self.path.iterdir():
            if _ORPHAN.fullmatch(p.name) and p.is_file():
                size += p.stat().st_size
                p.unlink(missing_ok=True)
                removed.append(p)
        if removed:
            _logger.info("removed %d temporary file(s) (%.1f MB) that interrupted writes left in %s: %s", len(removed),
                         size / 2**20, self.path, ", ".join(p.name for p in removed))
        return removed



_ROLLING = re.compile(r"checkpoint-(\d+)\.pt")
_LAST_LINK = f".{RunDir.LAST}.link"  # last.pt's hard link in the making


def _any(*names: str) -> str:
    return "|".join(re.escape(n) for n in names)


_CHECKPOINTS = rf"checkpoint-\d+\.pt|{_any(RunDir.BEST, RunDir.LAST)}"
# Temporary files of interrupted writes: atomic_write's, of the files the trainer writes, and last.pt's link.
_ORPHAN = re.compile(atomic_temp_pattern(rf"{_CHECKPOINTS}|{_any(RunDir.METRICS, RunDir.CONFIG)}")
                     + f"|{re.escape(_LAST_LINK)}")
# What --restart moves aside: every checkpoint (with an earlier version's sidecar, or set aside
# as another config's), and the other files the trainer and `make train` write.
_RUN_FILES = re.compile(rf"(?:{_CHECKPOINTS})(?:{re.escape(SIDECAR_SUFFIX)}|{re.escape(RunDir.OTHER_CONFIG)}(?:-\d+)?)?"
                        rf"|{_any(RunDir.METRICS, RunDir.CONFIG, RunDir.EVAL, RunDir.TENSORBOARD)}")
