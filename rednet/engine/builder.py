"""Model, optimizer, learning-rate schedule, loss, mixup and autocast dtype from a ``Config``, the trained
model from a training checkpoint, and a summary of how a run executes (device, precision, memory format,
involution backend)."""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_pretrained_cfg, parse_model_name
from timm.optim import create_optimizer_v2, list_optimizers

from ..layers import Involution
from ..models import create_model, resolve_source, weights_num_classes
from ..ops import describe_backend
from .checkpoint import read_checkpoint
from .config import Config, ConfigError
from .config_data import config_from_dict
from .devices import check_device

__all__ = [
    "AMP_DTYPES",
    "WarmupCosine",
    "autocast_dtype",
    "build_loss_and_mixup",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "check_buildable",
    "execution_summary",
    "execution_warnings",
    "format_summary",
    "global_batch_size",
    "load_model_from_checkpoint",
    "model_from_checkpoint_state",
    "peak_lr",
    "weights_classes",
]

# The autocast dtype of each ``train.amp`` name (None: fp32, no autocast).
AMP_DTYPES: dict[str, Optional[torch.dtype]] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(cfg: Config, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype a run uses on ``device``: ``train.amp`` on CUDA; on a CPU only with ``train.amp_on_cpu``."""
    if device.type == "cpu" and not cfg.train.amp_on_cpu:
        return None
    return AMP_DTYPES[cfg.train.amp]


def execution_summary(model: nn.Module, cfg: Config, device: torch.device) -> dict[str, str]:
    """How ``model`` runs under ``cfg`` on ``device``, in words, as each run logs once at its start.

    Returns:
        ``device``, ``precision`` (with why a configured ``train.amp`` does not apply on a CPU),
        ``memory_format`` and ``involution_backend`` (the backend ``rednet.ops`` picks for this
        device and dtype, and why it declined the CUDA kernel).
    """
    dtype = autocast_dtype(cfg, device)
    if dtype is not None:
        precision = f"{cfg.train.amp} autocast"
    elif cfg.train.amp != "none":
        precision = (f"fp32 (train.amp {cfg.train.amp} applies on CUDA; on a CPU only with train.amp_on_cpu: true "
                     "or train.amp given on the command line)")
    else:
        precision = "fp32"
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        threads = torch.get_num_threads()
        where += f" ({threads} thread{'s' if threads != 1 else ''})"
    return {
        "device": where,
        "precision": precision,
        "memory_format": "channels_last" if cfg.train.channels_last else "contiguous (NCHW)",
        "involution_backend": _involution_backend(model, device, dtype or torch.float32),
    }


def format_summary(summary: dict[str, str]) -> str:
    """``execution_summary`` as one log line: ``device cpu (2 threads), precision fp32, ...``."""
    return ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in summary.items())


def _cupy_fix() -> str:
    """How to install the CuPy that fits this torch's CUDA (``cuda`` extra: CUDA 13)."""
    major = (torch.version.cuda or "13").split(".")[0]
    return 'pip install "rednet[cuda]"' if major == "13" else f"pip install cupy-cuda{major}x (for CUDA {major})"


def execution_warnings(model: nn.Module, cfg: Config, device: torch.device,
                       backend: Optional[str] = None) -> list[str]:
    """What makes training ``model`` on ``device`` slower than it has to be, each with its fix; [] if nothing.

    On CUDA, for a model with involution layers: NCHW (``train.channels_last: false``) runs the
    NCHW kernels, and a CuPy that cannot run (or none) leaves the involutions to the PyTorch
    reference. A backend forced with ``$REDNET_INVOLUTION_BACKEND`` or ``use_backend`` was
    asked for and is not warned about.

    Args:
        model: the network.
        cfg: the run config (``train.channels_last``, the precision).
        device: where it trains.
        backend: ``describe_backend``'s answer for this device and dtype (as ``execution_summary``
            gives it); None: asked here.
    """
    if device.type != "cuda" or not any(isinstance(m, Involution) for m in model.modules()):
        return []
    if backend is None:
        backend = describe_backend(device, autocast_dtype(cfg, device) or torch.float32)
    found = []
    if not cfg.train.channels_last:
        found.append("training on CUDA in NCHW (train.channels_last: false): the involution layers run the NCHW "
                     "kernels, whose issue bound per RedNet-50 step is 1.9x the channels_last kernels' (3.06 vs "
                     "1.61 ms, benchmarks/results/2026-12-02-static.md). Fix: --set train.channels_last=true "
                     "(the bundled ImageNet configs set it)")
    if backend.startswith("reference (") and "forced" not in backend:
        why = backend[len("reference ("):-1]
        fix = "" if "pip install" in why else f". Fix: {_cupy_fix()}"
        found.append(f"training on CUDA without the CUDA involution kernels: {why}{fix}. Until then the involution "
                     "layers run the PyTorch reference: correct, but slower")
    return found


def _involution_backend(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    if not any(isinstance(m, Involution) for m in model.modules()):
        return "none (the model has no involution layers)"
    return describe_backend(device, dtype)


def _nearest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _check_model_name(name: str) -> None:
    try:
        source, model_id = parse_model_name(name)  # 'hf-hub:...' / 'local-dir:...' name their own source
    except ValueError as e:
        raise ConfigError(f"model.name {name!r}: {e}") from None
    if source is None and not timm.is_model(model_id):
        raise ConfigError(f"model.name {name!r} is not a registered model{_nearest(model_id, timm.list_models())} "
                          "(timm.list_models() lists them all)")


def _check_pretrained(source: Optional[str]) -> None:
    if source and source != "default" and "://" not in source and not Path(source).is_file():
        what = "is a folder, not a weights file" if Path(source).is_dir() else "does not exist"
        raise ConfigError(f"pretrained weights {source} {what} (model.pretrained / --pretrained takes "
                          "'default', a weights file or a URL)")


def _check_checkpoint_path(kwargs: dict) -> None:
    # timm's create_model loads model.kwargs.checkpoint_path after building: a missing file would
    # surface as a bare FileNotFoundError once the data is read and the model built.
    path = kwargs.get("checkpoint_path")
    if not path:
        return
    if not isinstance(path, str):
        what = "is not a file name"
    elif Path(path).is_dir():
        what = "is a folder, not a weights file"
    elif not Path(path).is_file():
        what = "does not exist"
    else:
        return
    raise ConfigError(f"model.kwargs.checkpoint_path {path!r} {what} (timm loads it into the built model; give "
                      "an existing weights file, or remove the key)")


def _check_optimizer_name(name: str) -> None:
    # timm reads 'lookahead_sgd' as SGD inside Lookahead: the last part names the optimizer.
    known = list_optimizers()
    if name.lower().split("_")[-1] not in known:
        raise ConfigError(f"optim.name {name!r} is not a timm optimizer{_nearest(name.lower(), known)} "
                          "(timm.optim.list_optimizers() lists them all)")


def check_buildable(cfg: Config) -> None:
    """Cheap checks, before any data is read, that ``cfg`` names things this machine can build.

    The model name is registered, a pretrained file and a ``model.kwargs.checkpoint_path``
    exist, the optimizer is known to timm and a requested CUDA device is present. Other bad
    ``model.kwargs`` show only when the model is built (``build_model``).

    Raises:
        ConfigError: naming the key, and the nearest valid names where there are some.
    """
    _check_model_name(cfg.model.name)
    _check_pretrained(cfg.model.pretrained)
    _check_checkpoint_path(cfg.model.kwargs)
    _check_optimizer_name(cfg.optim.name)
    check_device(cfg.train.device)


def build_model(cfg: Config, pretrained: bool = True) -> nn.Module:
    """The configured network (any timm model name).

    Args:
        cfg: the run config; ``model.pretrained`` is ``"default"``, a path, a URL or None.
        pretrained: set False to skip the pretrained weights and ``model.kwargs.checkpoint_path``
            (when a checkpoint follows).

    Raises:
        ConfigError: an unknown model name, a missing weights file, or ``model.kwargs`` the model does not take.
        CheckpointError: a URL that cannot be downloaded.
    """
    source = cfg.model.pretrained if pretrained else None
    _check_model_name(cfg.model.name)
    _check_pretrained(source)
    kwargs = dict(cfg.model.kwargs)
    if pretrained:
        _check_checkpoint_path(kwargs)
    else:
        kwargs.pop("checkpoint_path", None)  # initial weights too, which the checkpoint that follows replaces
    if source and "://" in source:
        # Through rednet's download for every model, timm's too: its cache names, deadline and
        # checks, and messages that never show the URL's query or password (timm's log the URL).
        try:
            source = str(resolve_source(source))
        except ValueError as e:  # a malformed #sha256=, or a bad download setting
            raise ConfigError(f"model.pretrained: {e}") from None
    if source and source != "default":
        # A file goes through the pretrained-config overlay, which both timm's loader and
        # RedNet's (foreign layouts) honour, so any registered model accepts one.
        overlay = {"file": source}
        # timm's loader drops a classifier whose count differs from the pretrained config's (1000
        # for most models) even when it is the model's own; the file's count is the one to compare.
        classes = weights_classes(cfg.model.name, source)
        if classes is not None:
            overlay["num_classes"] = classes
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), **overlay}
    for key in ("drop_path_rate", "drop_block_rate"):
        rate = getattr(cfg.model, key)
        if rate:  # only when set: some timm models take no drop_block_rate
            kwargs[key] = rate
    try:
        return create_model(
            cfg.model.name,
            pretrained=bool(source),
            num_classes=cfg.model.num_classes,
            in_chans=cfg.model.in_chans,
            drop_rate=cfg.model.drop_rate,
            **kwargs,
        )
    except (TypeError, ValueError, KeyError, IndexError, AssertionError) as e:
        # timm models answer a bad argument with any of these. With extra kwargs the fault is
        # theirs far more often than a bug in the model; without any, it is a bug and keeps its traceback.
        if not cfg.model.kwargs:
            raise
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ConfigError(f"model.kwargs {cfg.model.kwargs} do not fit {cfg.model.name} ({why})") from e


