"""The training checkpoint file: its contents, its atomic write with the digest inside, its integrity check.

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
    epoch_meter        one entry per rank: the running totals of the epoch in progress (loss sum,
                       steps, images, loader wait, time), or None at an epoch's end; optional
    world_size, best_top1, metrics   bookkeeping
    classes            the training set's class names by label (a list of str; absent in checkpoints
                       written before they were stored), checked by a resume and by an evaluation

The file is the zip archive ``torch.save`` writes, whose zip comment (the last bytes of
the file, which zip readers and ``torch.load`` skip) is ``rednet-sha256:<hex>``: the
sha256 of every byte before it. ``torch.load`` alone does not notice flipped bytes inside
tensor data, so ``read_checkpoint`` checks the digest first. Because the digest travels
inside the file, one atomic rename publishes a checkpoint and its digest together: after
a kill at any instant a name holds the complete old file or the complete new one, and
either can be verified from the file alone. A file without the digest is refused, except
a ``rednet-train/1`` checkpoint with its ``.sha256`` sidecar (what earlier versions wrote).

What the files of a run directory are called, and which of them are kept, is ``rundir.py``'s;
rebuilding a model from a checkpoint is ``builder.load_model_from_checkpoint``.
"""
from __future__ import annotations

import hashlib
import pickle
import random
import struct
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
import torch

from ..fileio import CheckpointError, atomic_write, file_sha256

__all__ = [
    "FORMAT",
    "SIDECAR_SUFFIX",
    "CheckpointError",
    "capture_rng_state",
    "read_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "sidecar",
    "verify_checkpoint_file",
]

FORMAT = "rednet-train/2"
_LEGACY_FORMAT = "rednet-train/1"  # digest in a .sha256 sidecar; one RNG state for all ranks
SIDECAR_SUFFIX = ".sha256"

# The zip end-of-central-directory record: 22 bytes, the last two its comment's length.
_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_SIZE = 22
_DIGEST_TAG = b"rednet-sha256:"
_DIGEST_COMMENT_SIZE = len(_DIGEST_TAG) + 64


def sidecar(path: Path) -> Path:
    """The ``.sha256`` file beside a checkpoint that held its digest in earlier versions (``rednet-train/1``)."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


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


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically (temporary file, fsync, rename) with its sha256 inside the file.

    Args:
        state: the checkpoint's contents (``format`` is added).
        path: where to write it.
    """
    path = Path(path)
    stored = {"format": FORMAT, **state}
    atomic_write(path, lambda f: _write_with_digest(stored, f))
    sidecar(path).unlink(missing_ok=True)  # an earlier version's sidecar would describe the old file
    return path


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
        CheckpointError: missing, unreadable (permissions), truncated, damaged, or without a digest.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return _verify(path)
    except OSError as e:  # a file this user may not read (permissions), or an I/O error
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None


def _verify(path: Path) -> bool:
    found = _embedded_digest(path)
    if found is not None:
        expected, covered = found
        actual = _sha256_prefix(path, covered)
        if actual != expected:
            raise CheckpointError(f"checkpoint {path} is corrupt: the sha256 of its contents {actual[:12]}... does "
                                  f"not match the digest stored in it ({expected[:12]}...)")
        return False
    side = sidecar(path)
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
