"""Stop signals: the handler that turns the first SIGINT, SIGTERM, SIGUSR1 or SIGHUP into a stop
request (``StopSignals``), and the loader workers that ignore them (``shield_workers``).

SIGINT, SIGTERM, SIGUSR1 (SLURM's ``--signal=USR1@N``) and SIGHUP each ask the run to stop; the
trainer checkpoints and raises ``TrainingInterrupted``. A second signal acts at once, without a
checkpoint. The loader workers ignore all four, but for a SIGTERM from the trainer itself: a
scheduler signals the whole process group, and a worker that died of it would take the run down
before its checkpoint, while torch and multiprocessing end a worker that does not stop by itself
with their own SIGTERM (``terminate()``), and would wait for it for ever.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import threading
from typing import Any, Callable, Optional

from torch.utils.data import DataLoader

__all__ = ["StopSignals", "shield_workers"]

_logger = logging.getLogger("rednet")


# What asks a run to checkpoint and stop: Ctrl-C, kill / scancel / a time limit, SLURM's
# --signal=USR1@N warning, a closed terminal. (SIGUSR1 and SIGHUP do not exist on Windows.)
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP")
                      if hasattr(signal, name))


class StopSignals:
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


def shield_workers(loader: DataLoader) -> None:
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

