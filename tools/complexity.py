#!/usr/bin/env python
"""Print a model's parameters and per-image MACs (GFLOPs in the paper's sense).

    python tools/complexity.py --model rednet50
    python tools/complexity.py --model rednet101 --input-size 288 --json
    python tools/complexity.py --model resnet50          # any timm model name

Counts convolutions, linear layers, BatchNorm (one multiply-add per output element)
and the involution aggregation (K*K*C*Ho*Wo per Involution layer); see
``rednet.analysis.complexity``.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys

import timm

from rednet.analysis.complexity import count_model
from rednet.engine import UsageError, run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Count parameters and multiply-accumulates (MACs) of a model on one forward pass.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model name: rednet26 ... rednet152, or any timm model")
    p.add_argument("--input-size", type=int, default=224, help="input height and width in pixels")
    p.add_argument("--in-chans", type=int, default=3, help="input channels")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's own)")
    p.add_argument(
        "--device", default="meta",
        help="where the forward runs: 'meta' counts from shapes alone (no memory, instant); 'cpu' or 'cuda' run it",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _count(args))


def _count(args: argparse.Namespace) -> int:
    kwargs = {"in_chans": args.in_chans}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if not timm.is_model(args.model):
        near = difflib.get_close_matches(args.model, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise UsageError(f"unknown model {args.model!r}{hint}")
    c = count_model(args.model, (args.in_chans, args.input_size, args.input_size), device=args.device, **kwargs)
    if args.json:
        print(json.dumps(c.as_dict()))
        return 0
    ch, h, w = c.input_size
    print(f"{c.model} @ {ch}x{h}x{w} (per image, counted on {c.device})")
    print(f"  params  {c.params:>15,}  ({c.params / 1e6:.2f} M)")
    print(f"  MACs    {c.macs:>15,}  ({c.gmacs:.3f} G)")
    for kind, n in c.by_type.items():
        if n:
            print(f"    {kind:<11} {n:>15,}  ({100 * n / max(c.macs, 1):.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
