"""Checkpoint I/O: atomic writes with the digest inside the file, integrity checks, run-directory housekeeping,
model loading.

A training checkpoint is a dict of plain data and tensors, so ``torch.load(path,
weights_only=True)`` reads it without executing pickled code:

    format      "rednet-train/2"
    config      the resolved config (nested dicts of str/numbers/lists)
    model       the model's state_dict (unwrapped: no DDP ``module.`` / compile prefixes)
    ema         the EMA model's state_dict, or None
    optimizer, scheduler, scaler   their state_dicts (scaler None without fp16; best.pt has no optimizer)
    epoch, iteration   the epoch in progress and the optimizer steps done in it
                       (iteration 0: the epoch has not started)
    global_step        optimizer steps since the start of training
    rng                one entry per rank: RNG states of python, numpy, torch (CPU and CUDA)
    world_size, best_top1, metrics   bookkeeping

The file is the zip archive ``torch.save`` writes, whose zip comment (the last bytes of
the file, which zip readers and ``torch.load`` skip) is ``rednet-sha256:<hex>``: the
sha256 of every byte before it. ``torch.load`` alone does not notice flipped bytes inside
tensor data, so ``read_checkpoint`` checks the digest first. Because the digest travels
inside the file, one atomic rename publishes a checkpoint and its digest together: after
a kill at any instant a name holds the complete old file or the complete new one, and
either can be verified from the file alone. A file without the digest is refused, except
a ``rednet-train/1`` checkpoint with its ``.sha256`` sidecar (what earlier versions wrote).
``last.pt`` is a hard link to the newest rolling checkpoint.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Union

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
    "remove_orphaned_temp_files",
    "restore_rng_state",
    "save_checkpoint",
    "scan_checkpoints",
    "verify_checkpoint_file",
]

_logger = logging.getLogger(__name__)

FORMAT = "rednet-train/2"
_LEGACY_FORMAT = "rednet-train/1"  # digest in a .sha256 sidecar; one RNG state for all ranks
LAST = "last.pt"
_ROLLING = re.compile(r"^checkpoint-(\d+)\.pt$")
# Temporary files of interrupted writes in a run directory: fileio.atomic_write's
# ".<name>.<random>.tmp" for the files the trainer writes, and last.pt's link in the making.
_ORPHAN = re.compile(r"^\.(checkpoint-\d+\.pt|best\.pt|last\.pt|metrics\.jsonl|config\.yaml)\.[^/]*\.tmp$"
                     r"|^\.last\.pt\.link$")

# The zip end-of-central-directory record: 22 bytes, the last two its comment's length.
_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_SIZE = 22
_DIGEST_TAG = b"rednet-sha256:"
_DIGEST_COMMENT_SIZE = len(_DIGEST_TAG) + 64


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class _DigestWriter:
    """The file object ``torch.save`` writes to: hashes and forwards its bytes, holding back the last 22.

    Those are the zip's end record; ``finish`` sets its comment length, then appends the
    comment holding the digest of everything before it.
    """

    def __init__(self, f: BinaryIO):
        self._f, self._sha, self._held = f, hashlib.sha256(), b""

    def _emit(self, data: Union[bytes, memoryview]) -> None:
        self._sha.update(data)
        self._f.write(data)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= _EOCD_SIZE:
            self._emit(self._held)
            self._emit(view[:-_EOCD_SIZE])
            self._held = bytes(view[-_EOCD_SIZE:])
        else:
            joined = self._held + bytes(view)
            self._emit(joined[:-_EOCD_SIZE])
            self._held = joined[-_EOCD_SIZE:]
        return len(view)

    def flush(self) -> None:
        self._f.flush()

    def finish(self) -> None:
        end = self._held
        if len(end) != _EOCD_SIZE or not end.startswith(_EOCD_SIGNATURE) or end[-2:] != b"\0\0":
            raise RuntimeError("torch.save did not end its file with a zip end record without a comment")
        self._emit(end[:-2] + struct.pack("<H", _DIGEST_COMMENT_SIZE))
        self._f.write(_DIGEST_TAG + self._sha.hexdigest().encode())


def _write_with_digest(state: dict[str, Any], f: BinaryIO) -> None:
    writer = _DigestWriter(f)
    torch.save(state, writer)
    writer.finish()


def save_checkpoint(state: dict[str, Any], path: str | Path, *, link_last: bool = False) -> Path:
    """Write ``state`` atomically (temporary file, fsync, rename) with its sha256 inside the file.

    Args:
        state: the checkpoint's contents (``format`` is added).
        path: where to write it.
        link_last: also make ``last.pt`` in the same folder this checkpoint: a hard link, so it
            costs no second write and survives pruning; a copy where the file system has no hard
            links. Either way it replaces the old ``last.pt`` in one rename.
    """
    path = Path(path)
    stored = {"format": FORMAT, **state}
    atomic_write(path, lambda f: _write_with_digest(stored, f))
    _sidecar(path).unlink(missing_ok=True)  # an earlier version's sidecar would describe the old file
    if link_last:
        _link_last(path, stored)
    return path


def _link_last(path: Path, state: dict[str, Any]) -> None:
    last = path.with_name(LAST)
    tmp = path.with_name(f".{LAST}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links on this file system
        atomic_write(last, lambda f: _write_with_digest(state, f))
    else:
        os.replace(tmp, last)
    _sidecar(last).unlink(missing_ok=True)


def _embedded_digest(path: Path) -> tuple[str, int] | None:
    """The digest a checkpoint carries and how many leading bytes it covers, or None without one."""
    size = path.stat().st_size
    tail_size = _EOCD_SIZE + _DIGEST_COMMENT_SIZE
    if size < tail_size:
        return None
    with open(path, "rb") as f:
        f.seek(size - tail_size)
        tail = f.read(tail_size)
    end, comment = tail[:_EOCD_SIZE], tail[_EOCD_SIZE:]
    if (not end.startswith(_EOCD_SIGNATURE) or struct.unpack("<H", end[-2:])[0] != _DIGEST_COMMENT_SIZE
            or not comment.startswith(_DIGEST_TAG)):
        return None
    return comment[len(_DIGEST_TAG):].decode("ascii", "replace"), size - _DIGEST_COMMENT_SIZE


def _sha256_prefix(path: Path, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while length > 0:
            chunk = f.read(min(1 << 20, length))
            if not chunk:
                break
            h.update(chunk)
            length -= len(chunk)
    return h.hexdigest()


def verify_checkpoint_file(path: str | Path) -> bool:
    """Check a checkpoint's bytes against its digest; True if it is a legacy file verified by its sidecar.

    Raises:
        CheckpointError: missing, truncated, damaged, or without a digest.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    found = _embedded_digest(path)
    if found is not None:
        expected, covered = found
        actual = _sha256_prefix(path, covered)
        if actual != expected:
            raise CheckpointError(f"checkpoint {path} is corrupt: the sha256 of its contents {actual[:12]}... does "
                                  f"not match the digest stored in it ({expected[:12]}...)")
        return False
    side = _sidecar(path)
    if not side.is_file():
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt, or not a training checkpoint: it does not end with the "
            "sha256 digest every checkpoint carries (and has no .sha256 file beside it, as earlier versions wrote)"
        )
    text = side.read_text().split()
    expected, actual = (text[0] if text else ""), file_sha256(path)
    if expected != actual:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: its sha256 {actual[:12]}... does not "
                              f"match {side.name} ({expected[:12]}...)")
    return True


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a training checkpoint; ``CheckpointError`` says what is wrong with it."""
    path = Path(path)
    legacy = verify_checkpoint_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle errors come in many types; all mean the same here
        # Not torch's own text: it advises weights_only=False, which is never the fix here.
        why = "not a torch checkpoint" if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {e}"[:200]
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read ({why})") from e
    expected = _LEGACY_FORMAT if legacy else FORMAT
    if not isinstance(state, dict) or state.get("format") != expected or "model" not in state \
            or "config" not in state:
        raise CheckpointError(
            f"{path} is not a RedNet training checkpoint (expected a dict with format {expected!r}, 'model' and "
            "'config')"
        )
    return state


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The rolling checkpoints of a run directory, newest (highest step) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _ROLLING.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def scan_checkpoints(run_dir: str | Path, map_location: str | torch.device = "cpu"
                     ) -> Iterator[tuple[Path, dict[str, Any] | CheckpointError]]:
    """Each candidate to resume from, newest first, read: its state, or the error that makes it unusable.

    The rolling checkpoints, then ``last.pt`` when it is not a link to one of them (a copy, or
    the only file left). The caller decides which one fits; reading stops when it stops iterating.
    """
    run_dir = Path(run_dir)
    candidates = list_checkpoints(run_dir)
    last = run_dir / LAST
    if last.is_file() and not any(last.samefile(p) for p in candidates):
        candidates.append(last)
    for path in candidates:
        try:
            yield path, read_checkpoint(path, map_location)
        except CheckpointError as e:
            yield path, e


def find_resume_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """The newest readable checkpoint in ``run_dir`` and its state, skipping (and reporting) bad ones."""
    for path, state in scan_checkpoints(run_dir, map_location):
        if isinstance(state, CheckpointError):
            _logger.warning("resume: skipping %s; trying the previous one", state)
            continue
        return path, state
    return None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` rolling checkpoints (and any sidecars of earlier versions)."""
    for path in list_checkpoints(run_dir)[keep:]:
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)


def remove_orphaned_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files interrupted writes left in a run directory; returns what was removed.

    Only call this while no other process writes to ``run_dir``: the trainer does at start, before
    the first write of the run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed, size = [], 0
    for p in run_dir.iterdir():
        if _ORPHAN.match(p.name) and p.is_file():
            size += p.stat().st_size
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        _logger.info("removed %d temporary file(s) (%.1f MB) that interrupted writes left in %s: %s", len(removed),
                     size / 2**20, run_dir, ", ".join(p.name for p in removed))
    return removed


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
    from .config_data import config_from_dict

    state = read_checkpoint(path, map_location)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg, pretrained=False)
    weights = state["ema"] if cfg.train.eval_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    model.to(map_location).eval()
    return model, state["config"]
