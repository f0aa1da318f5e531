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

One trainer writes to a run directory at a time: its rank 0 holds an exclusive ``flock`` on
``.lock`` from before ``resume.plan_start`` reads the directory until the process exits, and a
second trainer is refused (``RunDirBusy``) with the holder's host, pid and start time. The
kernel releases an flock when its holder dies, however it dies, so there is no stale lock to
break: a ``.lock`` that still names a holder but is free means that holder was killed or
crashed, and the next trainer takes it over and says so. Leftovers of interrupted writes are
removed only under the lock (``remove_orphans``), so a second start can never delete the
temporary file of a checkpoint the first is writing.

Where the file system refuses flock (some Lustre mounts, ENOSYS or EINVAL), the trainer warns
that nothing keeps two trainers apart and goes on without the lock, and without removing
leftovers. On NFSv4, Linux turns flock into a POSIX lock the server arbitrates between
clients; Lustre mounted with ``-o localflock`` locks per node only, which nothing here can tell.
"""
from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import yaml

from ..fileio import atomic_temp_pattern, atomic_write, no_space_error
from .checkpoint import SIDECAR_SUFFIX, CheckpointError, read_checkpoint, save_checkpoint, sidecar

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

__all__ = ["RunDir", "RunDirBusy"]

_logger = logging.getLogger("rednet")


class RunDirBusy(CheckpointError):
    """Another process holds the run directory's lock: a trainer is running there."""


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
        return _lock_key(self.path) in _HELD

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
        key = _lock_key(self.path)
        if key in _HELD:
            return True
        if fcntl is None:
            _logger.warning("no flock on this platform: nothing keeps two trainers from writing to %s at once", self)
            return False
        try:
            fd, writable = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666), True
        except PermissionError:  # a teammate's lock file (0644): flock needs only reading
            fd, writable = os.open(self.lock_file, os.O_RDONLY), False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(f"{self} is in use by another trainer ({_describe_holder(holder)}); wait for it to "
                                 "end or stop it, or train in another --output") from None
            if e.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOLCK):
                _logger.warning("cannot lock %s (flock: %s; the file system does not support it, e.g. Lustre "
                                "mounted without -o flock): nothing keeps a second trainer from writing there at the "
                                "same time, and leftovers of interrupted writes are not removed", self.lock_file,
                                e.strerror)
                return False
            raise
        previous = _read_holder(fd)
        if previous and (previous.get("host"), previous.get("pid")) != (socket.gethostname(), os.getpid()):
            _logger.warning("taking over the lock of %s from %s: that trainer is gone (killed or crashed; the lock "
                            "goes with its process)", self, _describe_holder(previous))
        text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode()
        try:
            if writable:
                os.ftruncate(fd, 0)
                os.pwrite(fd, text + b"\n", 0)
        except OSError as e:
            os.close(fd)
            full = no_space_error(e, self.lock_file)
            if full is None:
                raise
            raise full from None
        _HELD[key] = fd
        return True

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


# The run directories whose lock this process holds: their real path -> the lock file's descriptor.
_HELD: dict[str, int] = {}


def _lock_key(path: Path) -> str:
    return os.path.realpath(path)


def _read_holder(fd: int) -> dict[str, Any]:
    """Who a lock file says holds it; empty if it says nothing (never held, released, or just taken)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that has not yet written who it is: it is just starting"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, running since {holder.get('started')}"


def _release_at_exit() -> None:
    # An ended trainer's lock file names nobody: one that still names a holder tells the next
    # trainer that its holder was killed. The kernel releases the locks themselves.
    for fd in _HELD.values():
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass


def _forget_in_child() -> None:
    # A forked child shares the parent's lock; closing its copy keeps the lock the parent's alone.
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


atexit.register(_release_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)

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
