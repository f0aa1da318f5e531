"""Data: datasets (ImageNet folders, digits, synthetic), uint8 transforms, resumable loaders, device input.

Pixels travel as uint8 from the files to the device: ``decode`` (torchvision.io, PIL where
needed), ``transforms`` (timm's crop and flip on tensors), ``loader`` (samplers, collate),
``device`` (normalise on the device, copy ahead on CUDA), ``gpudecode`` (nvJPEG, optional).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset

from .datasets import DataError, DigitsDataset, SafeImageFolder, SyntheticDataset
from .device import DeviceInput, build_device_input
from .loader import (
    ResumableSampler,
    ShardSampler,
    build_eval_loader,
    build_train_loader,
    collate_skip,
    default_workers,
    epoch_order,
)
from .shards import TarShardDataset
from .transforms import (
    EvalCrop,
    TrainCrop,
    build_eval_transform,
    build_train_transform,
    eval_data_config,
    format_eval_transform,
    resolve_eval_transform,
    uses_pil,
)

__all__ = [
    "DataError",
    "DeviceInput",
    "DigitsDataset",
    "EvalCrop",
    "ResumableSampler",
    "SafeImageFolder",
    "ShardSampler",
    "SyntheticDataset",
    "TarShardDataset",
    "TrainCrop",
    "build_datasets",
    "build_device_input",
    "build_eval_dataset",
    "build_eval_loader",
    "build_eval_transform",
    "build_train_loader",
    "build_train_transform",
    "collate_skip",
    "default_workers",
    "describe_eval_data",
    "epoch_order",
    "eval_data_config",
    "format_eval_transform",
    "resolve_eval_transform",
]


def build_eval_dataset(data, num_classes: int, in_chans: int = 3, transform: Optional[Callable] = None) -> Dataset:
    """The validation split of ``data`` (a ``DataConfig``), with ``transform`` or the config's eval transform.

    Args:
        data: the data section of the config.
        num_classes: classes of the model (used by ``synthetic``).
        in_chans: channels (used by ``synthetic``).
        transform: overrides the eval transform derived from the config (e.g. a pretrained config's).
    """
    if transform is None:
        transform = build_eval_transform(data.img_size, data.eval_crop_pct, data.interpolation, data.mean, data.std,
                                         decode=data.decode)
    if data.dataset == "digits":
        ds = DigitsDataset(train=False, img_size=data.img_size, val_fraction=data.val_fraction,
                           split_seed=data.split_seed, transform=transform)
    elif data.dataset == "synthetic":
        ds = SyntheticDataset(data.synthetic_val_size, num_classes, data.img_size, in_chans, seed=1)
    elif data.dataset == "wds":
        if not data.root:
            raise DataError("data.root is not set: pass --data DIR (the shards' folder, with _info.json)")
        ds = TarShardDataset(data.root, data.val_split, transform, train=False,
                             gpu_decode=_gpu_decode(data, transform))
        ds.check_decodable()
    else:
        if not data.root:
            raise DataError("data.root is not set: pass --data DIR (a folder with val/) or set data.root")
        ds = SafeImageFolder(Path(data.root) / data.val_split, transform, _gpu_decode(data, transform))
        ds.check_decodable()
    if len(ds) == 0:
        raise DataError(f"the {data.dataset} validation split is empty")
    return ds


def describe_eval_data(data, transform: Optional[dict] = None) -> dict:
    """What an evaluation of ``data`` (a ``DataConfig``) scores, for its results: a results file that
    says only ``imagenet`` does not tell which folder it measured, nor at which size.

    Args:
        data: the data section of the config.
        transform: the eval transform's settings (``resolve_eval_transform``).

    Returns:
        ``dataset``; ``data_root``, the absolute ImageFolder root (None for ``digits`` and
        ``synthetic``); ``split``, the folder under it (the held-out split's name otherwise);
        ``transform``, None for ``synthetic`` (its tensors pass through no transform).
    """
    root = str(Path(data.root).resolve()) if data.dataset in ("imagenet", "wds") and data.root else None
    return {"dataset": data.dataset, "data_root": root, "split": data.val_split,
            "transform": None if data.dataset == "synthetic" else transform}


def build_datasets(data, num_classes: int, in_chans: int = 3) -> tuple[Dataset, Dataset]:
    """Training and validation sets, checked at start-up: both present, non-empty, same classes.

    Args:
        data: the data section of the config.
        num_classes: the model's classifier size; it must equal the number of classes found.
        in_chans: channels (used by ``synthetic``).
    """
    if data.dataset == "synthetic":
        train: Dataset = SyntheticDataset(data.synthetic_train_size, num_classes, data.img_size, in_chans, seed=0)
    elif data.dataset == "digits":
        train = DigitsDataset(train=True, img_size=data.img_size, val_fraction=data.val_fraction,
                              split_seed=data.split_seed, transform=build_train_transform(data))
    elif data.dataset == "wds":
        if not data.root:
            raise DataError("data.root is not set: pass --data DIR (the shards' folder, with _info.json)")
        transform = build_train_transform(data)
        train = TarShardDataset(data.root, data.train_split, transform, train=True,
                             gpu_decode=_gpu_decode(data, transform))
        train.check_decodable()
    else:
        if not data.root:
            raise DataError("data.root is not set: pass --data DIR (a folder with train/ and val/) or set data.root")
        root = Path(data.root)
        if not root.is_dir():
            raise DataError(f"data.root {root} does not exist")
        transform = build_train_transform(data)
        train = SafeImageFolder(root / data.train_split, transform, _gpu_decode(data, transform))
        train.check_decodable()
    val = build_eval_dataset(data, num_classes, in_chans)
    if len(train) == 0:
        raise DataError(f"the {data.dataset} training split is empty")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise DataError(
            f"validation classes differ from training classes ({len(train.classes)} vs {len(val.classes)}; "
            f"only in train: {only_train}, only in val: {only_val})"
        )
    if len(train.classes) != num_classes:
        raise DataError(
            f"the dataset has {len(train.classes)} classes but model.num_classes is {num_classes}; "
            f"set --set model.num_classes={len(train.classes)}"
        )
    return train, val


def _gpu_decode(data, transform) -> bool:
    """Whether the ImageFolder leaves JPEGs to the device (``data.decode: gpu`` and a tensor transform)."""
    if data.decode == "gpu" and uses_pil(transform):
        raise DataError("data.decode: gpu crops on the device, which RandAugment / AutoAugment, color jitter and "
                        "the border crop mode cannot do; set data.decode: cpu (or pil) for them")
    return data.decode == "gpu"
