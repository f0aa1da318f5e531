"""Single-crop evaluation: top-1, top-5, loss and images/s, optionally as JSON.

  rednet-eval --checkpoint runs/digits/best.pt --json results.json
  rednet-eval --model rednet50 --pretrained --data /data/imagenet --json
  torchrun --nproc_per_node 8 -m rednet eval --model rednet50 --pretrained --data /data/imagenet

With a checkpoint the data and eval transform come from its stored config; with
--pretrained they follow the model's pretrained config (input size, crop_pct,
interpolation, mean/std). What the command line gives (--img-size, --crop-pct,
--interpolation, --set data.img_size=...) wins over either; the transform used is
logged and stored in the --json result. Under torchrun every image is scored exactly once.

The model's classes must be the data's: the same count, and with a checkpoint the same names
(checkpoints store them; --allow-config-change scores renamed folders anyway). With a weights
file or URL the model gets as many classes as its classifier, unless --num-classes (or --set
model.num_classes) says otherwise.
Exit status (rednet.engine.EXIT_CODES): 0 done; 2 bad config, checkpoint, weights or data, classes that
differ from the model's, or a results file that cannot be written (checked before scoring; if writing
fails at the end, the results are printed on stdout); 130 Ctrl-C (no results written).
"""
from __future__ import annotations

import argparse

from rednet.tools._options import add_json, add_pretrained

# Path options and the config keys they set (--pretrained goes to run_eval, whose transform follows it).
PATH_KEYS = {"data": "data.root", "split": "data.val_split"}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="YAML config giving the model and data: a file, or the name of a bundled "
                                      "config (see --list-configs)")
    src.add_argument("--model", help="any timm model name, e.g. rednet50 or resnet50")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key (repeatable)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--checkpoint", help="a training checkpoint (its stored config is used unless --config is given)")
    add_pretrained(w)
    p.add_argument("--data", help="dataset root with a val/ folder per class (ImageNet layout)")
    p.add_argument("--split", default=None, help="split folder under --data (default: data.val_split, 'val')")
    p.add_argument("--img-size", type=int, help="eval crop size (data.img_size), over the weights' pretrained config")
    p.add_argument("--crop-pct", type=float, help="resize to img-size / crop-pct, then crop (data.eval_crop_pct)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"],
                   help="resize filter (data.interpolation)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (model.num_classes; default: the weights' "
                                                     "classifier, else the config's); must equal the data's classes")
    p.add_argument("--batch-size", type=int, help="per-process batch size")
    p.add_argument("--workers", type=int, help="loader workers per process")
    p.add_argument("--threads", type=int, help="CPU threads per process (train.cpu_threads, torch.set_num_threads)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the config's train.device")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"],
                   help="autocast dtype, on a CPU too (default: the config's train.amp on CUDA, fp32 on a CPU)")
    add_json(p, "the results (what was scored, top-1, top-5, loss, images/s)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="score a checkpoint on data whose class names differ from those it was trained on "
                        "(same count), e.g. renamed class folders")
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
    if args.num_classes is not None:
        overrides.append(f"model.num_classes={args.num_classes}")
    if args.batch_size:
        overrides.append(f"data.eval_batch_size={args.batch_size}")
    if args.workers is not None:
        overrides.append(f"data.workers={args.workers}")
    if args.threads is not None:
        overrides.append(f"train.cpu_threads={args.threads}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.amp:
        overrides.append(f"train.amp={args.amp}")
    return overrides


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not (args.list_configs or args.checkpoint or args.pretrained is not None or args.config):
        parser.error("give --checkpoint PATH or --pretrained [PATH|URL] (or a --config with model.pretrained)")
    # Only now: the engine imports torch, which --help and a usage error need not wait for.
    from rednet.engine import check_path_options, list_configs, path_values, run_command, run_eval

    if args.list_configs:
        return list_configs()

    def evaluate() -> int:
        check_path_options(args, ("config", "checkpoint", "pretrained", "data", "split", "json"))
        run_eval(args.config, model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                 overrides=_config_overrides(args), values=path_values(args, PATH_KEYS), json_path=args.json,
                 allow_config_change=args.allow_config_change)
        return 0

    return run_command(evaluate, log=True, interrupted="interrupted by SIGINT; no results written")

