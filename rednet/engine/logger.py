"""Run logging: console lines or a progress bar, TensorBoard scalars, ``metrics.jsonl``."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Optional

from ..fileio import no_space_error
from .rundir import RunDir

__all__ = ["Progress", "RunLogger", "setup_logging"]

_logger = logging.getLogger("rednet")


def setup_logging(rank: int = 0) -> None:
    """Rank 0 logs INFO to stdout; other ranks only warnings, so a node's output stays readable."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A tqdm bar on a terminal; periodic plain log lines (with ETA) when output is a file or pipe.

    Args:
        total: steps in this epoch.
        initial: steps already done (mid-epoch resume).
        desc: prefix, e.g. ``epoch 3/130``.
        enabled: False on ranks other than 0.
        every: steps between plain lines.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True, every: int = 50):
        self.total, self.done, self.desc, self.enabled, self.every = total, initial, desc, enabled, every
        self.start_done, self.t0 = initial, time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)

    def update(self, postfix: dict[str, Any]) -> None:
        self.done += 1
        if not self.enabled:
            return
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.done % self.every == 0 or self.done == self.total:
            rate = (time.perf_counter() - self.t0) / max(1, self.done - self.start_done)
            _logger.info("%s step %d/%d %s eta %s", self.desc, self.done, self.total, text,
                         _fmt_time(rate * (self.total - self.done)))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunLogger:
    """TensorBoard scalars under ``run_dir/tb`` and one JSON line per epoch in ``run_dir/metrics.jsonl``.

    Only rank 0 writes; on other ranks every method is a no-op.

    Args:
        run_dir: the run directory (a path or a ``RunDir``).
        enabled: True on rank 0.
        purge_step: a resumed run's first step: TensorBoard hides the points an interrupted run
            logged from there on, which this run logs again.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, purge_step: Optional[int] = None):
        files = RunDir(run_dir)
        self.enabled = enabled
        self.tb: Optional[Any] = None
        self.jsonl_path = files.metrics
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(files.tensorboard), purge_step=purge_step)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a line cut short here is dropped, counted, by the next resume
            full = no_space_error(e, self.jsonl_path)
            if full is None:
                raise
            raise full from None
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
