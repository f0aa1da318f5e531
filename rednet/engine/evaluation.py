"""``run_eval``: single-crop evaluation of a trained or published model, from where its model and
config come from to the results file; ``tools/eval.py`` is its command line, as ``fit`` is
``tools/train.py``'s."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch.nn as nn

from ..data import (
    build_device_input,
    build_eval_dataset,
    build_eval_loader,
    build_eval_transform,
    describe_eval_data,
    format_eval_transform,
    resolve_eval_transform,
)
from ..fileio import check_output_dir
from .builder import (
    autocast_dtype,
    build_model,
    check_device,
    execution_summary,
    format_summary,
    load_model_from_checkpoint,
)
from .config import Config, ConfigError
from .config_data import apply_overrides, config_from_dict, overridden_keys
from .config_files import load_config
from .distributed import cleanup_distributed, init_distributed
from .loop import evaluate

__all__ = ["run_eval"]

_logger = logging.getLogger("rednet")


def run_eval(config: Optional[str] = None, *, model: Optional[str] = None, checkpoint: Optional[str] = None,
             pretrained: Optional[str] = None, overrides: Sequence[str] = (),
             values: Optional[Mapping[str, Any]] = None, json_path: Optional[str] = None) -> dict[str, Any]:
    """Score a model on its config's validation split, once per image across all processes (torchrun).

    The model and config are a training checkpoint's (its stored config, unless ``config`` is
    given), or ``config``'s with ``model`` and ``pretrained`` over it. The eval transform is the
    config's, or with ``pretrained`` the weights' pretrained config; the ``data`` keys that
    ``overrides`` name win over either.

    Args:
        config: a YAML file or a bundled config's name.
        model: a model name (``model.name``); it needs ``data.root`` in ``values``.
        checkpoint: a training checkpoint.
        pretrained: ``"default"``, a weights file or a URL (``model.pretrained``).
        overrides: dotted ``key=value`` strings, as ``--set`` takes them.
        values: dotted key -> value, as given (paths from the command line).
        json_path: where the main process writes the results; checked before the pass.

    Returns:
        The results: what was scored (model, weights, data, transform, execution) and ``top1``,
        ``top5``, ``loss``, ``count``, ``images_per_s``.

    Raises:
        ConfigError, CheckpointError, DataError, OutputDirError: bad input (``rednet.engine.EXIT_CODES``).
    """
    if json_path:
        _check_results_file(json_path)
    values = {**(values or {}), **({"model.pretrained": pretrained} if pretrained is not None else {})}
    net, cfg = _model_and_config(config, model, checkpoint, list(overrides), values)
    dist_info = init_distributed(cfg.train.device)
    net = net.to(dist_info.device)
    # With pretrained weights their own config sets the transform, but what the command line gives wins.
    named = [key.split(".", 1)[1] for key in overridden_keys(list(overrides)) if key.startswith("data.")]
    settings = resolve_eval_transform(cfg.data, cfg.model.in_chans, net if pretrained else None, named)
    transform = build_eval_transform(settings["input_size"][-1], settings["crop_pct"], settings["interpolation"],
                                     settings["mean"], settings["std"], settings["crop_mode"], cfg.data.decode)
    _logger.info("%s", format_eval_transform(settings))
    dataset = build_eval_dataset(cfg.data, cfg.model.num_classes, cfg.model.in_chans, transform)
    loader = build_eval_loader(dataset, cfg.data.eval_batch_size or cfg.data.batch_size, dist_info.world_size,
                               dist_info.rank, cfg.data.workers, cfg.data.pin_memory)
    execution = execution_summary(net, cfg, dist_info.device)
    _logger.info("execution: %s", format_summary(execution))
    device_input = build_device_input(cfg.data, dist_info.device, dataset, train=False, mean=settings["mean"],
                                      std=settings["std"])
    metrics = evaluate(net, loader, dist_info.device, autocast_dtype(cfg, dist_info.device), cfg.train.channels_last,
                       dist_info.is_main, device_input=device_input)
    result = {"model": cfg.model.name, "checkpoint": checkpoint, "pretrained": pretrained,
              **describe_eval_data(cfg.data, settings), "world_size": dist_info.world_size, "execution": execution,
              **metrics}
    if dist_info.is_main:
        _logger.info("top-1 %.2f  top-5 %.2f  loss %.4f  %d images  %.0f img/s", result["top1"], result["top5"],
                     result["loss"], result["count"], result["images_per_s"])
        if json_path:
            Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    cleanup_distributed()
    return result


def _check_results_file(path: str) -> None:
    # Checked before the pass, so that scoring ImageNet is not lost to a results path that cannot be written.
    if Path(path).is_dir():
        raise ConfigError(f"--json {path} is a folder; give a file name")
    check_output_dir(Path(path).parent, "the folder of --json")


def _model_and_config(config: Optional[str], model: Optional[str], checkpoint: Optional[str], overrides: list[str],
                      values: dict[str, Any]) -> tuple[nn.Module, Config]:
    """The model to score and the config of the run: a checkpoint's own, unless ``config`` gives one."""
    if checkpoint and not config:
        net, stored = load_model_from_checkpoint(checkpoint)
        cfg = config_from_dict(apply_overrides(stored, overrides, values))
        check_device(cfg.train.device)
        return net, cfg
    if model:
        overrides = [f"model.name={model}", *overrides]
    if model and "data.root" not in values:
        raise ConfigError("--model needs --data DIR (an ImageNet-layout folder with val/)")
    cfg = load_config(config, overrides, values)
    check_device(cfg.train.device)  # before building, which may download weights
    net = load_model_from_checkpoint(checkpoint)[0] if checkpoint else build_model(cfg).eval()
    return net, cfg
