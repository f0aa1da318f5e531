"""Training steps checked on the device and read every few steps: no host synchronisation per step on CUDA.

Reading a loss or a flag on the host (``.item()``, ``.tolist()``) makes the CPU wait until the
GPU has finished everything queued so far, so the next step's kernels are not queued while
this one runs. Here the checks of a step stay on the device, the optimizer step is undone there
when they fail, and the host reads them every ``train.log_every`` steps, before a checkpoint and
at the end of an epoch:

- ``StepGuard`` keeps a copy of the training state (parameters, buffers, optimizer state) taken
  before the forward pass, and after the optimizer step keeps either the new or the saved values,
  selected on the device by a boolean tensor.
- ``DeferredChecks`` carries a step's non-finite flag and the stop flag (all-reduced over the
  ranks as a device tensor, so every rank reads the same values at the same step), counts the
  good steps since the last read, and at a read raises ``NonFiniteLossError`` naming the first
  bad step, with the step counters and the learning-rate schedule put back to it.

Once a loss is non-finite every later step is skipped too, so the weights at the read are
those after the last good step, and the last checkpoint, written at a read, never holds more.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import torch
import torch.nn as nn

from .distributed import all_reduce

__all__ = ["DeferredChecks", "NonFiniteLossError", "StepGuard"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops without its optimizer step."""


class StepGuard:
    """Undo an optimizer step on the device.

    ``snapshot()`` copies the parameters, the buffers (BatchNorm statistics, which the forward
    pass changes) and the optimizer state on the device into one flat tensor per dtype and
    device; ``keep_if(ok)`` keeps the values the step wrote where ``ok`` (a 0-dim bool tensor) is
    true, else puts the copy back. State the step created (the first step's momentum) is zeroed
    instead, which for SGD and Adam is the state of no step taken. The cost is one copy of that
    state in memory and about three passes over it per step, in a few kernels per dtype.

    Tensors on another device than the model's, such as torch's non-capturable Adam step
    count (a CPU tensor), cannot be selected without a read; they keep their new value.

    Args:
        model: the model trained (DDP-wrapped or not: the parameters are the same tensors).
        optimizer: its optimizer.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self._saved: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def _tensors(self) -> list[torch.Tensor]:
        # The Parameter objects themselves: ``p.data`` is a new tensor object at every access.
        found = list(self.model.parameters()) + list(self.model.buffers())
        for state in self.optimizer.state.values():
            found += [v for v in state.values() if torch.is_tensor(v)]
        return found

    @staticmethod
    def _groups(tensors: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
        groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for t in tensors:
            groups[(t.dtype, t.device)].append(t)
        return groups

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the state before the step's forward pass."""
        self._saved = {key: (ts, torch.cat([t.reshape(-1) for t in ts]))
                       for key, ts in self._groups(self._tensors()).items()}

    @torch.no_grad()
    def keep_if(self, ok: torch.Tensor) -> None:
        """After the optimizer step: the new state where ``ok``, else the snapshot's."""
        saved_ids = {id(t) for ts, _ in self._saved.values() for t in ts}
        for (dtype, device), (ts, flat) in self._saved.items():
            if device != ok.device:
                continue
            kept = torch.where(ok, torch.cat([t.reshape(-1) for t in ts]), flat)
            torch._foreach_copy_(ts, [c.view(t.shape) for c, t in zip(kept.split([t.numel() for t in ts]), ts)])
        for t in self._tensors():
            if id(t) not in saved_ids and t.device == ok.device:
                t.copy_(torch.where(ok, t, torch.zeros((), dtype=t.dtype, device=t.device)))


class DeferredChecks:
    """A step's checks kept on the device until the next read (see the module's docstring).

    Args:
        model / optimizer: what ``StepGuard`` protects.
        device: where training runs.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.guard = StepGuard(model, optimizer)
        self.device = device
        self._bad = torch.zeros((), device=device)  # 1 once any rank saw a non-finite loss; stays 1
        self._stop = torch.zeros((), device=device)  # 1 once any rank was asked to stop
        self._good = torch.zeros((), device=device)  # good steps since the last read
        self._positions: list[tuple[int, int, int]] = []  # (epoch, iteration, global step) of each step since

    def check(self, loss: torch.Tensor, stop_requested: bool, position: tuple[int, int, int]) -> torch.Tensor:
        """Record one step's checks (one small all-reduce, no read); returns whether its update may be kept."""
        flags = torch.stack([(~torch.isfinite(loss)).float(), torch.full((), float(stop_requested),
                                                                         device=self.device)])
        all_reduce(flags, "max")
        self._bad = torch.maximum(self._bad, flags[0])
        self._stop = torch.maximum(self._stop, flags[1])
        self._good += 1 - self._bad
        self._positions.append(position)
        return self._bad == 0

    def read(self, scheduler: Any = None, state: Any = None) -> bool:
        """Read the checks since the last read (the one host synchronisation); returns whether to stop.

        Raises:
            NonFiniteLossError: a step's loss was not finite; ``state`` and ``scheduler`` are put back to
                that step, whose update and those after it were not applied.
        """
        if not self._positions:
            return False
        bad, stop, good = torch.stack([self._bad, self._stop, self._good]).tolist()
        positions, self._positions = self._positions, []
        self._good.zero_()
        if bad:
            epoch, iteration, global_step = positions[int(good)]
            if state is not None:
                state.iteration, state.global_step = iteration, global_step
            if scheduler is not None:
                _rewind_schedule(scheduler, global_step)
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch} iteration {iteration} (global step {global_step}); its optimizer "
                f"step and the {len(positions) - int(good) - 1} after it were skipped on the device, "
                "the last checkpoint is untouched")
        return bool(stop)


def _rewind_schedule(scheduler: Any, steps_done: int) -> None:
    """Put a ``LambdaLR`` back to ``steps_done`` steps (the learning rates follow)."""
    if not hasattr(scheduler, "lr_lambdas"):
        return
    scheduler.last_epoch = steps_done
    groups = scheduler.optimizer.param_groups
    for group, base, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(steps_done)
    scheduler._last_lr = [g["lr"] for g in groups]


def scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
    """After ``scaler.unscale_(optimizer)``: 1 where fp16 gradients overflowed (a normal skip, not an error)."""
    # GradScaler keeps this per optimizer; its own step() reads it on the host, which is what we avoid.
    found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    return sum(v.to(next(iter(found.values())).device) for v in found.values()) if found else None
