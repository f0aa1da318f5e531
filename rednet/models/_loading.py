"""Weights into a model: read a file of any container and layout, fit it, load it strictly."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..fileio import CheckpointError
from ._hub import resolve_source
from ._layouts import KEY_LAYOUTS, WeightsFile, convert_state_dict, count_blocks, count_nonfinite, format_keys
from ._readers import read_raw
from ._urls import redact_url, split_sha256

__all__ = ["fit_state_dict", "load_pretrained", "load_weights", "read_weights", "weights_num_classes"]

_logger = logging.getLogger(__name__)


def read_weights(path: str | os.PathLike) -> WeightsFile:
    """Read a local weights file of any supported container and layout, in RedNet names.

    Args:
        path: a safetensors file, a torch ``.pth`` or a PaddleClas ``.pdparams``.

    Raises:
        CheckpointError: the file is unreadable, unsafe, or in no RedNet layout.
    """
    path = Path(path)
    raw = read_raw(path)
    # This project's safetensors say their layout; trust it only if it is one we know.
    stated = raw.metadata.get("layout")
    try:
        wf = convert_state_dict(raw.state_dict, stated if stated in KEY_LAYOUTS else None)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    wf.container, wf.metadata, wf.source = raw.container, raw.metadata, str(path)
    wf.dropped = raw.dropped + wf.dropped
    wf.nonfinite = count_nonfinite(wf.state_dict)
    return wf


def load_weights(
    source: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float | None = None,
    deadline: float | None = None,
) -> WeightsFile:
    """Read weights from a local path or URL, converted to RedNet's key names.

    Args:
        source: a local path or URL of a weights file in any supported layout; a URL may
            carry its digest as ``#sha256=<hex>``.
        sha256: expected digest of the file (or a prefix of it), if known.
        progress: show a progress bar while downloading.
        timeout: seconds a download may wait for the server; None reads
            ``$REDNET_DOWNLOAD_TIMEOUT`` (default 30).
        deadline: seconds a whole download may take; None reads ``$REDNET_DOWNLOAD_DEADLINE``
            (default: 60 s plus 1 s per 64 KiB announced, at most an hour).

    Raises:
        FileNotFoundError: a local path that does not exist.
        CheckpointError: a failed, stalled or too slow download, a cache that cannot be written, a digest
            mismatch, or a file ``read_weights`` refuses.
        ValueError: a malformed digest, timeout or deadline.
    """
    wf = read_weights(resolve_source(source, sha256, progress, timeout, deadline))
    if "://" in os.fspath(source):
        # Messages name the URL, not the cache file, and without its query or password.
        wf.source = redact_url(split_sha256(os.fspath(source))[0])
    return wf


def weights_num_classes(
    source: str | os.PathLike,
    classifier: str = "fc",
    sha256: str | None = None,
    progress: bool = True,
    timeout: float | None = None,
) -> int | None:
    """The number of classes of the classifier in a weights file: the rows of ``<classifier>.weight``.

    Any container and RedNet layout is read, so the authors' ``head.fc.weight`` and PaddleClas's
    transposed ``fc.weight`` count as this project's ``fc.weight`` does. Another model's file (a
    timm model's own weights, in no RedNet layout) is looked up under its own key names.

    Args:
        source: a local path or URL (optionally ending in ``#sha256=<hex>``).
        classifier: the classifier module's name in the model (timm's ``pretrained_cfg["classifier"]``).
        sha256: expected digest of the file, if known.
        progress: show a progress bar while downloading.
        timeout: seconds a download may wait for the server; None reads ``$REDNET_DOWNLOAD_TIMEOUT``.

    Returns:
        The classifier's output count, or None when the file holds no such classifier.

    Raises:
        FileNotFoundError, CheckpointError, ValueError: as ``load_weights``.
    """
    path = resolve_source(source, sha256, progress, timeout)
    raw = read_raw(path)
    try:
        state_dict = convert_state_dict(raw.state_dict).state_dict
    except CheckpointError:  # another model's layout: its names are the model's own
        state_dict = raw.state_dict
    weight = state_dict.get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def fit_state_dict(model: nn.Module, wf: WeightsFile) -> dict[str, torch.Tensor]:
    """The tensors of ``wf`` adapted to ``model``, ready for a strict ``load_state_dict``.

    The classifier is dropped (with a message) when the model has none or another
    number of classes; another number of input channels adapts ``stem.0.conv.weight``.

    Args:
        model: the model to load into (any device, ``meta`` included).
        wf: converted weights, as ``read_weights`` returns them.

    Raises:
        CheckpointError: naming every other missing, unexpected or mis-shaped key.
    """
    target = model.state_dict()
    sd = dict(wf.state_dict)
    _fit_classifier(sd, target, wf.source)
    _fit_in_chans(sd, target, wf.source)
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k} {tuple(sd[k].shape)} in the checkpoint vs {tuple(target[k].shape)} in the model"
        for k in target
        if k in sd and sd[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{wf.source or 'checkpoint'} ({wf.layout} layout) does not fit {type(model).__name__}:"]
        if missing:
            parts.append(f"{len(missing)} missing: {format_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {format_keys(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} mis-shaped: {format_keys(shapes)}")
        have, want = count_blocks(sd), count_blocks(target)
        if any(have) and have != want:
            parts.append(f"the checkpoint has blocks {have} ({wf.arch}), the model {want}; build the matching variant")
        raise CheckpointError("\n  ".join(parts))
    return sd


def _fit_classifier(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source: str) -> None:
    # Fine-tuning on another label set is the common case, so a classifier that cannot
    # load is replaced by the model's fresh one (with a message) rather than an error.
    fc = [k for k in sd if k.startswith("fc.")]
    if fc and "fc.weight" not in target:
        _logger.info("%s: the model has no classifier (num_classes=0 or features_only); ignoring %s", source, fc)
        for k in fc:
            del sd[k]
    elif fc and "fc.weight" in sd and sd["fc.weight"].shape != target["fc.weight"].shape:
        _logger.warning(
            "%s: the checkpoint's classifier has %d classes, the model %d: fc was left at its fresh "
            "initialisation, every other layer is pretrained",
            source, sd["fc.weight"].shape[0], target["fc.weight"].shape[0],
        )
        for k in fc:
            sd[k] = target[k]
    elif not fc and "fc.weight" in target and any(k.startswith("layer4.") for k in sd):
        _logger.warning("%s: the checkpoint has no classifier: fc was left at its fresh initialisation", source)
        sd.update({k: v for k, v in target.items() if k.startswith("fc.")})


def _fit_in_chans(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source: str) -> None:
    key = "stem.0.conv.weight"
    if key in sd and key in target and sd[key].dim() == 4 and sd[key].shape[1] != target[key].shape[1]:
        from timm.models._manipulate import adapt_input_conv

        in_chans = target[key].shape[1]
        _logger.info("%s: adapting %s from %d to %d input channels", source, key, sd[key].shape[1], in_chans)
        sd[key] = adapt_input_conv(in_chans, sd[key])


def load_pretrained(
    model: nn.Module,
    source: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float | None = None,
    deadline: float | None = None,
) -> WeightsFile:
    """Load weights of any supported layout into ``model``, strictly.

    The classifier is dropped, with a message, when the model has none or a different
    number of classes; a different number of input channels adapts the stem's first
    convolution. Any other missing, unexpected or mis-shaped key is an error naming it.
    NaN or infinite values load (some runs want to inspect them) with one warning naming them.

    Args:
        model: a RedNet (or its ``features_only`` wrapper).
        source: a local path or URL (optionally ending in ``#sha256=<hex>``).
        sha256: expected digest of the file, if known.
        progress: show a progress bar while downloading.
        timeout: seconds a download may wait for the server; None reads
            ``$REDNET_DOWNLOAD_TIMEOUT`` (default 30).
        deadline: seconds a whole download may take; None reads ``$REDNET_DOWNLOAD_DEADLINE``
            (default: 60 s plus 1 s per 64 KiB announced, at most an hour).

    Returns:
        The weights as read, with the record of their conversion.
    """
    wf = load_weights(source, sha256=sha256, progress=progress, timeout=timeout, deadline=deadline)
    if wf.nonfinite:
        _logger.warning("%s: %s; the model will compute NaN wherever they reach", wf.source, wf.describe_nonfinite())
    model.load_state_dict(fit_state_dict(model, wf), strict=True)
    _logger.info("loaded %s (%s, %s layout) into %s", wf.source, wf.container, wf.layout, type(model).__name__)
    return wf
