"""Convert RedNet weights in any supported layout to this project's safetensors layout.

    rednet-convert-weights RedNet50_pretrained.pdparams runs/rednet50.safetensors
    rednet-convert-weights rednet50-xxxx.pth --output runs/rednet50.safetensors --json
    rednet-convert-weights https://.../RedNet26_pretrained.pdparams runs/rednet26.safetensors --sha256 HEX

The source layout (this project's safetensors, the authors' mmcls ``.pth``, the
PaddleClas ``.pdparams``) is detected from the content. The result is checked
key by key against the model it belongs to before it is written, and weights holding
NaN or infinite values are not written without ``--force``.

Exit status (rednet.engine.EXIT_CODES): 0 written; 2 bad input (unreadable, unsafe or non-fitting weights, an existing
destination without --force, a failed download).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import timm
import torch

from rednet.engine import CheckpointError, UsageError, check_path_options, run_command
from rednet.fileio import check_output_file
from rednet.models import create_model, fit_state_dict, load_weights, save_weights
from rednet.tools._options import add_json, check_json, write_json


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Convert RedNet weights (safetensors, mmcls .pth, PaddleClas .pdparams) to this project's "
        "safetensors layout, printing what was mapped."
    )
    p.add_argument("src", help="source checkpoint: a local path or a URL (downloads into the torch.hub cache)")
    p.add_argument("dst", nargs="?", help="destination .safetensors file (or --output)")
    p.add_argument("--output", help="destination .safetensors file, as DST")
    p.add_argument("--arch", default=None, help="model name (default: inferred from the number of blocks per stage)")
    p.add_argument("--sha256", default=None, type=_sha256, metavar="HEX",
                   help="expected sha256 of the source file (or a prefix); a URL may also end in #sha256=HEX")
    p.add_argument("--timeout", default=None, type=_seconds, metavar="SECONDS",
                   help="abandon a download after this long without data (default: $REDNET_DOWNLOAD_TIMEOUT or 30)")
    add_json(p, "the mapping summary")
    p.add_argument("--force", action="store_true",
                   help="overwrite dst if it exists, and write weights even if they hold NaN or infinite values")
    return p


def _sha256(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{1,64}", text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sha256 hex digest (or a prefix of one)")
    return text.strip().lower()


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    return run_command(lambda: _convert(args))


def _convert(args: argparse.Namespace) -> int:
    if (args.dst is None) == (args.output is None):
        raise UsageError("give the destination once: DST or --output FILE")
    args.dst = args.dst if args.dst is not None else args.output
    check_path_options(args, ("src", "dst", "json"))
    if Path(args.dst).exists() and not args.force:
        raise UsageError(f"{args.dst} exists; pass --force to overwrite it")
    check_output_file(args.dst, "the destination")  # before a download or a conversion that would be lost
    check_json(args.json)
    try:
        wf = load_weights(args.src, sha256=args.sha256, progress=not args.json, timeout=args.timeout)
        arch = args.arch or wf.arch
        if arch is None or not timm.is_model(arch):
            raise CheckpointError(
                f"{args.src}: cannot tell which model these weights are for (got {arch!r}); pass --arch"
            )
        # Check on the meta device: every key and shape against the real model, no memory.
        with torch.device("meta"):
            model = create_model(arch, num_classes=wf.num_classes or 0)
        fit_state_dict(model, wf)
        if wf.nonfinite:
            # A converted file is later trusted as a clean release: don't mint one from broken weights.
            if not args.force:
                raise CheckpointError(f"{wf.source}: {wf.describe_nonfinite()}; refusing to write them to "
                                      f"{args.dst} (pass --force to write them anyway)")
            print(f"warning: {wf.source}: {wf.describe_nonfinite()}; writing them anyway (--force)", file=sys.stderr)
        save_weights(wf.state_dict, args.dst, arch=arch)
    except (OSError, ValueError) as e:  # an unreadable source, a failed download, a destination it cannot write
        raise CheckpointError(str(e)) from None
    s = wf.summary()
    s.update(arch=arch, dst=args.dst)
    if args.json:
        write_json(s, args.json)
        return 0
    print(
        f"read   {s['source']} ({s['container']}, {s['layout']} layout): "
        f"{s['tensors']} tensors, {s['params']:,} parameters"
    )
    print(f"model  {arch}, {s['num_classes']} classes")
    if s["renamed"]:
        examples = "; ".join(f"{a} -> {b}" for a, b in s["rename_examples"])
        print(f"renamed {s['renamed']} keys, e.g. {examples}")
    if s["transposed"]:
        print(f"transposed {', '.join(s['transposed'])} (stored as (in, out))")
    if s["filled"]:
        print(f"filled {s['filled']} BatchNorm num_batches_tracked with 0 (absent in the source)")
    if s["dropped"]:
        print(f"dropped {', '.join(s['dropped'])} (not weights)")
    print(f"wrote  {args.dst} (safetensors, rednet layout)")
    return 0

