"""The classes a model was trained on, against those of the data it meets (a resume, an evaluation).

A label is an index into the training set's class list: an ImageFolder's sorted class folder
names, the digits "0".."9", a synthetic set's indices as strings, a shard set's ``_info.json``
list. Every checkpoint stores that list (``classes``). So a resume or an evaluation on data
whose class folders were renamed or replaced, with the same count, is refused instead of
training or scoring label i as another class than the one the model learned;
``--allow-config-change`` accepts it. Checkpoints written before the names were stored, and
weights files (which hold no names), are checked by their class count only.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ..data import DataError
from ..fileio import CheckpointError

__all__ = ["check_eval_classes", "check_resume_classes", "class_changes", "data_name"]

_logger = logging.getLogger("rednet")

_SHOW = 3  # differences named in a message before "and N more"


def data_name(data: Any, split: str) -> str:
    """Where a split's classes come from, for messages: the folder, the shards' split, or the dataset's name.

    Args:
        data: the data section of the config (``DataConfig``).
        split: the split's name (``data.train_split`` or ``data.val_split``).
    """
    if data.dataset == "imagenet" and data.root:
        return f"the folder {Path(data.root) / split}"
    if data.dataset == "wds" and data.root:
        return f"the shards' {split} split in {data.root}"
    return f"the {data.dataset} data"


def class_changes(stored: Sequence[str], found: Sequence[str]) -> Optional[str]:
    """The labels whose class name differs, in words (``label 3: 'cat' -> 'dog'``), or None when none does.

    Args:
        stored: the class names a model was trained on, by label.
        found: the class names of the data now, by label.
    """
    changed = [f"label {i}: {a!r} -> {b!r}" for i, (a, b) in enumerate(zip(stored, found)) if a != b]
    if len(stored) != len(found):
        changed.append(f"{len(stored)} classes -> {len(found)}")
    if not changed:
        return None
    more = f" and {len(changed) - _SHOW} more" if len(changed) > _SHOW else ""
    return "; ".join(changed[:_SHOW]) + more


def check_resume_classes(state: dict, classes: Sequence[str], path: Path | str, where: str,
                         allow_config_change: bool = False) -> None:
    """Refuse to continue training a checkpoint on data whose class names differ from those it stores.

    The count is the config's business (``model.num_classes`` is a recipe key, and the dataset
    must have that many classes), so only the names are compared here.

    Args:
        state: the checkpoint (``read_checkpoint``); one without ``classes`` is accepted.
        classes: the training set's class names.
        path: the checkpoint, for the message.
        where: the training data, for the message (``data_name``).
        allow_config_change: continue anyway, with a warning.

    Raises:
        CheckpointError: the names differ and ``allow_config_change`` is False.
    """
    stored = state.get("classes")
    if stored is None:
        _logger.info("%s stores no class names (written before checkpoints held them): only the class count "
                     "is checked", path)
        return
    changes = class_changes(stored, classes)
    if changes is None:
        return
    if not allow_config_change:
        raise CheckpointError(f"cannot resume from {path}: {where} has other class names than the run was trained "
                              f"on ({changes}), so those labels would now mean other classes; if only the "
                              "folders were renamed, pass --allow-config-change")
    _logger.warning("--allow-config-change: continuing from %s although the class names changed (%s)", path, changes)


def check_eval_classes(model_classes: int, classes: Sequence[str], where: str, *, origin: str, trained: bool,
                       fix: str, stored: Optional[Sequence[str]] = None, allow_config_change: bool = False) -> None:
    """Refuse to score a model on data whose labels do not mean its outputs.

    A count that differs is always refused: with more classes than outputs the labels past
    the last output cannot be scored (cross-entropy fails), with fewer the scores would
    silently count a model's output i as the folder's class i. Mapping a subset of a model's
    classes (an ImageNet-100 folder of wnids) to its outputs is not offered.

    Args:
        model_classes: the model's outputs.
        classes: the evaluation data's class names.
        where: the data, for the message (``data_name``).
        origin: where the model's count comes from, for the message (``the classifier of w.pth``).
        trained: the classifier was trained (a checkpoint or a weights file's own classifier).
        fix: what to change, for the message; ``{found}`` stands for the data's class count.
        stored: the class names the model was trained on, when its checkpoint stores them.
        allow_config_change: score despite class names that differ (same count), with a warning.

    Raises:
        DataError: the counts differ, or the names differ without ``allow_config_change``.
    """
    if len(classes) != model_classes:
        subset = ""
        if trained and len(classes) < model_classes:
            subset = ("; scoring a folder of some of the model's classes would need a mapping from its classes to "
                      "the model's outputs, which this project does not offer")
        raise DataError(f"{where} has {len(classes)} classes but the model has {model_classes} ({origin}): "
                        f"{fix.format(found=len(classes))}{subset}")
    if stored is None:
        return
    changes = class_changes(stored, classes)
    if changes is None:
        return
    if not allow_config_change:
        raise DataError(f"{where} has other class names than the model was trained on ({changes}), so those labels "
                        "would be scored as other classes; if only the folders were renamed, pass "
                        "--allow-config-change")
    _logger.warning("--allow-config-change: scoring although the class names differ from the model's (%s)", changes)
