"""The training configuration's schema: its sections and keys, their types and defaults, and the value checks.

Every key a YAML file or ``--set`` may name is a field of the dataclasses below, with its
type and default, documented in its section's ``Args:``; ``validate`` holds the checks a
type cannot express (every number finite, then each key's range), so that a value that
would fail once training has started fails before anything is read. A new config key is a
field here (and, if its values need one, a check in ``validate``) and nothing else:
``config_data`` converts plain data into these types and applies overrides,
``config_files`` reads the YAML files.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "IMPLIED_BY_OVERRIDE",
    "MAX_CPU_THREADS",
    "SEED_LIMIT",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "validate",
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
        val_fraction / split_seed: the held-out split of ``digits`` (the seed in [0, 2**32)).
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
        seed: base seed in [0, 2**32) (each process adds its rank).
        deterministic: ``torch.use_deterministic_algorithms`` and no cuDNN benchmark.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        cpu_threads: intra-op CPU threads per process (``torch.set_num_threads``), at most 1024;
            ``None`` keeps torch's default. On a busy shared CPU one thread avoids OpenMP oversubscription.
        amp: ``none``, ``bf16`` or ``fp16`` (fp16 uses a GradScaler): the autocast dtype on CUDA.
            On a CPU it applies only with ``amp_on_cpu``.
        amp_on_cpu: autocast on a CPU too. Off by default: a recipe's ``amp`` is a GPU setting
            (the ImageNet recipe's bf16), and on a CPU it would silently change results (timm's
            ``validate.py`` scores fp32 there). Naming ``train.amp`` in an override (``--set
            train.amp=...``, eval's ``--amp``) is an explicit request and turns this on too,
            unless the same overrides set ``train.amp_on_cpu`` themselves.
        channels_last: NHWC memory format.
        compile: wrap the model in ``torch.compile``.
        compile_mode: ``torch.compile``'s mode, with ``compile``. ``reduce-overhead`` (and
            ``max-autotune``) also capture the compiled forward and backward in CUDA graphs after a
            warm-up step, which takes the host's per-call work (Python, the involution op's planning,
            launches) off every later step; on a CPU the capture is skipped.
        sync_bn: convert BatchNorm to SyncBatchNorm under distributed training.
        accum_steps: micro-batches per optimizer step.
        label_smoothing: for the cross-entropy (ignored when mixup/cutmix supply soft targets).
        mixup / cutmix / mixup_prob / mixup_switch_prob: timm ``Mixup`` options; 0 disables. Either
            on needs an even ``data.batch_size`` (timm mixes pairs).
        ema / ema_decay / eval_ema: keep a timm ``ModelEmaV3``; ``eval_ema`` validates and picks
            "best" with it (and ``load_model_from_checkpoint`` then returns its weights).
        val_every: validate every this many epochs (and after the last).
        log_every: iterations between log lines / TensorBoard points.
        ckpt_every_iters: also checkpoint every this many optimizer steps; 0 only at epoch ends.
        keep_last: rolling checkpoints to keep.
        max_iters_per_epoch: cap on optimizer steps per epoch (smoke tests, benchmarks); ``None`` for all.
        output: run directory (``--output`` overrides it); null (the default): ``runs/<model.name>``,
            so a config run with another model (``--set model.name=resnet50``) gets a folder of its own.
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
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
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
    output: Optional[str] = None


@dataclass
class Config:
    """A whole run: ``model``, ``data``, ``optim``, ``train`` sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)



# Seeds are below 2**32: numpy and scikit-learn (the digits split) take no more, and torch's
# generators (up to 2**64) then take a seed plus a rank or an epoch without overflowing.
SEED_LIMIT = 2**32
# torch.set_num_threads takes a C int, and OpenMP starts that many threads: a value past any one
# machine's CPUs (the largest today have under 1024 hardware threads) is a typo. The bound does not
# depend on this machine, so a checkpoint's config stays valid on any other.
MAX_CPU_THREADS = 1024


def _non_finite(cfg: Config) -> Optional[tuple[str, object]]:
    """The first number of ``cfg`` that is NaN or infinite, as (dotted key, value), or None.

    Every float key: a comparison with NaN is false, but an infinity passes ``>= 0`` and
    fails later, when a step count or a crop size is computed from it.
    """
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            numbers = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                return f"{section.name}.{f.name}", value
    return None


def validate(cfg: Config) -> None:
    """Value checks the types cannot express; each names its key."""
    bad = _non_finite(cfg)
    if bad is not None:
        key, value = bad
        expects = "finite numbers" if isinstance(value, tuple) else "a finite number"
        raise ConfigError(f"config key '{key}' expects {expects}, got {value!r}")
    mixing = cfg.train.mixup > 0 or cfg.train.cutmix > 0
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
        ("data.batch_size", not mixing or cfg.data.batch_size % 2 == 0,
         "an even number when train.mixup or train.cutmix is on (timm mixes the batch in pairs)"),
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
        ("data.split_seed", 0 <= cfg.data.split_seed < SEED_LIMIT, "an integer in [0, 2**32)"),
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
        ("train.seed", 0 <= cfg.train.seed < SEED_LIMIT, "an integer in [0, 2**32)"),
        ("train.cpu_threads", cfg.train.cpu_threads is None or 1 <= cfg.train.cpu_threads <= MAX_CPU_THREADS,
         f"null or an integer in [1, {MAX_CPU_THREADS}]"),
        ("train.accum_steps", cfg.train.accum_steps >= 1, "an integer >= 1"),
        ("train.label_smoothing", 0.0 <= cfg.train.label_smoothing < 1.0, "a number in [0, 1)"),
        ("train.mixup", cfg.train.mixup >= 0, "a number >= 0 (0 disables)"),
        ("train.cutmix", cfg.train.cutmix >= 0, "a number >= 0 (0 disables)"),
        ("train.ema_decay", 0.0 < cfg.train.ema_decay < 1.0, "a number in (0, 1)"),
        ("train.eval_ema", cfg.train.ema or not cfg.train.eval_ema, "false unless train.ema is true"),
        ("train.compile_mode", cfg.train.compile or cfg.train.compile_mode == "default",
         "'default' unless train.compile is true"),
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


# An override that names the first key also sets the second to this value, unless the same
# overrides name that one too: a precision typed for this run holds on any device (see
# TrainConfig.amp_on_cpu).
IMPLIED_BY_OVERRIDE: dict[str, tuple[str, object]] = {"train.amp": ("train.amp_on_cpu", True)}
