"""The CUDA kernels' first-contact check for a model: run before the first step, one verdict for every rank.

``rednet.ops`` checks the CUDA kernel lazily, per configuration (device, dtype, window, memory
format), in each process on its own. In a job of several processes a verdict that differs
between ranks would let one rank fall back to the reference alone and hold every collective
of the job to its pace, and a rank whose device died would leave the others waiting in NCCL
for it (30 minutes by default). So before the first step the trainer calls
``check_kernels``, on every rank:

1. the configurations the model's involution layers run with are found from one forward
   pass of one zero image on the reference backend (forward pre-hooks; eval mode, no
   gradients, the run's image size, precision and memory format);
2. each is checked on this rank (``rednet.ops.check_cuda_kernel``), or fails with the reason
   when this rank cannot run the CUDA kernel at all;
3. the ranks exchange their verdicts in one collective, on a gloo group of its own created
   before the checks (on the CPU: a dead GPU cannot block it), whose timeout bounds the wait
   for a rank that hangs;
4. a configuration that failed on any rank is declined on every other
   (``rednet.ops.decline_cuda_kernel``): all run the reference for it and each warns once
   (``KernelCheckWarning``); a device left unusable on any rank, or an error while checking,
   stops every rank at once with an error that names the rank.

The collective is issued once per run, on every rank, eagerly, before the model is wrapped,
compiled or captured: the forward never holds a collective of this check, and
``torch.compile`` and CUDA graphs meet settled verdicts only.

Timeout (``$REDNET_KERNEL_CHECK_TIMEOUT``, default 120 s): only a rank that hangs inside its
check (a kernel that never returns) is waited for this long; a failed check, a dead device or
a crashed rank ends the exchange at once. The ranks reach it at nearly the same time, so it
must cover the difference in their checking times: at most a cold compile of the modules (one
per dtype and window: three for RedNet in one precision; NVRTC took 1.8-4.9 s per module on
one core of the development machine, 11 s for the three) plus the checks themselves (a few
launches on tiny inputs each). 120 s is ten times that, against NCCL's 30 minutes.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..layers import Involution
from ..ops import KernelCheck, check_cuda_kernel, decline_cuda_kernel, describe_backend, memory_format_of, use_backend
from .builder import autocast_dtype
from .config import Config
from .distributed import DistInfo

__all__ = ["DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "KernelConfig", "check_kernels", "involution_configs"]

_logger = logging.getLogger("rednet")

TIMEOUT_ENV = "REDNET_KERNEL_CHECK_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelConfig(NamedTuple):
    """What one first-contact check covers, besides the device."""

    dtype: torch.dtype
    kernel_size: int
    stride: int
    dilation: int
    memory_format: str  # 'nchw' or 'nhwc'

    def __str__(self) -> str:
        return (f"{str(self.dtype).removeprefix('torch.')} K={self.kernel_size} stride={self.stride} "
                f"dilation={self.dilation} {self.memory_format}")


@torch.no_grad()
def involution_configs(model: nn.Module, device: torch.device, img_size: int, in_chans: int,
                       amp_dtype: Optional[torch.dtype], channels_last: bool) -> list[KernelConfig]:
    """The configurations ``model``'s involution layers run with on ``device``, in call order.

    Found from one forward pass of one zero image on the reference backend, in eval mode (its
    training mode is restored), under the run's autocast and memory format: the dtype is the
    one the operator casts to under autocast, the memory format that of each layer's input.

    Args:
        model: the network, on ``device``.
        device: where it runs.
        img_size / in_chans: the input the run feeds it.
        amp_dtype: the autocast dtype, or None for none.
        channels_last: the run's input memory format.
    """
    seen: dict[KernelConfig, None] = {}

    def record(module: Involution, args: tuple) -> None:
        x = args[0]
        dtype = amp_dtype if amp_dtype is not None and x.dtype in _AUTOCAST_DTYPES else x.dtype
        seen[KernelConfig(dtype, module.kernel_size, module.stride, 1, memory_format_of(x))] = None

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, Involution)]
    was_training = model.training
    image = torch.zeros(1, in_chans, img_size, img_size, device=device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    try:
        model.eval()
        with use_backend("reference"), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                      enabled=amp_dtype is not None):
            model(image)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return list(seen)


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"${TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def _check_here(device: torch.device, config: KernelConfig) -> KernelCheck:
    backend = describe_backend(device, config.dtype)
    if backend != "cupy":  # no CUDA kernel on this rank for it (none usable, or another backend forced)
        return KernelCheck(False, "unavailable", f"the CUDA kernel does not run there: {backend}", 0.0)
    return check_cuda_kernel(device, config.dtype, config.kernel_size, config.stride, config.dilation,
                             config.memory_format)


def _exchange(mine: object, group, timeout_s: float, rank: int) -> list:
    """Every rank's ``mine``, by rank; a clear error when a rank does not answer within the timeout."""
    out: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(out, mine, group=group)
    except RuntimeError as e:  # gloo: a timeout, or a rank that crashed or exited
        raise RuntimeError(
            f"rank {rank}: the CUDA involution kernel check of another rank did not answer within {timeout_s:g} s "
            f"({str(e).splitlines()[0][:300]}). A rank may hang in a kernel or have died: see its log. "
            f"${TIMEOUT_ENV} sets the wait; REDNET_INVOLUTION_BACKEND=reference trains without the CUDA kernels"
        ) from e
    return out