def weights_classes(model: str, source: str) -> Optional[int]:
    """The classes of the classifier in the weights ``source`` of ``model`` (None: not known, or it has none).

    Args:
        model: the model's name; its pretrained config names its classifier (``fc``, ``head.fc``...).
        source: ``"default"`` (the model's published weights: their pretrained config's count), a
            weights file or a URL (read, or downloaded into the cache, to count the rows of the classifier).

    Raises:
        ConfigError: ``source`` is a file that does not exist.
        CheckpointError: the file cannot be read.
    """
    try:
        pretrained_cfg = get_pretrained_cfg(model)
    except (RuntimeError, ValueError, KeyError):  # hf-hub: and local-dir: names carry their own config
        pretrained_cfg = None
    if source == "default":
        return pretrained_cfg.num_classes if pretrained_cfg is not None else None
    classifier = pretrained_cfg.classifier if pretrained_cfg is not None and pretrained_cfg.classifier else "fc"
    if not isinstance(classifier, str):  # distilled models name two heads; the first is the classifier
        classifier = classifier[0]
    _check_pretrained(source)
    return weights_num_classes(source, classifier)


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
    state = read_checkpoint(path, map_location)
    return model_from_checkpoint_state(state, map_location), state["config"]


def model_from_checkpoint_state(state: dict, map_location: str | torch.device = "cpu") -> nn.Module:
    """The trained network of a checkpoint already read (``read_checkpoint``), as ``load_model_from_checkpoint``.

    For callers that need more of the checkpoint than its model, such as the class names it stores.
    """
    cfg = config_from_dict(state["config"])
    model = build_model(cfg, pretrained=False)
    weights = state["ema"] if cfg.train.eval_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    return model.to(map_location).eval()


