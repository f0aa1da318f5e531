"""The training configuration: YAML file (over its base file) -> typed, validated dataclasses -> overrides.

The schema is the set of dataclasses below; every key a YAML file or ``--set`` names
must exist in it (an unknown key is an error naming the nearest valid one) and every
value must have the declared type (an error names the key and what it expects).
The resolved config is a plain dict (``config_to_dict``) so it can be written next to
the run and stored in checkpoints that load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "BUNDLED_CONFIG_DIR",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "bundled_configs",
    "check_output_dir",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "overridden_keys",
    "resolve_config_path",
]


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


@dataclass
class ModelConfig:
    """The network.

    Args:
        name: any model in timm's registry (``rednet26`` ... ``rednet152``, ``resnet50``, ...).
        num_classes: classifier outputs.
        in_chans: input channels.
        pretrained: ``None``, ``"default"`` (the model's published weights), a local path or a URL.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block, linearly less for earlier ones (timm's rule).
        drop_block_rate: DropBlock in the last two stages (timm's ResNet placement).
        kwargs: extra keyword arguments for the model constructor.
    """

    name: str = "rednet50"
    num_classes: int = 1000
    in_chans: int = 3
    pretrained: Optional[str] = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    drop_block_rate: float = 0.0
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """Datasets, augmentation and loaders.

    Args:
        dataset: ``imagenet`` (an ImageFolder tree with ``train/`` and ``val/``), ``wds`` (tar
            shards written by ``tools/make_shards.py``), ``digits`` (scikit-learn's bundled 8x8
            digits, upsampled to RGB) or ``synthetic`` (random images).
        root: the ImageFolder root for ``imagenet``; the shards' folder (with ``_info.json``) for ``wds``.
        train_split / val_split: folder names under ``root``; split names in ``_info.json`` for ``wds``.
        img_size: training (and evaluation crop) size.
        batch_size: images per process per step (the global batch is this x processes x accum_steps).
        eval_batch_size: per-process evaluation batch; ``None`` uses ``batch_size``.
        workers: loader worker processes per process; ``None`` (the default) takes the CPUs
            available / processes on this node, so a small machine is not asked for more workers
            than it has CPUs and a large one is not held back. A number in a file or on the
            command line is kept.
        decode: ``cpu`` (torchvision.io decode and timm's crop and flip on uint8 tensors),
            ``pil`` (PIL decode and timm's PIL transforms, as before; also uint8 batches) or
            ``gpu`` (JPEGs decoded and cropped on the GPU with nvJPEG; CPU decode where it
            cannot run). Batches are normalised on the device in every case.
        pin_memory / persistent_workers: loader options, used only where they help (CUDA / workers > 0).
        scale / ratio / hflip / color_jitter / auto_augment / reprob / interpolation: timm's
            ``create_transform`` training options (``auto_augment`` e.g. ``rand-m9-mstd0.5``).
        mean / std: normalisation on a 0-1 scale (default: ImageNet's, timm's ``IMAGENET_DEFAULT_MEAN/STD``).
        eval_crop_pct: evaluation resizes the shorter side to ``img_size / eval_crop_pct`` and
            center-crops ``img_size`` (0.875: resize 256, crop 224); 1.0 only resizes.
        val_fraction / split_seed: the held-out split of ``digits``.
        synthetic_train_size / synthetic_val_size: lengths of the ``synthetic`` splits.
    """

    dataset: Literal["imagenet", "wds", "digits", "synthetic"] = "imagenet"
    root: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = 224
    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    workers: Optional[int] = None
    decode: Literal["cpu", "pil", "gpu"] = "cpu"
    pin_memory: bool = True
    persistent_workers: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    color_jitter: Optional[float] = None
    auto_augment: Optional[str] = None
    reprob: float = 0.0
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    eval_crop_pct: float = 0.875
    val_fraction: float = 0.2
    split_seed: int = 0
    synthetic_train_size: int = 256
    synthetic_val_size: int = 64


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule.

    Args:
        name: a timm optimizer name; timm's ``sgd`` is SGD with Nesterov momentum (``momentum``
            is SGD without Nesterov).
        lr: absolute peak learning rate; ``None`` scales ``base_lr`` by global batch / ``base_batch_size``.
        base_lr / base_batch_size: the linear scaling rule (paper: 0.8 at 2048).
        momentum / weight_decay: optimizer options.
        decay_bn_and_bias: apply weight decay to BN and bias too (the paper decays all parameters).
        warmup_epochs: linear warmup length in epochs (converted to iterations; the paper's 3130
            iterations at batch 2048 are 5 epochs of ImageNet).
        warmup_factor: the warmup starts at this fraction of the peak lr.
        min_lr_factor: the cosine ends at this fraction of the peak lr.
        clip_grad: clip the global gradient norm to this value; ``None`` disables.
    """

    name: str = "sgd"
    lr: Optional[float] = None
    base_lr: float = 0.8
    base_batch_size: int = 2048
    momentum: float = 0.9
    weight_decay: float = 1e-4
    decay_bn_and_bias: bool = True
    warmup_epochs: float = 5.0
    warmup_factor: float = 0.25
    min_lr_factor: float = 0.0
    clip_grad: Optional[float] = None


@dataclass
class TrainConfig:
    """The loop, precision, logging, checkpoints.

    Args:
        epochs: training epochs.
        seed: base seed (each process adds its rank).
        deterministic: ``torch.use_deterministic_algorithms`` and no cuDNN benchmark.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        cpu_threads: intra-op CPU threads per process (``torch.set_num_threads``); ``None`` keeps
            torch's default. On a busy shared CPU one thread avoids OpenMP oversubscription.
        amp: ``none``, ``bf16`` or ``fp16`` (fp16 uses a GradScaler): the autocast dtype on CUDA.
            On a CPU it applies only with ``amp_on_cpu``.
        amp_on_cpu: autocast on a CPU too. Off by default: a recipe's ``amp`` is a GPU setting
            (the ImageNet recipe's bf16), and on a CPU it would silently change results (timm's
            ``validate.py`` scores fp32 there). Naming ``train.amp`` in an override (``--set
            train.amp=...``, eval's ``--amp``) is an explicit request and turns this on too,
            unless the same overrides set ``train.amp_on_cpu`` themselves.
        channels_last: NHWC memory format.
        compile: wrap the model in ``torch.compile``.
        sync_bn: convert BatchNorm to SyncBatchNorm under distributed training.
        accum_steps: micro-batches per optimizer step.
        label_smoothing: for the cross-entropy (ignored when mixup/cutmix supply soft targets).
        mixup / cutmix / mixup_prob / mixup_switch_prob: timm ``Mixup`` options; 0 disables.
        ema / ema_decay / eval_ema: keep a timm ``ModelEmaV3``; ``eval_ema`` validates and picks
            "best" with it (and ``load_model_from_checkpoint`` then returns its weights).
        val_every: validate every this many epochs (and after the last).
        log_every: iterations between log lines / TensorBoard points.
        ckpt_every_iters: also checkpoint every this many optimizer steps; 0 only at epoch ends.
        keep_last: rolling checkpoints to keep.
        max_iters_per_epoch: cap on optimizer steps per epoch (smoke tests, benchmarks); ``None`` for all.
        output: run directory (``--output`` overrides it).
    """

    epochs: int = 130
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: Optional[int] = None
    amp: Literal["none", "bf16", "fp16"] = "none"
    amp_on_cpu: bool = False
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    accum_steps: int = 1
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    ema: bool = False
    ema_decay: float = 0.9999
    eval_ema: bool = False
    val_every: int = 1
    log_every: int = 50
    ckpt_every_iters: int = 0
    keep_last: int = 3
    max_iters_per_epoch: Optional[int] = None
    output: str = "runs/default"


@dataclass
class Config:
    """A whole run: ``model``, ``data``, ``optim``, ``train`` sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --- typed conversion ------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} values ({', '.join(_type_name(a) for a in typing.get_args(tp))})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp``, or a ConfigError naming ``key`` and what it expects."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_convert(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads '1e-4' (no dot) as a string; accept it as the number it clearly is.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    raise TypeError(f"unsupported schema type {tp!r} for '{key}'")


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        k = prefix + f.name
        keys.append(k)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], k + ".")
    return keys


def _unknown(key: str, valid: list[str]) -> ConfigError:
    # A key that exists in another section is the likeliest slip ('train.lr' -> 'optim.lr');
    # otherwise the closest spelling among keys of the same depth.
    leaf = key.rsplit(".", 1)[-1]
    match = [k for k in _all_keys() if "." in k and k.rsplit(".", 1)[-1] == leaf][:1]
    if not match:
        same_depth = [k for k in valid if k.count(".") == key.count(".")] or valid
        match = difflib.get_close_matches(key, same_depth, n=1, cutoff=0.5)
    hint = f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise _unknown(prefix + str(k), [prefix + n for n in names])
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] or {}, prefix + f.name + ".")
        else:
            kwargs[f.name] = _convert(data[f.name], tp, prefix + f.name)
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    """Value checks the types cannot express; each names its key."""
    checks = [
        # An empty path would silently mean "not set" (or the current directory): say so instead.
        ("model.pretrained", cfg.model.pretrained != "", "null, 'default', a file or a URL (not empty)"),
        ("data.root", cfg.data.root != "", "null or a folder (not empty)"),
        ("data.train_split", cfg.data.train_split != "", "a folder name (not empty)"),
        ("data.val_split", cfg.data.val_split != "", "a folder name (not empty)"),
        ("train.output", cfg.train.output != "", "a run directory (not empty)"),
        ("model.num_classes", cfg.model.num_classes >= 1, "an integer >= 1"),
        ("model.in_chans", cfg.model.in_chans >= 1, "an integer >= 1"),
        ("model.drop_rate", 0.0 <= cfg.model.drop_rate < 1.0, "a number in [0, 1)"),
        ("model.drop_path_rate", 0.0 <= cfg.model.drop_path_rate < 1.0, "a number in [0, 1)"),
        ("model.drop_block_rate", 0.0 <= cfg.model.drop_block_rate < 1.0, "a number in [0, 1)"),
        ("data.img_size", cfg.data.img_size >= 8, "an integer >= 8"),
        ("data.batch_size", cfg.data.batch_size >= 1, "an integer >= 1"),
        ("data.eval_batch_size", cfg.data.eval_batch_size is None or cfg.data.eval_batch_size >= 1,
         "null or an integer >= 1"),
        ("data.workers", cfg.data.workers is None or cfg.data.workers >= 0, "null or an integer >= 0"),
        ("data.scale", 0.0 < cfg.data.scale[0] <= cfg.data.scale[1] <= 1.0, "[min, max] with 0 < min <= max <= 1"),
        ("data.ratio", 0.0 < cfg.data.ratio[0] <= cfg.data.ratio[1], "[min, max] with 0 < min <= max"),
        ("data.hflip", 0.0 <= cfg.data.hflip <= 1.0, "a probability in [0, 1]"),
        ("data.reprob", 0.0 <= cfg.data.reprob <= 1.0, "a probability in [0, 1]"),
        ("data.std", all(s > 0 for s in cfg.data.std), "three positive numbers"),
        ("data.eval_crop_pct", 0.0 < cfg.data.eval_crop_pct <= 1.0, "a number in (0, 1]"),
        ("data.val_fraction", 0.0 < cfg.data.val_fraction < 1.0, "a number in (0, 1)"),
        ("data.synthetic_train_size", cfg.data.synthetic_train_size >= 1, "an integer >= 1"),
        ("data.synthetic_val_size", cfg.data.synthetic_val_size >= 1, "an integer >= 1"),
        ("optim.lr", cfg.optim.lr is None or cfg.optim.lr > 0, "null or a number > 0"),
        ("optim.base_lr", cfg.optim.base_lr > 0, "a number > 0"),
        ("optim.base_batch_size", cfg.optim.base_batch_size >= 1, "an integer >= 1"),
        ("optim.momentum", 0.0 <= cfg.optim.momentum < 1.0, "a number in [0, 1)"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, "a number >= 0"),
        ("optim.warmup_epochs", cfg.optim.warmup_epochs >= 0, "a number >= 0"),
        ("optim.warmup_factor", 0.0 <= cfg.optim.warmup_factor <= 1.0, "a number in [0, 1]"),
        ("optim.min_lr_factor", 0.0 <= cfg.optim.min_lr_factor <= 1.0, "a number in [0, 1]"),
        ("optim.clip_grad", cfg.optim.clip_grad is None or cfg.optim.clip_grad > 0, "null or a number > 0"),
        ("train.epochs", cfg.train.epochs >= 1, "an integer >= 1"),
        ("train.cpu_threads", cfg.train.cpu_threads is None or cfg.train.cpu_threads >= 1, "null or an integer >= 1"),
        ("train.accum_steps", cfg.train.accum_steps >= 1, "an integer >= 1"),
        ("train.label_smoothing", 0.0 <= cfg.train.label_smoothing < 1.0, "a number in [0, 1)"),
        ("train.mixup", cfg.train.mixup >= 0, "a number >= 0 (0 disables)"),
        ("train.cutmix", cfg.train.cutmix >= 0, "a number >= 0 (0 disables)"),
        ("train.ema_decay", 0.0 < cfg.train.ema_decay < 1.0, "a number in (0, 1)"),
        ("train.eval_ema", cfg.train.ema or not cfg.train.eval_ema, "false unless train.ema is true"),
        ("train.val_every", cfg.train.val_every >= 1, "an integer >= 1"),
        ("train.log_every", cfg.train.log_every >= 1, "an integer >= 1"),
        ("train.ckpt_every_iters", cfg.train.ckpt_every_iters >= 0, "an integer >= 0 (0: epoch ends only)"),
        ("train.keep_last", cfg.train.keep_last >= 1, "an integer >= 1"),
        ("train.max_iters_per_epoch", cfg.train.max_iters_per_epoch is None or cfg.train.max_iters_per_epoch >= 1,
         "null or an integer >= 1"),
    ]
    for key, ok, expects in checks:
        if not ok:
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            raise ConfigError(f"config key '{key}' expects {expects}, got {value!r}")


def config_from_dict(data: dict) -> Config:
    """A validated ``Config`` from nested plain data (a parsed YAML file or a checkpoint's copy)."""
    cfg = _build(Config, data or {}, "")
    _validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Nested plain dicts/lists/str/numbers (tuples become lists), safe for YAML and ``weights_only``."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    PyYAML keeps the last of two equal keys, so a second ``train:`` section silently
    replaced the first one, settings and all.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may repeat what it merges
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                seen = key in first
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if seen:
                raise ConfigError(f"duplicate key '{key}' at line {line} (first given at line {first[key]}); "
                                  "keep one of them")
            first[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain data only


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: where the YAML is wrong and why (PyYAML's own message spans several lines)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        text = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
        if e.context and e.context_mark is not None:
            text += f" ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        return text
    return " ".join(str(e).split())


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. optim.lr=0.1), got {item!r}")
    key, raw = item.split("=", 1)
    # YAML parsing gives numbers, booleans, null and [lists] their natural types.
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except ConfigError as e:  # a key given twice inside a {mapping}
        raise ConfigError(f"--set {key.strip()}: {e}") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def overridden_keys(overrides: list[str]) -> list[str]:
    """The dotted keys ``overrides`` name, in order (``optim.lr`` of ``optim.lr=0.1``)."""
    return [_parse_override(item)[0] for item in overrides]


def _set_key(data: dict, key: str, value: Any, valid: list[str]) -> None:
    if key not in valid:
        raise _unknown(key, valid)
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{key}': '{p}' is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str], values: Optional[dict[str, Any]] = None) -> dict:
    """Apply dotted ``key=value`` overrides to nested plain data (validated later as a whole).

    Args:
        data: nested plain data (a parsed file or a checkpoint's config); not modified.
        overrides: ``key=value`` strings; each value is parsed as YAML (``1`` is a number, ``null`` is None).
            One naming ``train.amp`` also sets ``train.amp_on_cpu`` (unless another one sets it).
        values: dotted key -> value, applied last and taken as they are, without YAML parsing: the
            tools pass paths this way, so that ``--output 2024`` is a folder and ``--data null`` one too.
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    valid = _all_keys()
    named = []
    for item in overrides:
        key, value = _parse_override(item)
        _set_key(data, key, value, valid)
        named.append(key)
    if "train.amp" in named and "train.amp_on_cpu" not in named:
        # A precision typed for this run holds on any device; see TrainConfig.amp_on_cpu.
        _set_key(data, "train.amp_on_cpu", True, valid)
    for key, value in (values or {}).items():
        _set_key(data, key, value, valid)
    return data


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Create the folder ``path`` if needed and check that files can be written in it.

    Called before a long job, so a run directory that cannot hold its checkpoints (or a
    results file that cannot be written) stops it at once rather than after an epoch.

    Args:
        path: the folder.
        what: how the user named it (``train.output``, ``--json``), for the message.

    Raises:
        ConfigError: ``path`` is empty, is or lies under a file, or cannot be created or written.
    """
    if str(path) == "":
        raise ConfigError(f"{what} is empty; give a folder")
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            where = "is" if p == path else f"lies under {p}, which is"
            raise ConfigError(f"{what} {path} {where} a file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {path} is not writable ({e.strerror or e}); choose another folder") from None
    return path


# The configs shipped with the package (package data), so that `--config rednet50` works
# from any directory and from an installed wheel, not only from the root of a checkout.
BUNDLED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_SUFFIXES = (".yaml", ".yml")


def _bundled(name: str) -> Optional[Path]:
    """The bundled config a bare name (``rednet50``, ``rednet50.yaml``) means, or None."""
    if not name or Path(name).name != name or name in (".", ".."):
        return None  # a path with folders names a file of the user's, never a bundled one
    path = BUNDLED_CONFIG_DIR / (name if name.endswith(_SUFFIXES) else f"{name}.yaml")
    return path if path.is_file() else None


def bundled_configs() -> dict[str, str]:
    """Name -> description of each bundled config; the description is the file's first comment line."""
    found = {}
    # Natural order: rednet26 before rednet101.
    for path in sorted(BUNDLED_CONFIG_DIR.glob("*.yaml"), key=lambda p: [int(s) if s.isdigit() else s
                                                                       for s in re.split(r"(\d+)", p.stem)]):
        first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")), "#")
        found[path.stem] = first.lstrip("#").strip()
    return found


def resolve_config_path(path: str | os.PathLike) -> Path:
    """The config file ``path`` names: the path itself where it exists, else the bundled config of that name.

    Raises:
        ConfigError: empty, a folder, or neither an existing file nor a bundled name (the message lists those).
    """
    if str(path) == "":
        raise ConfigError("the config file name is empty")
    given = Path(path)
    if given.is_dir():
        raise ConfigError(f"config file {given} is a folder; give a YAML file")
    if given.is_file():
        return given
    bundled = _bundled(str(path))
    if bundled is not None:
        return bundled
    names = list(bundled_configs())
    if Path(str(path)).name != str(path):
        # The old spelling configs/NAME.yaml (before the configs moved into the package) ends up here.
        hint = f"; for the bundled one, give just its name: {given.stem}" if _bundled(given.name) else ""
        raise ConfigError(f"config file {given} does not exist{hint}")
    stem = given.stem if given.suffix in _SUFFIXES else str(path)
    close = difflib.get_close_matches(stem, names, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"config file {path} does not exist, nor is it a bundled config{hint} "
                      f"(bundled: {', '.join(names)})")


# A config file may name another as its base: its sections are merged over the base's,
# key by key, so a variant states only what differs from the recipe it builds on.
_BASE_KEY = "base"


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, any other value replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(out.get(k), dict) and (isinstance(v, dict) or v is None):
            out[k] = _merge(out[k], v or {})  # an empty section (``train:``) changes nothing
        else:
            out[k] = v
    return out


def _read_config_file(path: Path, including: tuple[Path, ...] = ()) -> dict:
    """The sections of a YAML file merged over those of its ``base`` file (relative to it), recursively."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        # YAML files are UTF-8 whatever the locale says (a BOM is allowed).
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {raw[e.start]:#04x} at line {line}); "
                          "save it as UTF-8") from None
    try:
        data = _yaml_load(text) or {}
    except ConfigError as e:  # a duplicate key
        raise ConfigError(f"config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop(_BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: '{_BASE_KEY}' expects a file name, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file() and _bundled(base) is not None:
        base_path = _bundled(base)  # a user's file may build on a bundled recipe by name
    chain = (*including, path.resolve())
    if base_path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise ConfigError(f"config file {path}: the base files form a cycle: {cycle}")
    if not base_path.is_file():
        raise ConfigError(f"config file {path}: base file {base_path} does not exist")
    return _merge(_read_config_file(base_path, chain), data)


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                values: Optional[dict[str, Any]] = None) -> Config:
    """Read a YAML file (or start from defaults when ``path`` is None), apply ``overrides``, validate.

    Args:
        path: a YAML file with ``model``/``data``/``optim``/``train`` sections and optionally
            ``base: FILE``, a config (path relative to this file, or a bundled config's name)
            whose sections this one's are merged over; or the name of a bundled config
            (``rednet50`` or ``rednet50.yaml``, see ``bundled_configs``). A path that exists wins.
        overrides: dotted ``key=value`` strings, e.g. ``["optim.lr=0.1", "data.batch_size=64"]``.
        values: dotted key -> value applied last, as given (no YAML parsing), e.g. paths from the command line.
    """
    data: dict = {}
    if path is not None:
        data = _read_config_file(resolve_config_path(path))
    return config_from_dict(apply_overrides(data, overrides or [], values))