def check_kernels(model: nn.Module, cfg: Config, dist_info: DistInfo) -> Optional[list[tuple[KernelConfig, bool]]]:
    """Check the CUDA kernel for every configuration ``model`` runs with, and agree on the verdicts across ranks.

    A no-op (None) for a model without involution layers, or where no CUDA kernel is in play
    (a CPU run). Otherwise every rank must call it, at the same point: see the module's
    docstring for what happens then.

    Args:
        model: the unwrapped network, on ``dist_info.device``.
        cfg: the run config (image size, input channels, precision, memory format).
        dist_info: this process's place in the job.

    Returns:
        Each configuration and whether every rank runs the CUDA kernel for it.

    Raises:
        RuntimeError: a rank's device was left unusable by its check, a rank failed while
            checking, or a rank did not answer within the timeout; raised on every rank.
    """
    device = dist_info.device
    amp_dtype = autocast_dtype(cfg, device)
    if not any(isinstance(m, Involution) for m in model.modules()):
        return None
    # The same answer on every rank (a CUDA run, or a CPU run where tests stand in for CuPy), so
    # every rank or none reaches the collective.
    if device.type != "cuda" and describe_backend(device, amp_dtype or torch.float32) != "cupy":
        return None
    start = time.perf_counter()
    grouped = dist_info.distributed and dist.is_available() and dist.is_initialized()
    timeout_s = _timeout_s()
    # Created before the checks, while every rank is here: a rank that then hangs cannot hold up
    # the group's creation, only the exchange, which the timeout bounds.
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)) if grouped else None
    try:
        configs, error = [], None
        try:
            configs = involution_configs(model, device, cfg.data.img_size, cfg.model.in_chans, amp_dtype,
                                         cfg.train.channels_last)
            mine: object = [_check_here(device, c) for c in configs]
        except Exception as e:  # noqa: BLE001  (told to the other ranks, then raised here)
            error = e
            mine = f"{type(e).__name__}: {e}"
        everyone = _exchange(mine, group, timeout_s, dist_info.rank) if grouped else [mine]
    finally:
        if group is not None:
            dist.destroy_process_group(group)
    if error is not None:
        raise error
    crashed = [(r, v) for r, v in enumerate(everyone) if isinstance(v, str)]
    if crashed:
        r, why = crashed[0]
        raise RuntimeError(f"rank {r} failed while checking the CUDA involution kernel ({why[:500]}); every rank "
                           "stops here rather than wait for it")
    dead = [(r, c, v) for r, checks in enumerate(everyone) for c, v in zip(configs, checks) if v.stage == "context"]
    if dead:
        r, c, v = dead[0]
        raise RuntimeError(
            f"the CUDA involution kernel check for {c} left the device of rank {r} unusable ({v.cause[:500]}); every "
            "rank stops here rather than wait for it. REDNET_INVOLUTION_BACKEND=reference trains without the CUDA "
            "kernels; please report it with the output of `python tools/benchmark.py selfcheck` on that machine")
    result = []
    for i, c in enumerate(configs):
        failed = [(r, checks[i]) for r, checks in enumerate(everyone) if not checks[i].ok]
        if failed and everyone[dist_info.rank][i].ok:
            r, v = failed[0]
            decline_cuda_kernel(device, c.dtype, c.kernel_size, c.stride, c.dilation, c.memory_format,
                                f"rank {r} of {len(everyone)} failed its first-contact check at the {v.stage} stage "
                                f"({v.cause[:300]}), so every rank uses the reference for it")
        result.append((c, not failed))
    if dist_info.is_main:
        agreed = sum(ok for _, ok in result)
        world = len(everyone)
        _logger.info("CUDA kernel check: %d of %d configurations run the CUDA kernel (%d process%s, %.1f s)%s",
                     agreed, len(result), world, "es" if world > 1 else "", time.perf_counter() - start,
                     "".join(f"; {c}: the reference" for c, ok in result if not ok))
    return result