def global_batch_size(cfg: Config, world_size: int) -> int:
    """Images per optimizer step: per-process batch x processes x accumulation steps."""
    return cfg.data.batch_size * world_size * cfg.train.accum_steps


def peak_lr(cfg: Config, world_size: int) -> float:
    """``optim.lr`` if set, else the linear scaling rule ``base_lr * global_batch / base_batch_size``."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.base_lr * global_batch_size(cfg, world_size) / cfg.optim.base_batch_size


def build_optimizer(cfg: Config, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory; the paper decays every parameter, BN and bias included."""
    _check_optimizer_name(cfg.optim.name)
    return create_optimizer_v2(
        model,
        opt=cfg.optim.name,
        lr=lr,
        weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum,
        filter_bias_and_bn=not cfg.optim.decay_bn_and_bias,
    )


class WarmupCosine:
    """lr factor at optimizer step ``it``: half-cosine over all steps times a linear warmup.

    As in the authors' mmcv schedule, the warmup multiplies the cosine value, rising
    linearly from ``warmup_factor`` to 1 over ``warmup_iters``; the cosine reaches
    ``min_factor`` at ``total_iters``. A class, not a closure, so ``LambdaLR.state_dict``
    stores its (plain) attributes.

    Args:
        total_iters: optimizer steps of the whole run.
        warmup_iters: steps of the linear warmup.
        warmup_factor: the factor at step 0.
        min_factor: the factor at the last step.
    """

    def __init__(self, total_iters: int, warmup_iters: int, warmup_factor: float, min_factor: float = 0.0):
        self.total_iters = max(1, total_iters)
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.min_factor = min_factor

    def __call__(self, it: int) -> float:
        t = min(it, self.total_iters) / self.total_iters
        factor = self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
        if it < self.warmup_iters:
            factor *= self.warmup_factor + (1.0 - self.warmup_factor) * it / self.warmup_iters
        return factor


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration ``LambdaLR`` (stepped after every optimizer step) with the paper's warmup + cosine."""
    total = cfg.train.epochs * steps_per_epoch
    warmup = min(total, round(cfg.optim.warmup_epochs * steps_per_epoch))
    fn = WarmupCosine(total, warmup, cfg.optim.warmup_factor, cfg.optim.min_lr_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def build_loss_and_mixup(cfg: Config) -> tuple[Callable, Optional[Callable]]:
    """The training loss and, when ``train.mixup`` or ``train.cutmix`` is on, timm's ``Mixup``.

    Mixup/cutmix produce soft targets (label smoothing folded in), hence the soft-target
    cross-entropy with them; otherwise label-smoothed or plain cross-entropy. ``validate`` has
    made sure the batch is even when they are on (timm mixes pairs).
    """
    if cfg.train.mixup > 0 or cfg.train.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.train.mixup, cutmix_alpha=cfg.train.cutmix, prob=cfg.train.mixup_prob,
                      switch_prob=cfg.train.mixup_switch_prob, label_smoothing=cfg.train.label_smoothing,
                      num_classes=cfg.model.num_classes)
        return SoftTargetCrossEntropy(), mixup
    if cfg.train.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.train.label_smoothing), None
    return nn.CrossEntropyLoss(), None
