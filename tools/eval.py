#!/usr/bin/env python
"""Single-crop evaluation: top-1, top-5, loss and images/s, optionally written as JSON.

  python tools/eval.py --checkpoint runs/digits/best.pt --json results.json
  python tools/eval.py --model rednet50 --pretrained --data /data/imagenet
  torchrun --nproc_per_node 8 tools/eval.py --model rednet50 --pretrained --data /data/imagenet

With a checkpoint the data and eval transform come from its stored config; with
--pretrained they follow the model's pretrained config (input size, crop_pct,
interpolation, mean/std). Under torchrun every image is scored exactly once.
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
    src.add_argument("--config", help="YAML config giving the model and data (see configs/)")
    src.add_argument("--model", help="any timm model name, e.g. rednet50 or resnet50")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key (repeatable)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--checkpoint", help="a training checkpoint (its stored config is used unless --config is given)")
    w.add_argument("--pretrained", nargs="?", const="default", metavar="PATH|URL",
                   help="published weights of the model, or a local file / URL")
    p.add_argument("--data", help="dataset root with a val/ folder per class (ImageNet layout)")
    p.add_argument("--split", default=None, help="split folder under --data (default: data.val_split, 'val')")
    p.add_argument("--batch-size", type=int, help="per-process batch size")
    p.add_argument("--workers", type=int, help="loader workers per process")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the config's train.device")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="autocast dtype (default: the config's)")
    p.add_argument("--json", help="write the results to this JSON file")
    return p


def _config_overrides(args: argparse.Namespace) -> list[str]:
    """The command-line options as dotted config overrides (after any --set)."""
    overrides = list(args.overrides)
    if args.data:
        overrides += ["data.dataset=imagenet", f"data.root={args.data}"]
    if args.split:
        overrides.append(f"data.val_split={args.split}")
    if args.batch_size:
        overrides.append(f"data.eval_batch_size={args.batch_size}")
    if args.workers is not None:
        overrides.append(f"data.workers={args.workers}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.amp:
        overrides.append(f"train.amp={args.amp}")
    return overrides


def _model_and_config(args: argparse.Namespace, overrides: list[str]):
    """The model to score and the config of the run: a checkpoint's own, unless --config gives one."""
    from rednet.engine import (
        ConfigError,
        apply_overrides,
        build_model,
        config_from_dict,
        load_config,
        load_model_from_checkpoint,
    )

    if args.checkpoint and not args.config:
        model, stored = load_model_from_checkpoint(args.checkpoint)
        return model, config_from_dict(apply_overrides(stored, overrides))
    if args.model:
        overrides = [f"model.name={args.model}", *overrides]
    if args.pretrained:
        overrides.append(f"model.pretrained={args.pretrained}")
    if args.model and not args.data:
        raise ConfigError("--model needs --data DIR (an ImageNet-layout folder with val/)")
    cfg = load_config(args.config, overrides)
    model = load_model_from_checkpoint(args.checkpoint)[0] if args.checkpoint else build_model(cfg).eval()
    return model, cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.checkpoint or args.pretrained or args.config):
        build_parser().error("give --checkpoint PATH or --pretrained [PATH|URL] (or a --config with model.pretrained)")
    from rednet.data import DataError, build_eval_dataset, build_eval_loader, build_eval_transform, eval_data_config
    from rednet.engine import (
        AMP_DTYPES,
        CheckpointError,
        ConfigError,
        cleanup_distributed,
        evaluate,
        init_distributed,
        setup_logging,
    )

    setup_logging(int(os.environ.get("RANK", "0")))
    log = logging.getLogger("rednet")
    try:
        model, cfg = _model_and_config(args, _config_overrides(args))
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    dist_info = init_distributed(cfg.train.device)
    model = model.to(dist_info.device)
    transform = None
    if args.pretrained:
        dc = eval_data_config(model)
        transform = build_eval_transform(dc["input_size"][-1], dc["crop_pct"], dc["interpolation"], dc["mean"],
                                         dc["std"], dc.get("crop_mode"))
        log.info("eval transform from the pretrained config: %s", dc)
    try:
        dataset = build_eval_dataset(cfg.data, cfg.model.num_classes, cfg.model.in_chans, transform)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loader = build_eval_loader(dataset, cfg.data.eval_batch_size or cfg.data.batch_size, dist_info.world_size,
                               dist_info.rank, cfg.data.workers, cfg.data.pin_memory)
    result = evaluate(model, loader, dist_info.device, AMP_DTYPES[cfg.train.amp], cfg.train.channels_last,
                      dist_info.is_main)
    result = {"model": cfg.model.name, "checkpoint": args.checkpoint, "pretrained": args.pretrained,
              "dataset": cfg.data.dataset, "world_size": dist_info.world_size, **result}
    if dist_info.is_main:
        log.info("top-1 %.2f  top-5 %.2f  loss %.4f  %d images  %.0f img/s", result["top1"], result["top5"],
                 result["loss"], result["count"], result["images_per_s"])
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
