"""``run_eval``: single-crop evaluation of a trained or published model, from where its model and
config come from to the results file; ``tools/eval.py`` is its command line, as ``fit`` is
``tools/train.py``'s."""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
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
from ..fileio import STDOUT, NoSpaceError, OutputDirError, atomic_write, check_output_file
from ..models import redact_url
from .builder import (
    autocast_dtype,
    build_model,
    check_buildable,
    execution_summary,
    format_summary,
    model_from_checkpoint_state,
    weights_classes,
)
from .checkpoint import read_checkpoint
from .classes import check_eval_classes, data_name
from .config import Config, ConfigError
from .config_data import apply_overrides, config_from_dict, overridden_keys
from .config_files import load_config
from .devices import check_device
from .distributed import cleanup_distributed, init_distributed
from .loop import evaluate

__all__ = ["run_eval"]

_logger = logging.getLogger("rednet")


def run_eval(config: Optional[str] = None, *, model: Optional[str] = None, checkpoint: Optional[str] = None,
             pretrained: Optional[str] = None, overrides: Sequence[str] = (),
             values: Optional[Mapping[str, Any]] = None, json_path: Optional[str] = None,
             allow_config_change: bool = False) -> dict[str, Any]:
    """Score a model on its config's validation split, once per image across all processes (torchrun).

    The model and config are a training checkpoint's (its stored config, unless ``config`` is
    given), or ``config``'s with ``model`` and ``pretrained`` over it. The eval transform is the
    config's, or with ``pretrained`` the weights' pretrained config; the ``data`` keys that
    ``overrides`` name win over either.

    The model's classes must be the data's (``rednet.engine.classes``): the same count, and
    the same names where a checkpoint stores them. With a weights file or URL and no
    ``model.num_classes`` in ``overrides`` or ``values``, the model gets as many classes as the
    file's classifier. ``train.cpu_threads`` sets the CPU threads while it runs.

    Args:
        config: a YAML file or a bundled config's name.
        model: a model name (``model.name``); it needs ``data.root`` in ``values``.
        checkpoint: a training checkpoint.
        pretrained: ``"default"``, a weights file or a URL (``model.pretrained``).
        overrides: dotted ``key=value`` strings, as ``--set`` takes them.
        values: dotted key -> value, as given (paths from the command line).
        json_path: the file the main process writes the results to, checked before the pass; ``"-"``:
            printed on stdout as one JSON line.
        allow_config_change: score a checkpoint on data whose class names differ from those it
            stores (same count), with a warning.

    Returns:
        The results: what was scored (model, weights, data, transform, execution) and ``top1``,
        ``top5``, ``loss``, ``count``, ``images_per_s``.

    Raises:
        ConfigError, CheckpointError, DataError, OutputDirError: bad input (``rednet.engine.EXIT_CODES``).
            An ``OutputDirError`` after the pass (the results file could not be written, e.g. a
            full disk) comes after the results were printed on stdout as one JSON line.
    """
    if json_path and json_path != STDOUT:  # before the pass: scoring ImageNet must not be lost to a bad path
        check_output_file(json_path, "--json")
    values = {**(values or {}), **({"model.pretrained": pretrained} if pretrained is not None else {})}
    scored = _model_and_config(config, model, checkpoint, list(overrides), values)
    net, cfg = scored.net, scored.cfg
    dist_info = init_distributed(cfg.train.device)
    with _cpu_threads(cfg.train.cpu_threads):
        net = net.to(dist_info.device)
        # With pretrained weights their own config sets the transform, but what the command line gives wins.
        named = [key.split(".", 1)[1] for key in overridden_keys(list(overrides)) if key.startswith("data.")]
        settings = resolve_eval_transform(cfg.data, cfg.model.in_chans, net if pretrained else None, named)
        transform = build_eval_transform(settings["input_size"][-1], settings["crop_pct"], settings["interpolation"],
                                         settings["mean"], settings["std"], settings["crop_mode"], cfg.data.decode)
        _logger.info("%s", format_eval_transform(settings))
        dataset = build_eval_dataset(cfg.data, scored.num_classes, cfg.model.in_chans, transform)
        check_eval_classes(scored.num_classes, dataset.classes, data_name(cfg.data, cfg.data.val_split),
                           origin=scored.origin, fix=scored.fix, trained=scored.trained, stored=scored.classes,
                           allow_config_change=allow_config_change)
        loader = build_eval_loader(dataset, cfg.data.eval_batch_size or cfg.data.batch_size, dist_info.world_size,
                                   dist_info.rank, cfg.data.workers, cfg.data.pin_memory)
        execution = execution_summary(net, cfg, dist_info.device)
        _logger.info("execution: %s", format_summary(execution))
        device_input = build_device_input(cfg.data, dist_info.device, dataset, train=False, mean=settings["mean"],
                                          std=settings["std"])
        metrics = evaluate(net, loader, dist_info.device, autocast_dtype(cfg, dist_info.device),
                           cfg.train.channels_last, dist_info.is_main, device_input=device_input)
    # A URL's token would outlive the run in the results file: it holds the URL redacted.
    result = {"model": cfg.model.name, "checkpoint": checkpoint,
              "pretrained": redact_url(pretrained) if pretrained else pretrained,
              **describe_eval_data(cfg.data, settings), "world_size": dist_info.world_size, "execution": execution,
              **metrics}
    cleanup_distributed()
    if dist_info.is_main:
        _logger.info("top-1 %.2f  top-5 %.2f  loss %.4f  %d images  %.0f img/s", result["top1"], result["top5"],
                     result["loss"], result["count"], result["images_per_s"])
        if json_path == STDOUT:
            print(json.dumps(result), flush=True)
        elif json_path:
            _write_results(json_path, result)
    return result


