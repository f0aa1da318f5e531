"""Export a RedNet for deployment: ONNX, or a torch.export program (.pt2).

    rednet-export --model rednet50 --pretrained --output runs/rednet50.onnx --check
    rednet-export --model rednet50 --involution custom --output runs/rednet50-ort.onnx --check
    rednet-export --model rednet26 --format export --output runs/rednet26.pt2 --check --json

The graph is taken in eval mode with a dynamic batch dimension and a fixed image size. The
file goes to --output (default: runs/<model>.onnx or .pt2; its folder is created), which is
checked before anything is exported.
``--involution`` chooses how involution is recorded:

- ``standard`` (default): a one-hot tap convolution, a multiply and a sum (a few standard ops
  per layer, see ``rednet/ops/_export.py``), so the file runs anywhere ONNX does (any
  runtime, any device) without this package.
- ``custom``: one ``rednet.Involution`` node per layer (ONNX Runtime custom op, domain
  ``ai.rednet``) that generates the kernel, aggregates and applies the BatchNorm and ReLU
  after it in one native pass. Several times faster in ONNX Runtime on a CPU, but the session
  needs the op's library registered: ``rednet.ops.ort_library_path()``.

``--check`` runs the result at batches 1 and 3 (ONNX Runtime for ONNX, with the op library
registered when the file has custom nodes) and compares it with PyTorch's eager output.

Exit status: 0 written (and checked); 1 the check failed; 2 bad input (rednet.engine.EXIT_CODES).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np
import torch

from rednet.engine import CheckpointError, UsageError, check_device_option, check_path_options, run_command
from rednet.fileio import check_output_file
from rednet.models import create_model, list_models
from rednet.ops import export_fused, onnx_translation_table, ort_library_path
from rednet.tools._options import (
    DEFAULT_WEIGHTS,
    add_json,
    add_option,
    add_pretrained,
    check_json,
    pretrained_argument,
    write_json,
)

FORMULATIONS = ("standard", "custom")
CUSTOM_DOMAIN = "ai.rednet"  # of the rednet.Involution op (rednet/ops/_ort.py)

FORMATS = ("onnx", "export")
SUFFIX = {"onnx": ".onnx", "export": ".pt2"}
TOLERANCE = 1e-4  # |exported - eager| <= TOLERANCE * (1 + |eager|), elementwise


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"model name: {', '.join(list_models())}")
    p.add_argument("--format", default="onnx", choices=FORMATS,
                   help="'onnx' (an .onnx file) or 'export' (a torch.export ExportedProgram, .pt2); default: onnx")
    p.add_argument("--involution", default="standard", choices=FORMULATIONS,
                   help="'standard': standard ONNX ops, runs anywhere; 'custom': the rednet.Involution op of "
                        "ONNX Runtime (fused, fast on a CPU; needs rednet.ops.ort_library_path() registered); "
                        "default: standard")
    p.add_argument("--output", default=None, help="output file (default: runs/<model>.onnx or runs/<model>.pt2)")
    add_option(p, "--img-size", old=("--input-size",), type=int, default=None, metavar="PX",
               help="image height and width in pixels (default: the model's pretrained config, 224)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's own)")
    add_pretrained(p, "random weights if omitted")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: the exporter's)")
    p.add_argument("--check", action="store_true", help="run the result at batches 1 and 3 and compare with PyTorch")
    add_json(p, "what was written (nodes, size, time, the check's largest difference)")
    return p


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _validate(args: argparse.Namespace) -> None:
    """Everything that can be checked before the export: the options, the files, the packages it needs."""
    check_path_options(args, ("output", "pretrained", "json"))
    if args.model not in list_models():
        raise UsageError(f"unknown model {args.model!r}; choose one of {', '.join(list_models())}")
    if args.img_size is not None and args.img_size < 32:
        raise UsageError(f"--img-size must be at least 32 (the network downsamples by 32), got {args.img_size}")
    if args.num_classes is not None and args.num_classes < 0:
        raise UsageError(f"--num-classes must be >= 0, got {args.num_classes}")
    if args.opset is not None and args.format != "onnx":
        raise UsageError("--opset applies to --format onnx only")
    if args.pretrained not in (None, DEFAULT_WEIGHTS) and "://" not in args.pretrained \
            and not os.path.isfile(args.pretrained):
        raise UsageError(f"--pretrained {args.pretrained}: no such file (give a file or a URL, or --pretrained "
                         "alone for the default weights)")
    check_device_option("cpu")  # the model is built, exported and checked on the CPU
    needed = ["onnx", "onnxscript"] if args.format == "onnx" else []
    if args.check and args.format == "onnx":
        needed.append("onnxruntime")
    for mod in needed:
        try:
            __import__(mod)
        except ImportError:
            raise UsageError(f"--format onnx{' --check' if mod == 'onnxruntime' else ''} needs the {mod} package "
                             f"(pip install {mod})") from None
    # Last, as it makes the file's folder: a folder, a file under a file or a folder that cannot be written was
    # found only after exporting.
    check_output_file(args.output, "--output")
    check_json(args.json)


def _build(args: argparse.Namespace) -> torch.nn.Module:
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    return create_model(args.model, pretrained=pretrained_argument(args.pretrained), **kwargs).eval()


def _export_onnx(model, x, args) -> tuple[int, int]:
    """Write the ONNX file; (nodes, custom nodes)."""
    batch = torch.export.Dim("batch")
    custom = args.involution == "custom"
    with export_fused() if custom else contextlib.nullcontext():
        torch.onnx.export(
            model, (x,), args.output, dynamo=True, external_data=False, opset_version=args.opset,
            input_names=["input"], output_names=["output"], dynamic_shapes={"x": {0: batch}}, verbose=False,
            custom_translation_table=onnx_translation_table() if custom else None,
        )
    import onnx

    proto = onnx.load(args.output)
    args.opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return len(proto.graph.node), sum(n.domain == CUSTOM_DOMAIN for n in proto.graph.node)


def _export_program(model, x, args) -> tuple[int, int]:
    """Write the ExportedProgram; (call nodes, fused involution nodes)."""
    with export_fused() if args.involution == "custom" else contextlib.nullcontext():
        ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(ep, args.output)
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    return len(calls), sum(n.target == torch.ops.rednet.involution_fused.default for n in calls)


def _ort_session(path: str):
    """An ONNX Runtime session for ``path``, with the rednet.Involution library registered if the file uses it."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    if any(o.domain == CUSTOM_DOMAIN for o in onnx.load(path, load_external_data=False).opset_import):
        options.register_custom_ops_library(ort_library_path())
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _check(model, args, size) -> float:
    """Largest |exported - eager| over batches 1 and 3; raises if beyond the tolerance."""
    if args.format == "onnx":
        sess = _ort_session(args.output)
        run = lambda x: sess.run(None, {"input": x.numpy()})[0]  # noqa: E731
    else:
        program = torch.export.load(args.output).module()
        run = lambda x: program(x).numpy()  # noqa: E731
    worst = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, *size)
        with torch.no_grad():
            ref = model(x).numpy()
            out = run(x)
        if out.shape != ref.shape:
            raise RuntimeError(f"exported output has shape {out.shape} at batch {batch}, PyTorch's is {ref.shape}")
        diff = np.abs(out - ref)
        worst = max(worst, float(diff.max()))
        if (diff > TOLERANCE * (1 + np.abs(ref))).any():
            raise RuntimeError(f"exported output differs from PyTorch's by up to {diff.max():.3g} at batch {batch}")
    return worst


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    args.output = args.output if args.output is not None else os.path.join("runs", f"{args.model}{SUFFIX[args.format]}")
    return run_command(lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    _validate(args)
    weights = f"with weights {args.pretrained}" if args.pretrained else "(random weights)"
    _progress(f"building {args.model} {weights}")
    try:
        model = _build(args)
    except (CheckpointError, OSError, ValueError) as e:  # a missing, unreadable or mismatched weights file
        raise CheckpointError(f"{args.model}: {e}") from None
    size = (model.pretrained_cfg["input_size"][0],
            *((args.img_size,) * 2 if args.img_size else model.pretrained_cfg["input_size"][1:]))
    x = torch.randn(2, *size)  # batch 2: an example batch of 1 would be specialised to a constant
    _progress(f"exporting to {args.format} at {'x'.join(map(str, size))}, dynamic batch ...")
    t0 = time.perf_counter()
    nodes, custom = (_export_onnx if args.format == "onnx" else _export_program)(model, x, args)
    seconds = time.perf_counter() - t0
    nbytes = os.path.getsize(args.output)
    _progress(f"wrote {args.output}: {nodes} nodes ({custom} fused involutions), {nbytes / 2**20:.1f} MiB, "
              f"in {seconds:.1f} s")
    result = {"model": args.model, "format": args.format, "involution": args.involution, "output": args.output,
              "input_size": list(size), "pretrained": args.pretrained, "opset": args.opset, "nodes": nodes,
              "custom_nodes": custom, "bytes": nbytes, "export_seconds": round(seconds, 2)}
    if args.check:
        runner = "ONNX Runtime" if args.format == "onnx" else "the exported program"
        _progress(f"checking {runner} against PyTorch at batches 1 and 3")
        try:
            result["max_abs_diff"] = _check(model, args, size)
        except OSError as e:  # the op library could not be built (no compiler)
            print(f"error: --check needs the rednet.Involution library: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            print(f"error: check failed: {e}", file=sys.stderr)
            return 1
        _progress(f"check passed: max abs diff {result['max_abs_diff']:.2e}")
    if args.json:
        write_json(result, args.json)
    return 0

