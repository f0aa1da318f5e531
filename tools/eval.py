#!/usr/bin/env python
"""Single-crop evaluation: top-1, top-5, loss and images/s, optionally written as JSON.

  python tools/eval.py --checkpoint runs/digits/best.pt --json results.json
  python tools/eval.py --model rednet50 --pretrained --data /data/imagenet
  torchrun --nproc_per_node 8 tools/eval.py --model rednet50 --pretrained --data /data/imagenet

With a checkpoint the data and eval transform come from its stored config; with
--pretrained they follow the model's pretrained config (input size, crop_pct,
interpolation, mean/std). What the command line gives (--img-size, --crop-pct,
--interpolation, --set data.img_size=...) wins over either; the transform used is
logged and stored in the --json file. Under torchrun every image is scored exactly once.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="YAML config giving the model and data: a file, or the name of a bundled "
                                      "config (see --list-configs)")
    src.add_argument("--model", help="any timm model name, e.g. rednet50 or resnet50")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key (repeatable)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--checkpoint", help="a training checkpoint (its stored config is used unless --config is given)")
    w.add_argument("--pretrained", nargs="?", const="default", metavar="PATH|URL",
                   help="published weights of the model, or a local file / URL")
    p.add_argument("--data", help="dataset root with a val/ folder per class (ImageNet layout)")
    p.add_argument("--split", default=None, help="split folder under --data (default: data.val_split, 'val')")
    p.add_argument("--img-size", type=int, help="eval crop size (data.img_size), over the weights' pretrained config")
    p.add_argument("--crop-pct", type=float, help="resize to img-size / crop-pct, then crop (data.eval_crop_pct)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"],
                   help="resize filter (data.interpolation)")
    p.add_argument("--batch-size", type=int, help="per-process batch size")
    p.add_argument("--workers", type=int, help="loader workers per process")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the config's train.device")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"],
                   help="autocast dtype, on a CPU too (default: the config's train.amp on CUDA, fp32 on a CPU)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--list-configs", action="store_true", help="print the bundled configs and exit")
    return p


def _config_overrides(args: argparse.Namespace) -> list[str]:
    """The command-line options as dotted config overrides (after any --set)."""
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append("data.dataset=imagenet")
    for option, key in (("img_size", "img_size"), ("crop_pct", "eval_crop_pct"), ("interpolation", "interpolation")):
        if getattr(args, option) is not None:
            overrides.append(f"data.{key}={getattr(args, option)}")
    if args.batch_size:
        overrides.append(f"data.eval_batch_size={args.batch_size}")
    if args.workers is not None:
        overrides.append(f"data.workers={args.workers}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.amp:
        overrides.append(f"train.amp={args.amp}")
    return overrides


def _config_paths(args: argparse.Namespace) -> dict[str, str]:
    """Path options as config values, taken as typed: ``--data 2024`` is a folder, ``--data null`` too."""
    paths = {}
    if args.data is not None:
        paths["data.root"] = args.data
    if args.split is not None:
        paths["data.val_split"] = args.split
    if args.pretrained is not None:
        paths["model.pretrained"] = args.pretrained
    return paths


def _model_and_config(args: argparse.Namespace, overrides: list[str], paths: dict[str, str]):
    """The model to score and the config of the run: a checkpoint's own, unless --config gives one."""
    from rednet.engine import (
        ConfigError,
        apply_overrides,
        build_model,
        config_from_dict,
        load_config,
        load_model_from_checkpoint,
    )
    from rednet.engine.builder import check_device

    if args.checkpoint and not args.config:
        model, stored = load_model_from_checkpoint(args.checkpoint)
        cfg = config_from_dict(apply_overrides(stored, overrides, paths))
        check_device(cfg.train.device)
        return model, cfg
    if args.model:
        overrides = [f"model.name={args.model}", *overrides]
    if args.model and args.data is None:
        raise ConfigError("--model needs --data DIR (an ImageNet-layout folder with val/)")
    cfg = load_config(args.config, overrides, paths)
    check_device(cfg.train.device)  # before building, which may download weights
    model = load_model_from_checkpoint(args.checkpoint)[0] if args.checkpoint else build_model(cfg).eval()
    return model, cfg