@contextlib.contextmanager
def _cpu_threads(threads: Optional[int]) -> Iterator[None]:
    # As training does (train.cpu_threads); given back afterwards, for a caller that evaluates in its own process.
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_results(path: str, result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=2) + "\n"
    p = Path(path)
    try:
        if p.exists() and not p.is_file():
            with open(p, "w") as f:
                f.write(text)
        else:  # never a truncated file: the old one stays until the new one is complete
            atomic_write(p.resolve(), lambda f: f.write(text.encode()))
    except (OSError, NoSpaceError) as e:
        print(json.dumps(result), flush=True)  # a full disk at the end must not cost the evaluation
        raise OutputDirError(f"--json {path} was not written ({e.strerror or e}); the results were printed on "
                             "stdout instead") from None


@dataclass
class _Scored:
    """The model to score and the run's config, with what is known of the classes it was trained on.

    Args:
        net: the model.
        cfg: the run's config.
        num_classes: the model's outputs.
        origin: where that count comes from, for messages.
        trained: the classifier was trained (a checkpoint's, or a weights file's own).
        fix: what to change to score the data's classes, for messages (``{found}``: their count).
        classes: the class names the checkpoint stores (None: weights, or an older checkpoint).
    """

    net: nn.Module
    cfg: Config
    num_classes: int
    origin: str
    trained: bool
    fix: str
    classes: Optional[list[str]] = None


def _model_and_config(config: Optional[str], model: Optional[str], checkpoint: Optional[str], overrides: list[str],
                      values: dict[str, Any]) -> _Scored:
    """The model to score and the config of the run: a checkpoint's own, unless ``config`` gives one."""
    named = "model.num_classes" in values or "model.num_classes" in overridden_keys(overrides)
    if checkpoint:
        state = read_checkpoint(checkpoint)
        if config:
            cfg = load_config(config, overrides, values)
        else:
            cfg = config_from_dict(apply_overrides(state["config"], overrides, values))
        trained = int(state["config"]["model"]["num_classes"])
        if named and cfg.model.num_classes != trained:
            raise ConfigError(f"model.num_classes {cfg.model.num_classes} (--num-classes) does not apply to "
                              f"--checkpoint: its model was trained with {trained} classes")
        check_device(cfg.train.device)
        net = model_from_checkpoint_state(state)
        return _Scored(net, cfg, trained, f"trained in {checkpoint}", True,
                       f"evaluate it on data of the {trained} classes it was trained on (--data, --split)",
                       state.get("classes"))
    if model:
        overrides = [f"model.name={model}", *overrides]
    if model and "data.root" not in values:
        raise ConfigError("--model needs --data DIR (an ImageNet-layout folder with val/)")
    cfg = load_config(config, overrides, values)
    check_buildable(cfg)  # before building, which may download weights
    source = cfg.model.pretrained
    counted = None if named or not source else weights_classes(cfg.model.name, source)
    if counted is not None and counted != cfg.model.num_classes:
        _logger.info("the classifier of %s has %d classes: model.num_classes=%d (--num-classes gives another)",
                     _weights_name(source, cfg.model.name), counted, counted)
        cfg = load_config(config, overrides, {**values, "model.num_classes": counted})
    net = build_model(cfg).eval()
    n = cfg.model.num_classes
    if counted is not None:
        return _Scored(net, cfg, n, f"the classifier of {_weights_name(source, cfg.model.name)}", True,
                       f"evaluate on data of the model's {n} classes (--num-classes {{found}} would score an "
                       "untrained classifier in place of the weights' own)")
    return _Scored(net, cfg, n, "model.num_classes", False,
                   "pass --num-classes {found} (or --set model.num_classes={found})")


def _weights_name(source: str, model: str) -> str:
    return f"{model}'s default weights" if source == "default" else source
