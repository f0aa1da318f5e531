"""Pretrained weights: metadata per weight, and loading of every supported layout.

Two things are detected from a file's content, never from its name:

* the container, from its first bytes: safetensors (8-byte little-endian header
  length, then JSON), a torch zip (``PK\\x03\\x04``; legacy torch pickles too) or a
  plain Python pickle (``\\x80`` protocol byte, the PaddleClas ``.pdparams``);
* the key layout, from the key names: ``rednet`` (this project's own names),
  ``mmcls`` (the authors' release: ``backbone.`` / ``head.fc.`` prefixes) or
  ``paddle`` (the PaddleClas port: BN statistics named ``_mean`` / ``_variance``, no
  ``num_batches_tracked``, ``fc.weight`` stored as (in, out)).

Every layout is converted to the ``rednet`` names before it meets a model. Nothing
here executes code from a checkpoint: torch files go through
``torch.load(weights_only=True)`` and pickles through an unpickler that only
rebuilds numpy arrays and plain containers.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn

from ..fileio import CheckpointError, atomic_write, file_sha256

__all__ = [
    "WEIGHTS",
    "CheckpointError",
    "Checkpoint",
    "Weights",
    "arch_from_state_dict",
    "convert_state_dict",
    "detect_layout",
    "file_sha256",
    "fit_state_dict",
    "load_checkpoint",
    "load_pretrained",
    "read_checkpoint",
    "resolve_source",
    "save_rednet",
]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Weights:
    """One set of published weights; eval transforms and loading derive from it."""

    url: str
    layout: str  # "rednet" (safetensors), "mmcls" (.pth) or "paddle" (.pdparams)
    top1: float
    top5: float | None = None
    sha256: str | None = None
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bilinear"


_PADDLE = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/RedNet{}_pretrained.pdparams"

# Top-1 of the PaddleClas port as PaddleClas publishes it (ImageNet val, single crop).
# No sha256: the files cannot be fetched from where this table was written, and a
# digest that was never checked against the real file would only break downloads.
WEIGHTS: dict[str, Weights] = {
    f"rednet{d}.paddle_in1k": Weights(url=_PADDLE.format(d), layout="paddle", top1=top1)
    for d, top1 in ((26, 75.95), (38, 77.47), (50, 78.33), (101, 78.94), (152, 79.17))
}

LAYOUTS = ("rednet", "mmcls", "paddle")
_PADDLE_NAMES_KEY = "StructuredToParameterName@@"
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_SHOW = 8  # keys named in an error before "... and N more"


# ---------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------

# torch.save's legacy (non-zip) format starts with its magic number pickled as a LONG1.
_TORCH_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]


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
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if cache in Path(path).resolve().parents:
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

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Opaque":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _read_torch(path: Path) -> Any:
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
        _logger.info("%s: ignoring non-tensor globals outside the weights: %s", path, ", ".join(unsafe))
        try:
            with torch.serialization.safe_globals([(_Opaque, name) for name in unsafe]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch blocks some modules (os, posix, subprocess, ...) even when allowlisted.
            why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
            raise CheckpointError(
                f"refusing to load {path}: it references {', '.join(unsafe)}, which can run "
                f"code ({why or 'blocked by torch.load(weights_only=True)'}); nothing from it was executed. If the "
                "file is trusted, re-save only its weights: torch.save(ckpt['state_dict'], 'weights.pth')"
            ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise _corrupt(path, "torch", e) from None


def _numpy_core(module: str) -> str:
    # numpy 2 moved numpy.core to numpy._core; pickles name either.
    new = int(np.__version__.split(".")[0]) >= 2
    if new and module.startswith("numpy.core"):
        return "numpy._core" + module[len("numpy.core"):]
    if not new and module.startswith("numpy._core"):
        return "numpy.core" + module[len("numpy._core"):]
    return module


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'); allow only that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 out-of-band buffers
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class _UnsafePickle(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers; every other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _PICKLE_ALLOWED:
            return getattr(importlib.import_module(_numpy_core(module)), name)
        if module.startswith("numpy.dtypes") and name.endswith("DType"):
            # numpy >= 1.25 may name dtype classes (numpy.dtypes.Float32DType).
            return getattr(importlib.import_module(module), name)
        raise _UnsafePickle(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _UnsafePickle(f"persistent id {pid!r}")


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            # latin1: numpy arrays pickled by Python 2 carry their bytes as str.
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except _UnsafePickle as e:
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


# ---------------------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------------------


def detect_layout(keys: list[str] | Any) -> str:
    """Which key layout a state dict uses: ``'rednet'``, ``'mmcls'`` or ``'paddle'``.

    Args:
        keys: the state dict's keys.

    Raises:
        CheckpointError: if the names belong to none of them.
    """
    keys = list(keys)
    if any(k.startswith("backbone.") for k in keys):
        return "mmcls"
    if any(k.endswith(("._mean", "._variance")) for k in keys):
        return "paddle"
    if any(re.match(r"(stem|layer[1-4])\.", k) for k in keys):
        return "rednet"
    raise CheckpointError(
        "these keys match none of the RedNet layouts (rednet, mmcls, paddle): "
        + _names(keys)
    )


def _names(keys: list[str]) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


@dataclass
class Checkpoint:
    """A checkpoint converted to this project's key names.

    Attributes:
        state_dict: tensors under RedNet's own key names.
        container: ``'safetensors'``, ``'torch'``, ``'pickle'`` or ``'memory'``.
        layout: the key layout it was stored in.
        renamed: ``(source name, rednet name)`` for every key whose name changed.
        transposed: keys whose tensor was transposed (the PaddleClas classifier).
        filled: keys the source lacks and that were filled (BN ``num_batches_tracked`` = 0).
        dropped: source entries that are not weights (``meta``, Paddle's name table).
        metadata: the file's own metadata (safetensors header), if any.
        source: where it was read from.
    """

    state_dict: dict[str, torch.Tensor]
    container: str
    layout: str
    renamed: list[tuple[str, str]] = field(default_factory=list)
    transposed: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def arch(self) -> str | None:
        return self.metadata.get("arch") or arch_from_state_dict(self.state_dict)

    @property
    def num_classes(self) -> int | None:
        w = self.state_dict.get("fc.weight")
        return int(w.shape[0]) if w is not None else None

    def summary(self) -> dict[str, Any]:
        """What was mapped, as plain data (for ``--json`` and logs)."""
        return dict(
            source=self.source,
            container=self.container,
            layout=self.layout,
            arch=self.arch,
            num_classes=self.num_classes,
            tensors=len(self.state_dict),
            params=int(sum(v.numel() for k, v in self.state_dict.items() if not k.endswith(_BUFFERS))),
            renamed=len(self.renamed),
            transposed=list(self.transposed),
            filled=len(self.filled),
            dropped=list(self.dropped),
            rename_examples=[list(p) for p in self.renamed[:3]],
        )


def arch_from_state_dict(state_dict: dict[str, Any]) -> str | None:
    """The RedNet variant whose block counts match the keys (``'rednet50'``), else None.

    Args:
        state_dict: a state dict in the ``rednet`` layout.
    """
    blocks = _blocks(state_dict)
    if not all(blocks):
        return None
    # A RedNet-D has D = 3 * (bottleneck blocks) + 2 layers (stem conv and classifier).
    return f"rednet{3 * sum(blocks) + 2}"


def _blocks(keys: Any) -> tuple[int, ...]:
    blocks = [0, 0, 0, 0]
    for k in keys:
        m = re.match(r"layer([1-4])\.(\d+)\.", k)
        if m:
            i = int(m.group(1)) - 1
            blocks[i] = max(blocks[i], int(m.group(2)) + 1)
    return tuple(blocks)


def convert_state_dict(state_dict: dict[str, torch.Tensor], layout: str | None = None) -> Checkpoint:
    """Rename a state dict in any supported layout to this project's names.

    Args:
        state_dict: tensors in the ``rednet``, ``mmcls`` or ``paddle`` layout.
        layout: the layout, or None to detect it from the key names.
    """
    layout = layout or detect_layout(state_dict)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    out: dict[str, torch.Tensor] = {}
    ck = Checkpoint(out, container="memory", layout=layout)
    for key, t in state_dict.items():
        new = key
        if new.startswith("module."):  # saved from DistributedDataParallel
            new = new[len("module."):]
        if layout == "mmcls":
            if new.startswith("backbone."):
                new = new[len("backbone."):]
            elif new.startswith("head."):
                new = new[len("head."):]  # head.fc.* -> fc.*
        elif layout == "paddle":
            new = re.sub(r"\._mean$", ".running_mean", new)
            new = re.sub(r"\._variance$", ".running_var", new)
            if new == "fc.weight" and t.dim() == 2:
                # Paddle's Linear stores (in_features, out_features).
                t = t.t().contiguous()
                ck.transposed.append(new)
        if new != key:
            ck.renamed.append((key, new))
        out[new] = t
    if layout == "paddle":
        for key in [k for k in out if k.endswith(".running_mean")]:
            nbt = key[: -len("running_mean")] + "num_batches_tracked"
            if nbt not in out:
                out[nbt] = torch.tensor(0, dtype=torch.long)
                ck.filled.append(nbt)
    return ck


# ---------------------------------------------------------------------------------------
# Sources: local paths and URLs
# ---------------------------------------------------------------------------------------


def resolve_source(source: str | os.PathLike, sha256: str | None = None, progress: bool = True) -> Path:
    """A local file for ``source``, downloading a URL into torch.hub's cache first.

    Downloads go to ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub``) through
    ``torch.hub.download_url_to_file``, which writes to a temporary file and only moves
    a complete, hash-verified download into place.

    Args:
        source: a local path or a URL (``https://``, ``http://``, ``file://``).
        sha256: expected digest (or a prefix of it) to verify, if known.
        progress: show a progress bar while downloading.

    Raises:
        FileNotFoundError: a local path that does not exist.
        CheckpointError: a failed download or a digest mismatch.
    """
    text = os.fspath(source)
    if "://" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights not found: {path} (pass an existing file or a URL)")
        if sha256:
            _verify(path, sha256, delete=False)
        return path
    name = os.path.basename(urlparse(text).path)
    if not name:
        raise CheckpointError(f"cannot name a cache file after URL {text!r}: it has no file name")
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if path.is_file():
        if sha256:
            _verify(path, sha256, delete=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    _logger.info("downloading %s to %s", text, path)
    try:
        torch.hub.download_url_to_file(text, str(path), hash_prefix=sha256, progress=progress)
    except RuntimeError as e:
        if "hash" in str(e):  # torch.hub removed the partial file; nothing bad is cached
            raise CheckpointError(f"sha256 mismatch downloading {text}: {e}; the download was discarded") from None
        raise
    except (URLError, OSError, ValueError) as e:
        raise CheckpointError(
            f"could not download {text} ({e}). Fetch it another way and pass the local path, "
            f"e.g. create_model(name, pretrained='/path/to/{name}')"
        ) from None
    return path


def _verify(path: Path, sha256: str, delete: bool) -> None:
    actual = file_sha256(path)
    if not actual.startswith(sha256.lower()):
        if delete:
            path.unlink()
        raise CheckpointError(
            f"{path}: sha256 mismatch, expected {sha256}, got {actual}"
            + ("; the cached file was deleted, load again to download it afresh" if delete else "")
        )


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a local checkpoint of any supported container and layout, in RedNet names.

    Args:
        path: a safetensors file, a torch ``.pth`` or a PaddleClas ``.pdparams``.
    """
    path = Path(path)
    container = _sniff_container(path)
    metadata: dict[str, str] = {}
    dropped: list[str] = []
    if container == "safetensors":
        sd, metadata = _read_safetensors(path)
    elif container == "torch":
        sd, dropped = _unwrap(_read_torch(path), path)
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{path}: the state dict holds non-tensor entries: {_names(bad)}")
    else:
        sd, dropped = _arrays_to_tensors(_read_pickle(path), path)
    try:
        ck = convert_state_dict(sd, metadata.get("layout") if metadata.get("layout") in LAYOUTS else None)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    ck.container, ck.metadata, ck.source = container, metadata, str(path)
    ck.dropped = dropped + ck.dropped
    return ck


def load_checkpoint(source: str | os.PathLike, sha256: str | None = None, progress: bool = True) -> Checkpoint:
    """Read weights from a local path or URL, converted to RedNet's key names.

    Args:
        source: a local path or URL of a checkpoint in any supported layout.
        sha256: expected digest of the file, if known.
        progress: show a progress bar while downloading.
    """
    ck = read_checkpoint(resolve_source(source, sha256, progress))
    if "://" in os.fspath(source):
        ck.source = os.fspath(source)
    return ck


def save_rednet(
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike,
    arch: str | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a state dict as this project's safetensors layout.

    Args:
        state_dict: tensors under RedNet's key names.
        path: destination file.
        arch: model name stored in the metadata; inferred from the keys when None.
        metadata: extra string metadata.
    """
    from safetensors.torch import save

    meta = {"format": "pt", "layout": "rednet"}
    arch = arch or arch_from_state_dict(state_dict)
    if arch:
        meta["arch"] = arch
    meta.update(metadata or {})
    # safetensors refuses shared or strided storage; clone keeps every tensor standalone.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda f: f.write(save(tensors, metadata=meta)))


# ---------------------------------------------------------------------------------------
# Into a model
# ---------------------------------------------------------------------------------------


def fit_state_dict(model: nn.Module, ck: Checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors adapted to ``model``, ready for a strict ``load_state_dict``.

    The classifier is dropped (with a message) when the model has none or another
    number of classes; another number of input channels adapts ``stem.0.conv.weight``.

    Args:
        model: the model to load into (any device, ``meta`` included).
        ck: a converted checkpoint.

    Raises:
        CheckpointError: naming every other missing, unexpected or mis-shaped key.
    """
    target = model.state_dict()
    sd = dict(ck.state_dict)
    fc = [k for k in sd if k.startswith("fc.")]
    if fc and "fc.weight" not in target:
        _logger.info("%s: the model has no classifier (num_classes=0 or features_only); ignoring %s", ck.source, fc)
        for k in fc:
            del sd[k]
    elif fc and "fc.weight" in sd and sd["fc.weight"].shape != target["fc.weight"].shape:
        _logger.warning(
            "%s: the checkpoint's classifier has %d classes, the model %d: fc was left at its fresh "
            "initialisation, every other layer is pretrained",
            ck.source, sd["fc.weight"].shape[0], target["fc.weight"].shape[0],
        )
        for k in fc:
            sd[k] = target[k]
    elif not fc and "fc.weight" in target and any(k.startswith("layer4.") for k in sd):
        _logger.warning("%s: the checkpoint has no classifier: fc was left at its fresh initialisation", ck.source)
        sd.update({k: v for k, v in target.items() if k.startswith("fc.")})
    key = "stem.0.conv.weight"
    if key in sd and key in target and sd[key].dim() == 4 and sd[key].shape[1] != target[key].shape[1]:
        from timm.models._manipulate import adapt_input_conv

        in_chans = target[key].shape[1]
        _logger.info("%s: adapting %s from %d to %d input channels", ck.source, key, sd[key].shape[1], in_chans)
        sd[key] = adapt_input_conv(in_chans, sd[key])

    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k} {tuple(sd[k].shape)} in the checkpoint vs {tuple(target[k].shape)} in the model"
        for k in target
        if k in sd and sd[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{ck.source or 'checkpoint'} ({ck.layout} layout) does not fit {type(model).__name__}:"]
        if missing:
            parts.append(f"{len(missing)} missing: {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_names(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} mis-shaped: {_names(shapes)}")
        have, want = _blocks(sd), _blocks(target)
        if any(have) and have != want:
            parts.append(
                f"the checkpoint has blocks {have} ({ck.arch}), the model {want}; build the matching variant"
            )
        raise CheckpointError("\n  ".join(parts))
    return sd


def load_pretrained(
    model: nn.Module,
    source: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
) -> Checkpoint:
    """Load weights of any supported layout into ``model``, strictly.

    The classifier is dropped, with a message, when the model has none or a different
    number of classes; a different number of input channels adapts the stem's first
    convolution. Any other missing, unexpected or mis-shaped key is an error naming it.

    Args:
        model: a RedNet (or its ``features_only`` wrapper).
        source: a local path or URL.
        sha256: expected digest of the file, if known.
        progress: show a progress bar while downloading.

    Returns:
        The checkpoint as read, with its mapping summary.
    """
    ck = load_checkpoint(source, sha256=sha256, progress=progress)
    model.load_state_dict(fit_state_dict(model, ck), strict=True)
    _logger.info("loaded %s (%s, %s layout) into %s", ck.source, ck.container, ck.layout, type(model).__name__)
    return ck
