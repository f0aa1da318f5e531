"""Weights containers: which one a file is, from its first bytes, and a reader for each.

* safetensors: an 8-byte little-endian header length, then a JSON object;
* torch: a zip (``PK\\x03\\x04``) or the legacy pickle ``torch.save`` wrote before 1.6,
  read with ``torch.load(weights_only=True)``;
* pickle: a plain Python pickle (``\\x80`` protocol byte), the PaddleClas ``.pdparams``,
  read with the restricted unpickler of ``_unpickler``.

The readers return the state dict as stored, in whichever key layout it uses; nothing
here executes code from a file. A truncated or corrupt file is a ``CheckpointError``
naming it and saying how to get a good copy.

Nor does a small file get to allocate a large amount of memory: sizes a file declares are
checked against its size on disk before anything is allocated. safetensors checks its
header's offsets itself; a zip's entries may unpack to only a few times the file (torch
stores them uncompressed); a pickle's arrays are bounded by the unpickler.
"""
from __future__ import annotations

import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..fileio import CheckpointError
from ._cache import cache_dir
from ._layouts import format_keys
from ._unpickler import RefusedArray, RefusedGlobal, load_arrays

__all__ = ["RawWeights", "read_raw"]

_logger = logging.getLogger(__name__)

# torch.save's legacy (non-zip) format starts with its magic number pickled as a LONG1.
_TORCH_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]

# torch.save stores a zip's entries uncompressed, so they unpack to the file's own size. A zip
# re-packed with deflate may be somewhat smaller than its content; one whose entries claim
# far more (a 1 MB file unpacking to 1 GiB) is a decompression bomb, refused before torch.load.
_ZIP_MAX_INFLATION = 4
_ZIP_SLACK = 16 << 20


class RawWeights(NamedTuple):
    """A state dict as stored in its file, before any renaming.

    Attributes:
        container: ``'safetensors'``, ``'torch'`` or ``'pickle'``.
        state_dict: the tensors under the file's own key names.
        metadata: the safetensors header's metadata; empty for other containers.
        dropped: entries beside the weights that were left out (``meta``, Paddle's name table).
    """

    container: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
    dropped: list[str]


def read_raw(path: Path) -> RawWeights:
    """Read the state dict in ``path``, whatever its container.

    Raises:
        CheckpointError: the file is truncated, corrupt, unsafe, or holds no state dict.
    """
    container = _sniff_container(path)
    if container == "safetensors":
        sd, metadata = _read_safetensors(path)
        return RawWeights(container, sd, metadata, [])
    if container == "torch":
        sd, dropped = _unwrap(_read_torch(path), path)
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{path}: the state dict holds non-tensor entries: {format_keys(bad)}")
        return RawWeights(container, sd, {}, dropped)
    sd, dropped = _arrays_to_tensors(_read_pickle(path), path)
    return RawWeights(container, sd, {}, dropped)