def _check_json(path: str) -> None:
    from rednet.engine import ConfigError
    from rednet.engine.config import check_output_dir

    # Checked before the pass, so that scoring ImageNet is not lost to a results path that cannot be written.
    if Path(path).is_dir():
        raise ConfigError(f"--json {path} is a folder; give a file name")
    check_output_dir(Path(path).parent, "the folder of --json")


def _list_configs() -> int:
    from rednet.engine.config import bundled_configs

    for name, description in bundled_configs().items():
        print(f"{name:<16} {description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_configs:
        return _list_configs()
    if not (args.checkpoint or args.pretrained is not None or args.config):
        build_parser().error("give --checkpoint PATH or --pretrained [PATH|URL] (or a --config with model.pretrained)")
    try:
        return _evaluate(args)
    except KeyboardInterrupt:
        print("interrupted by SIGINT; no results written", file=sys.stderr)
        return 130


def _evaluate(args: argparse.Namespace) -> int:
    from rednet.data import (
        DataError,
        build_device_input,
        build_eval_dataset,
        build_eval_loader,
        build_eval_transform,
        describe_eval_data,
        format_eval_transform,
        resolve_eval_transform,
    )
    from rednet.engine import (
        CheckpointError,
        ConfigError,
        cleanup_distributed,
        empty_path_option,
        evaluate,
        fail,
        init_distributed,
        setup_logging,
    )
    from rednet.engine.builder import autocast_dtype, execution_summary, format_summary
    from rednet.engine.config import overridden_keys

    setup_logging(int(os.environ.get("RANK", "0")))
    log = logging.getLogger("rednet")
    empty = empty_path_option(args, ("config", "checkpoint", "pretrained", "data", "split", "json"))
    if empty:
        return fail(empty)
    try:
        if args.json:
            _check_json(args.json)
        overrides = _config_overrides(args)
        model, cfg = _model_and_config(args, overrides, _config_paths(args))
        dist_info = init_distributed(cfg.train.device)
        model = model.to(dist_info.device)
        # With --pretrained the weights' own config sets the transform, but what the command line gives wins.
        named = [key.split(".", 1)[1] for key in overridden_keys(overrides) if key.startswith("data.")]
        settings = resolve_eval_transform(cfg.data, cfg.model.in_chans, model if args.pretrained else None, named)
        transform = build_eval_transform(settings["input_size"][-1], settings["crop_pct"], settings["interpolation"],
                                         settings["mean"], settings["std"], settings["crop_mode"], cfg.data.decode)
        log.info("%s", format_eval_transform(settings))
        dataset = build_eval_dataset(cfg.data, cfg.model.num_classes, cfg.model.in_chans, transform)
        loader = build_eval_loader(dataset, cfg.data.eval_batch_size or cfg.data.batch_size, dist_info.world_size,
                                   dist_info.rank, cfg.data.workers, cfg.data.pin_memory)
        execution = execution_summary(model, cfg, dist_info.device)
        log.info("execution: %s", format_summary(execution))
        device_input = build_device_input(cfg.data, dist_info.device, dataset, train=False,
                                          mean=settings["mean"], std=settings["std"])
        result = evaluate(model, loader, dist_info.device, autocast_dtype(cfg, dist_info.device),
                          cfg.train.channels_last, dist_info.is_main, device_input=device_input)
    except (ConfigError, CheckpointError, DataError) as e:
        return fail(e)
    result = {"model": cfg.model.name, "checkpoint": args.checkpoint, "pretrained": args.pretrained,
              **describe_eval_data(cfg.data, settings), "world_size": dist_info.world_size, "execution": execution,
              **result}
    if dist_info.is_main:
        log.info("top-1 %.2f  top-5 %.2f  loss %.4f  %d images  %.0f img/s", result["top1"], result["top5"],
                 result["loss"], result["count"], result["images_per_s"])
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
