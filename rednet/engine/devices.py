"""That the device a command or run names is here, and that ``$REDNET_INVOLUTION_BACKEND`` can run on it:
checked as it starts, not at the first forward pass, after the data and the model were loaded."""
from __future__ import annotations

import os

import torch

from ..ops import BACKEND_ENV, BACKENDS, select_backend
from .config import ConfigError

__all__ = ["check_device", "check_involution_backend"]


def check_device(device: str) -> None:
    """A ConfigError when ``device`` (``train.device``) is ``cuda`` and torch sees no CUDA device, or when
    ``$REDNET_INVOLUTION_BACKEND`` cannot run on the device the run will use (``check_involution_backend``)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but torch sees no CUDA device here; use 'auto' or 'cpu'")
    check_involution_backend("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available())
                             else "cpu")


def check_involution_backend(device: torch.device | str) -> None:
    """A ConfigError when ``$REDNET_INVOLUTION_BACKEND`` names no backend, or forces one that cannot run on ``device``.

    Called as a command starts: otherwise the first forward pass raises, after the data and the
    model were loaded. Forcing ``native`` builds the native kernel here (seconds, once per machine).

    Args:
        device: where the involutions will run (present: check a CUDA device's presence first);
            on ``meta`` (shapes only) only the name is checked.
    """
    value = os.environ.get(BACKEND_ENV, "")
    if not value:
        return
    if value.lower() not in BACKENDS:
        raise ConfigError(f"${BACKEND_ENV}={value!r} is not an involution backend; set it to one of "
                          f"{', '.join(BACKENDS)}, or unset it")
    device = torch.device(device)
    if device.type == "meta":
        return
    try:  # the dispatch table's answer for this device, as the first forward pass will get it
        select_backend(torch.empty(0, device=device))
    except RuntimeError as e:
        raise ConfigError(f"${BACKEND_ENV}={value}: {e} (it takes {', '.join(BACKENDS)})") from None