def _sniff_container(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 8:
            raise CheckpointError(f"{path}: only {size} bytes, not a checkpoint. " + _redownload_hint(path))
        if head.startswith(b"PK\x03\x04") or head.startswith(_TORCH_LEGACY_MAGIC):
            return "torch"
        n = int.from_bytes(head[:8], "little")
        looks_pickle = head[0] == 0x80 and 2 <= head[1] <= 5
        if head[8:9] == b"{":
            if 8 + n <= size:
                f.seek(8)
                try:
                    if isinstance(json.loads(f.read(n)), dict):
                        return "safetensors"
                except ValueError:
                    pass
            # A pickle's opening bytes can look like a header length followed by "{".
            if not looks_pickle:
                raise CheckpointError(
                    f"{path}: safetensors header ({n} bytes claimed, file has {size}) is truncated or corrupt. "
                    + _redownload_hint(path)
                )
    if looks_pickle:
        return "pickle"
    raise CheckpointError(
        f"{path}: unrecognised format (first bytes {head[:8]!r}); expected safetensors, a torch .pth "
        "or a PaddleClas .pdparams pickle. " + _redownload_hint(path)
    )


def _redownload_hint(path: Path) -> str:
    if cache_dir() in Path(path).resolve().parents:
        return f"It is a cached download: delete {path} and it will be downloaded again."
    return f"If it was downloaded or copied, delete {path} and fetch it again."


def _corrupt(path: Path, kind: str, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot read this {kind} file, it is truncated or corrupt ({type(err).__name__}: {err}). "
        + _redownload_hint(path)
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, "safetensors", e) from None


class _Opaque:
    """Inert stand-in for a global that ``weights_only`` refuses outside the weights.

    mmcls stores a ``meta`` dict next to ``state_dict``; if it holds a type torch does
    not allowlist, this absorbs it without importing or calling the real thing.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _check_zip_sizes(path: Path) -> None:
    # torch.load allocates each entry's declared uncompressed size before inflating it.
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load reports the corruption, naming the file
    declared = sum(e.file_size for e in entries)
    if declared > _ZIP_MAX_INFLATION * size + _ZIP_SLACK:
        big = max(entries, key=lambda e: e.file_size)
        raise CheckpointError(
            f"refusing to load {path}: its zip entries unpack to {declared:,} bytes from a {size:,}-byte file "
            f"({big.filename}: {big.file_size:,} bytes from {big.compress_size:,}). torch.save stores tensors "
            "uncompressed, so this is corrupt or a decompression bomb; nothing was unpacked. "
            + _redownload_hint(path)
        )


def _read_torch(path: Path) -> Any:
    if zipfile.is_zipfile(path):
        _check_zip_sizes(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as refused:
        # Either a corrupt pickle or weights_only refusing a global outside the tensors.
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as e:  # noqa: BLE001  any failure here means the file itself is bad
            raise _corrupt(path, "torch", e) from None
        if not unsafe:
            raise _corrupt(path, "torch", refused) from None
        return _read_torch_with_opaque_globals(path, unsafe)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise _corrupt(path, "torch", e) from None


def _read_torch_with_opaque_globals(path: Path, unsafe: list[str]) -> Any:
    _logger.info("%s: ignoring non-tensor globals outside the weights: %s", path, ", ".join(unsafe))
    try:
        with torch.serialization.safe_globals([(_Opaque, name) for name in unsafe]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch blocks some modules (os, posix, subprocess, ...) even when allowlisted.
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
        raise CheckpointError(
            f"refusing to load {path}: it references {', '.join(unsafe)}, which can run code "
            f"({why or 'blocked by torch.load(weights_only=True)'}); nothing from it was executed. If the file "
            "is trusted, re-save only its weights: torch.save(ckpt['state_dict'], 'weights.pth')"
        ) from None


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = load_arrays(f, max_bytes=path.stat().st_size)  # an array's data is stored in the file
    except RefusedArray as e:
        hint = _redownload_hint(path)
        raise CheckpointError(f"refusing to load {path}: {e}; nothing was allocated for it. {hint}") from None
    except RefusedGlobal as e:
        raise CheckpointError(
            f"refusing to load {path}: the pickle references {e}, which is not a numpy array or plain container. "
            "A PaddleClas .pdparams holds only those, so this file is not one, or it was tampered with; "
            "nothing from it was executed."
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError) as e:
        raise _corrupt(path, "pickle (.pdparams)", e) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, expected a dict of arrays")
    return obj


def _arrays_to_tensors(obj: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, dropped = {}, []
    for k, v in obj.items():
        if isinstance(v, np.generic):
            v = np.asarray(v)
        if isinstance(v, np.ndarray):
            if v.dtype.hasobject:
                raise CheckpointError(f"{path}: entry {k!r} is an object array; weights must be numeric")
            out[k] = torch.from_numpy(np.array(v, copy=True, order="C"))
        else:
            dropped.append(k)  # StructuredToParameterName@@ and other non-weights
    return out, dropped


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Any], list[str]]:
    """The state dict inside a torch checkpoint, and the names of what was left beside it."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key], [k for k in obj if k != key]
        return obj, []
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors (a state_dict)")
