"""Print a model's parameters and per-image MACs (GFLOPs in the paper's sense).

    rednet-complexity --model rednet50
    rednet-complexity --model rednet101 --img-size 288 --json
    rednet-complexity --model resnet50          # any timm model name

Counts convolutions, linear layers, BatchNorm (one multiply-add per output element)
and the involution aggregation (K*K*C*Ho*Wo per Involution layer); see
``rednet.analysis.complexity``.
"""
from __future__ import annotations

import argparse
import difflib

import timm

from rednet.analysis.complexity import count_model
from rednet.engine import UsageError, check_device_option, check_path_options, run_command
from rednet.tools._options import add_json, add_option, check_json, write_json


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Count parameters and multiply-accumulates (MACs) of a model on one forward pass.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model name: rednet26 ... rednet152, or any timm model")
    add_option(p, "--img-size", old=("--input-size",), type=int, default=224, metavar="PX",
               help="input height and width in pixels")
    p.add_argument("--in-chans", type=int, default=3, help="input channels")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's own)")
    p.add_argument(
        "--device", default="meta",
        help="where the forward runs: 'meta' counts from shapes alone (no memory, instant); 'cpu' or 'cuda' run it",
    )
    add_json(p, "the counts (instead of text)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    return run_command(lambda: _count(args))


def _count(args: argparse.Namespace) -> int:
    check_path_options(args, ("json",))
    if not timm.is_model(args.model):
        near = difflib.get_close_matches(args.model, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise UsageError(f"unknown model {args.model!r}{hint}")
    # A model that cannot run on 'meta' is counted on the CPU instead: check the backend there.
    check_device_option("cpu" if args.device == "meta" else args.device)
    check_json(args.json)
    kwargs = {"in_chans": args.in_chans}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    c = count_model(args.model, (args.in_chans, args.img_size, args.img_size), device=args.device, **kwargs)
    if args.json:
        write_json(c.as_dict(), args.json)
        return 0
    ch, h, w = c.input_size
    print(f"{c.model} @ {ch}x{h}x{w} (per image, counted on {c.device})")
    print(f"  params  {c.params:>15,}  ({c.params / 1e6:.2f} M)")
    print(f"  MACs    {c.macs:>15,}  ({c.gmacs:.3f} G)")
    for kind, n in c.by_type.items():
        if n:
            print(f"    {kind:<11} {n:>15,}  ({100 * n / max(c.macs, 1):.1f}%)")
    return 0

