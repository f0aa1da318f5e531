"""Draw the kernels a RedNet generates for an image, one heat map per involution group.

    rednet-visualize --model rednet50 --pretrained --image photo.jpg --output maps.png
    rednet-visualize --checkpoint runs/digits/last.pt --layer layer2.1.conv2
    rednet-visualize --model rednet26 --layer list

Each map is, at every position, the sum of the K*K kernel generated there (the paper's
Figure 3), drawn over the eval-transformed crop the model saw. With no --image the
astronaut photo bundled with scikit-image is used. The PNG goes to --output, by default
runs/visualize/kernels_<model>_<layer>.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rednet.analysis.kernels import default_layer, involution_layers
from rednet.analysis.plot import DEFAULT_TOP, load_image, visualize_kernels
from rednet.engine import check_device_option, check_path_options, load_model_from_checkpoint, run_command
from rednet.fileio import check_output_file
from rednet.tools._options import add_json, add_option, add_pretrained, check_json, pretrained_argument, write_json

OUTPUT_DIR = Path("runs") / "visualize"  # where the PNG goes without --output


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Plot an involution layer's generated kernels (sum per position, one map per group).",
    )
    p.add_argument("--model", help="registered model name (rednet26 ... rednet152); taken from --checkpoint if omitted")
    weights = p.add_mutually_exclusive_group()
    add_pretrained(weights)
    weights.add_argument("--checkpoint", metavar="PATH", help="a checkpoint written by rednet-train")
    p.add_argument("--image", metavar="PATH", help="input image (default: scikit-image's astronaut photo)")
    p.add_argument("--layer", metavar="NAME",
                   help="involution layer, e.g. layer3.3.conv2 (default: last block of stage 3); 'list' prints them")
    add_option(p, "--output", old=("--out",), metavar="FILE.png",
               help=f"output PNG (default: {OUTPUT_DIR}/kernels_<model>_<layer>.png)")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="N",
                   help=f"draw the N groups of largest spatial variance (default {DEFAULT_TOP}; 0: all groups)")
    add_option(p, "--img-size", old=("--input-size",), type=int, metavar="PX",
               help="square eval crop size, overriding the model's (smaller runs faster)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available)")
    p.add_argument("--cmap", default="turbo", help="matplotlib colour map (default turbo)")
    p.add_argument("--dpi", type=int, default=100, help="PNG pixels per inch (default 100)")
    add_json(p, "what was drawn (or the layer list)")
    return p


def _load_model(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The model and the data config its eval transform comes from."""
    import rednet
    from rednet.data import eval_data_config

    run_config = None
    if args.checkpoint:
        try:
            model, run_config = load_model_from_checkpoint(args.checkpoint, map_location=args.device)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            parser.error(f"cannot load checkpoint {args.checkpoint}: {e}")
        name = run_config["model"]["name"]
        if args.model and args.model != name:
            parser.error(f"checkpoint {args.checkpoint} holds a {name}, not a {args.model}; "
                         f"drop --model or pass --model {name}")
        args.model = name
    else:
        if not args.model:
            parser.error("--model is required unless --checkpoint is given")
        names = rednet.list_models()
        if args.model not in names:
            parser.error(f"unknown model {args.model!r}; registered: {', '.join(names)}")
        try:
            model = rednet.create_model(args.model, pretrained=pretrained_argument(args.pretrained))
        except (OSError, ValueError, RuntimeError) as e:
            parser.error(f"cannot load pretrained weights {args.pretrained}: {e}")
    return model, eval_data_config(model, run_config, args.img_size)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    return run_command(lambda: _visualize(args, parser))


def _visualize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.top < 0:
        parser.error("--top must be >= 0")
    if args.output and Path(args.output).suffix.lower() != ".png":
        parser.error(f"--output must be a .png file, got {args.output}")
    check_path_options(args, ("output", "image", "checkpoint", "pretrained", "json"))
    check_json(args.json)
    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        parser.error(f"unknown --cmap {args.cmap!r}; e.g. turbo, viridis, inferno, RdBu_r")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"bad --device {args.device!r}: {e}")
    check_device_option(args.device)

    image = None
    if args.layer != "list":
        try:  # before building the model: a typo in the path should fail in a second
            image = load_image(args.image)
        except ValueError as e:
            parser.error(str(e))
    model, data_config = _load_model(args, parser)
    layers = involution_layers(model)
    if not layers:
        parser.error(f"{args.model} has no involution layers to visualize")
    if args.layer == "list":
        rows = [dict(name=n, channels=m.channels, groups=m.groups, kernel_size=m.kernel_size, stride=m.stride)
                for n, m in layers.items()]
        if args.json:
            write_json(rows, args.json, indent=2)
        else:
            for r in rows:
                print(f"{r['name']:<16} channels={r['channels']:<4} groups={r['groups']:<3} "
                      f"kernel={r['kernel_size']} stride={r['stride']}")
        return 0
    layer = args.layer or default_layer(model)
    if layer not in layers:
        parser.error(f"unknown involution layer {layer!r} for {args.model}; valid layers: {', '.join(layers)} "
                     "(or --layer list)")

    if args.checkpoint:
        note = f"{args.model} from {Path(args.checkpoint).name}"
    elif args.pretrained:
        note = f"{args.model}, pretrained weights"
    else:
        # Random kernels look structured too (they follow image edges); say so on the figure.
        note = f"{args.model} with random weights (no --pretrained or --checkpoint)"
        print(f"warning: {note}", file=sys.stderr)
    out = args.output or str(OUTPUT_DIR / f"kernels_{args.model}_{layer}.png")
    check_output_file(out, "--output")  # its folder is made here, before the forward pass
    result = visualize_kernels(model.to(device), image, data_config, out, layer=layer, top=args.top or None,
                               note=note, cmap=args.cmap, dpi=args.dpi)
    result.update(model=args.model, device=str(device), image=args.image or "skimage:astronaut",
                  data_config={k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()})
    ho, wo = result["map_size"]
    if min(ho, wo) < 4:
        # Small-image models (the digits demo) leave stage 3 with a pixel or two per side.
        print(f"warning: {layer} maps are only {ho}x{wo} at a {result['image_size'][1]} px crop; "
              "an earlier layer shows more (--layer list)", file=sys.stderr)
    if args.json:
        write_json(result, args.json, indent=2)
    else:
        shown = len(result["shown"])
        print(f"wrote {result['out']}: {result['layer']}, {shown} of {result['groups']} groups, "
              f"{result['map_size'][0]}x{result['map_size'][1]} maps over a "
              f"{result['image_size'][1]}x{result['image_size'][0]} crop")
    return 0

