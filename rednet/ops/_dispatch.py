"""Which involution backend runs: one ordered table, walked in one place, and the gate of the first contact.

``TABLE`` lists the backends in ``auto``'s order of preference, each with the device its
tensors live on and a ``can_run(device_type, device_index, dtype)`` that says why it
declines. ``choose_backend`` walks it: a forced backend must be able to run (else an error
says why, and how to undo the forcing), ``auto`` takes the first that can. A backend marked
``checked`` (the CUDA kernels) must then pass its first-contact check for the configuration
(``first_contact_passes``, see ``_selfcheck``) before the front door runs it.

Both are constants under ``torch.compile`` (``torch.compiler.assume_constant_result``):
their answers depend only on static facts (device, dtype, window, memory format, the forced
backend, the environment), so Dynamo runs them once while tracing, eagerly, and keeps the
answer instead of tracing CuPy, a compiler or the check into the graph. The forced backend
(``use_backend``) is an argument, which Dynamo guards on; the environment is read inside,
once per trace.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import _cpu, _cupy, _selfcheck

__all__ = ["BACKENDS", "ENV", "TABLE", "Backend", "choose_backend", "first_contact_passes", "kernel_for_device",
           "requested", "selfcheck_key"]

_logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "cupy", "native")
ENV = "REDNET_INVOLUTION_BACKEND"


class Backend(NamedTuple):
    """One row of the table.

    Args:
        name: as ``backend=``, ``use_backend`` and ``$REDNET_INVOLUTION_BACKEND`` spell it.
        device_type: the device of the tensors it is for; None for any.
        label: how log lines name it.
        can_run: ``(device_type, device_index, dtype) -> (ok, why not)``.
        checked: each configuration passes the first-contact check before it first runs.
        warns_when_declined: whether ``auto`` declining it for its own device is a surprise
            worth a warning (CuPy installed but unusable), not only a debug line.
    """

    name: str
    device_type: str | None
    label: str
    can_run: Callable[[str, int | None, torch.dtype], tuple[bool, str]]
    checked: bool
    warns_when_declined: Callable[[], bool]


# The module attributes are looked up at each call, so tests can stand in for CuPy or the compiler.
def _can_run_cupy(device_type: str, device_index: int | None, dtype: torch.dtype) -> tuple[bool, str]:
    return _cupy.can_run_on(device_type, device_index, dtype)


def _can_run_native(device_type: str, device_index: int | None, dtype: torch.dtype) -> tuple[bool, str]:
    return _cpu.can_run_on(device_type, dtype)


def _can_run_reference(device_type: str, device_index: int | None, dtype: torch.dtype) -> tuple[bool, str]:
    return True, "ok"


def _cupy_installed() -> bool:
    # Not installed at all is no surprise (CuPy is optional); installed and unusable is.
    return _cupy.installed()


def _never() -> bool:
    return False


TABLE = (
    Backend("cupy", "cuda", "CUDA kernel", _can_run_cupy, True, _cupy_installed),
    Backend("native", "cpu", "native CPU kernel", _can_run_native, False, _never),
    Backend("reference", None, "reference", _can_run_reference, False, _never),
)


def requested(backend: str | None, forced: str | None) -> tuple[str, str]:
    """The backend asked for (argument, else ``use_backend``, else the environment) and how to undo it."""
    if backend or not forced:
        backend = (backend or os.environ.get(ENV) or "auto").lower()
        if backend not in BACKENDS:
            raise ValueError(
                f"unknown involution backend {backend!r} (from argument or ${ENV}); choose one of {BACKENDS}")
        return backend, f"Unset ${ENV} or set it to 'reference'."
    return forced, "Force 'reference' or 'auto' with use_backend instead."


def _walk(device_type: str, device_index: int | None, dtype: torch.dtype, name: str,
          hint: str) -> tuple[str, list[tuple[Backend, str]]]:
    """The backend that runs when ``name`` is asked for, and the rows declined on the way."""
    declined = []
    for row in TABLE:
        if name not in ("auto", row.name):
            continue
        ok, why = row.can_run(device_type, device_index, dtype)
        if ok:
            return row.name, declined
        if name == row.name:
            raise RuntimeError(f"involution backend {row.name!r} was forced but cannot run: {why}. {hint}")
        declined.append((row, why))
    raise AssertionError("the reference runs everywhere")


@torch.compiler.assume_constant_result
def choose_backend(device_type: str, device_index: int | None, dtype: torch.dtype, backend: str | None,
                   forced: str | None) -> str:
    """``'reference'``, ``'cupy'`` or ``'native'`` for tensors of this device and dtype.

    Raises:
        RuntimeError: the forced backend cannot run (why, and how to undo the forcing).
        ValueError: an unknown backend name.
    """
    name, declined = _walk(device_type, device_index, dtype, *requested(backend, forced))
    for row, why in declined:
        if row.device_type != device_type:
            continue  # not a kernel for these tensors: its declining says nothing
        if row.warns_when_declined():
            _selfcheck.warn_unavailable(torch.device(device_type, device_index), why)
        _logger.debug("involution: %s declined: %s", row.label, why)
    if name != "reference":
        from . import _custom_op  # noqa: F401  (registers rednet::involution before it is traced or called)
    return name


def kernel_for_device(device_type: str, device_index: int | None, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the kernel meant for tensors of this device can run on them, and if not, why.

    On a device no kernel is meant for, the answer of the first one in the table.
    """
    rows = [row for row in TABLE if row.device_type == device_type] or [TABLE[0]]
    return rows[0].can_run(device_type, device_index, dtype)


def selfcheck_key(device_type: str, device_index: int | None, dtype: torch.dtype, kernel_size: int, stride: int,
                  dilation: int, memory_format: str) -> _selfcheck.Key:
    """The first-contact check's key; ``'cuda'`` without an index means the current device."""
    if device_type == "cuda" and device_index is None:
        device_index = torch.cuda.current_device()
    return _selfcheck.Key(torch.device(device_type, device_index), dtype, kernel_size, stride, dilation, memory_format)


@torch.compiler.assume_constant_result
def first_contact_passes(device_type: str, device_index: int | None, dtype: torch.dtype, backend: str | None,
                         forced: str | None, kernel_size: int, stride: int, dilation: int, memory_format: str) -> bool:
    """Whether the kernel passed its first-contact check for this configuration (running it once).

    On failure ``auto`` warns once and answers False; a forced ``cupy`` raises with the cause,
    as does a fault that leaves the device unusable (nothing can run there any more). Like
    ``choose_backend`` a constant under ``torch.compile``: the check runs while tracing, on
    its own small tensors, and never becomes part of a graph.
    """
    key = selfcheck_key(device_type, device_index, dtype, kernel_size, stride, dilation, memory_format)
    check = _selfcheck.verdict(key)
    if check.ok:
        return True
    name, hint = requested(backend, forced)
    if name != "auto" or check.stage == "context":  # forced (only this backend reaches here forced), or dead device
        hint = f" {hint}" if name != "auto" else ""
        raise RuntimeError(f"involution: {_selfcheck.describe(key, check)}.{hint} {_selfcheck.REPORT_HINT}")
    _selfcheck.warn_once(key, check)
    return False
