"""Checkpoint I/O: atomic writes, integrity checks, resume discovery, model loading.

A training checkpoint is a dict of plain data and tensors, so ``torch.load(path,
weights_only=True)`` reads it without executing pickled code:

    format      "rednet-train/1"
    config      the resolved config (nested dicts of str/numbers/lists)
    model       the model's state_dict (unwrapped: no DDP ``module.`` / compile prefixes)
    ema         the EMA model's state_dict, or None
    optimizer, scheduler, scaler   their state_dicts (scaler None without fp16)
    epoch, iteration   the epoch in progress and the optimizer steps done in it
                       (iteration 0: the epoch has not started)
    global_step        optimizer steps since the start of training
    rng                RNG states of python, numpy, torch (CPU and CUDA) as tensors/lists
    best_top1, metrics bookkeeping

Each file is written to a temporary name, fsynced and renamed, then a ``.sha256``
sidecar is written the same way; reading verifies the sidecar when it exists, because
``torch.load`` does not notice flipped bytes inside tensor data. ``last.pt`` (with its
sidecar) names the newest rolling checkpoint of a run directory.
"""
from __future__ import annotations

import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..fileio import CheckpointError, atomic_write, file_sha256

__all__ = [
    "FORMAT",
    "LAST",
    "CheckpointError",
    "capture_rng_state",
    "find_resume_checkpoint",
    "list_checkpoints",
    "load_model_from_checkpoint",
    "prune_checkpoints",
    "read_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

_logger = logging.getLogger(__name__)

FORMAT = "rednet-train/1"
LAST = "last.pt"
_ROLLING = re.compile(r"^checkpoint-(\d+)\.pt$")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(state: dict[str, Any], path: str | Path, *, link_last: bool = False) -> Path:
    """Write ``state`` atomically (temporary file, fsync, rename) plus its sha256 sidecar.

    Args:
        state: the checkpoint's contents (``format`` is added).
        path: where to write it.
        link_last: also make ``last.pt`` (and its sidecar) in the same folder this checkpoint: a
            hard link, so it costs no second write and survives pruning; a copy where the file
            system has no hard links.
    """
    path = Path(path)
    stored = {"format": FORMAT, **state}
    atomic_write(path, lambda f: torch.save(stored, f))
    digest = file_sha256(path)
    atomic_write(_sidecar(path), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    if link_last:
        _link_last(path, state)
    return path


def _link_last(path: Path, state: dict[str, Any]) -> None:
    last = path.with_name(LAST)
    tmp = path.with_name(f".{LAST}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
        os.replace(tmp, last)
        _sidecar(last).write_text(_sidecar(path).read_text())
    except OSError:  # no hard links on this file system
        save_checkpoint(state, last)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a training checkpoint; ``CheckpointError`` says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    side = _sidecar(path)
    if side.is_file():
        expected = side.read_text().split()[0] if side.read_text().strip() else ""
        actual = file_sha256(path)
        if expected != actual:
            raise CheckpointError(
                f"checkpoint {path} is corrupt or truncated: its sha256 {actual[:12]}... does not match "
                f"{side.name} ({expected[:12]}...)"
            )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle errors come in many types; all mean the same here
        # Not torch's own text: it advises weights_only=False, which is never the fix here.
        why = "not a torch checkpoint" if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {e}"[:200]
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read ({why})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state or "config" not in state:
        raise CheckpointError(
            f"{path} is not a RedNet training checkpoint (expected a dict with format {FORMAT!r}, 'model' and 'config')"
        )
    return state


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The rolling checkpoints of a run directory, newest (highest step) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _ROLLING.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resume_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """The newest readable checkpoint in ``run_dir`` and its state, skipping (and reporting) bad ones."""
    for path in list_checkpoints(run_dir):
        try:
            return path, read_checkpoint(path, map_location)
        except CheckpointError as e:
            _logger.warning("resume: skipping %s; trying the previous one", e)
    return None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` rolling checkpoints (and their sidecars)."""
    for path in list_checkpoints(run_dir)[keep:]:
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain lists (``weights_only``-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model_from_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the trained network from a training checkpoint, weights loaded, in eval mode.

    The architecture comes from the checkpoint's stored config (``model.name``,
    ``num_classes``, ``in_chans``, ``kwargs``); pretrained weights are not fetched. The
    weights are the main model's, except when the run evaluated its EMA
    (``train.eval_ema: true``), in which case the EMA weights are the ones it validated
    and reported, and those are returned.

    Args:
        path: a ``checkpoint-*.pt``, ``best.pt`` or ``last.pt`` written by the trainer.
        map_location: where the tensors are loaded.

    Returns:
        ``(model, config)``: the model on ``map_location`` and the resolved config as a plain dict.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt or not a training checkpoint.
    """
    from .builder import build_model  # builder imports rednet.models; keep this module light
    from .config import config_from_dict

    state = read_checkpoint(path, map_location)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg, pretrained=False)
    weights = state["ema"] if cfg.train.eval_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    model.to(map_location).eval()
    return model, state["config"]
