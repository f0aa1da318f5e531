"""Benchmark the involution operator and RedNet against its memory floor and ResNet.

    rednet-benchmark op --device cpu                 # reference vs unfold, batch 2
    rednet-benchmark op --device cuda                # every backend, batch 64 and 128
    rednet-benchmark model --device cuda [--compile] # img/s, RedNet vs ResNet (timm)
    rednet-benchmark selfcheck                       # first run on a GPU: check, then op and model
    rednet-benchmark race --threads 2                # CPU: RedNet-50 vs ResNet-50, every path
    rednet-benchmark data                            # input pipeline: CPU per image, old vs new
    rednet-benchmark host                            # host cost of a CUDA call, launches faked
    rednet-benchmark gpu                             # a GPU's first run: tests, sanitizer, speed

Results go into ``--output`` (default ``runs/benchmarks/``; the project's own are committed
with ``--output benchmarks/results``), as ``<date>-<what>.json`` and a markdown table beside it,
or into ``--json FILE``; ``--json`` alone also prints them on stdout. A run never replaces an
earlier one's rows: ``op``, ``model`` and ``selfcheck`` add theirs to the day's file of the
device (its header lists every command that wrote it), ``race`` appends its run, and ``data``,
``host`` and ``gpu`` write a new file (``-2``, ``-3``... when the name is taken).

``op``: every distinct involution of RedNet-50 at 224x224 (stem, the four stages, the
stride-2 first blocks), forward and forward+backward, per backend, dtype and memory format. Each
row has the floor: the bytes the pass must move (x, kernel and y once forward; grad_y, x
and kernel read and grad_x, grad_kernel written backward) divided by the copy bandwidth
measured in the same run, and the peak memory the pass allocates beyond its inputs.

``model``: training (forward, backward, SGD step; AMP bf16, channels_last) and inference
images/s with peak memory, per involution backend, against ResNet-50/101.

``race``: RedNet-50 against ResNet-50 in one process on the same threads, 224 px, fp32, on
every path a deployment takes (``--paths``): ``eager`` inference (channels_last,
``torch.inference_mode``: RedNet's fused inference pass), ``train`` (one eager SGD step, at
the largest batch), ``compile`` (``torch.compile`` with freezing, each model compiled the
same way) and ``ort`` (ONNX Runtime on the graphs ``tools/export.py`` writes: RedNet with the
``rednet.Involution`` op and with standard ops only, ResNet-50 with standard ops; each
output is compared with eager PyTorch's), at batches 1 and 8. Within a path and batch the
models' runs alternate, repeat after repeat; each row has the median time and the median of
the per-repeat ratios (ResNet ms / RedNet ms: above 1, RedNet is faster). The run also times
the ONNX Runtime op's per-call overhead (``ort_call_overhead``) and records the CPU's model
and SIMD flags, on which the ratios depend. Each run is appended to ``<date>-cpu-race.json``
(and ``.md``); earlier runs are kept.

``selfcheck``: a machine's first contact with the CUDA kernels. One pass/fail line per
dtype, RedNet window (K, stride, dilation) and memory format of the kernels' first-contact
check (compile, then forward and both gradients against the reference; see
``rednet.ops.check_cuda_kernel``), then, if all pass, ``op`` at batch 64 and ``model`` for
RedNet-50 vs ResNet-50 (AMP bf16, channels_last). Exit status: 0 all passed, 1 a check
failed (its cause is printed: include this output in a report), 2 no GPU.

``data``: the input pipeline's CPU cost on ImageNet-like JPEGs made from scikit-image's photos,
the path before issue 17 (PIL, float32 batches) against rednet.data's (torchvision.io, uint8),
interleaved round by round, in CPU time (see ``rednet.analysis.inputbench``); into
``<date>-data-cpu[-N].json`` (a new file each run).

``host``: the host's share of the CUDA path (validation, backend choice, the custom op and its
autograd, launch plans, allocation) per involution layer-step (forward and both gradients),
with each launch replaced by a no-op (``rednet.ops.measure_host_overhead``), over RedNet-50's
involution layers at 224x224 (default batch 32, bf16, both memory formats). It runs on a CPU,
its tensors standing in for CUDA ones; into ``<date>-host-<device>[-N].json``.

``gpu``: everything a first GPU run should record, in under 10 minutes, into one results file
(``<date>-gpu-check-<device>[-N].json`` and its markdown): ``pytest -m gpu`` (from a checkout);
``compute-sanitizer`` memcheck and racecheck on the first-contact check's problems (``selfcheck``;
the sanitizer comes with the CUDA toolkit, found on PATH or beside ``nvcc``, and its steps are
recorded as skipped without it); the op against its floor (batch 64, bf16, both memory formats);
RedNet-50 against ResNet-50 training images/s (bf16, channels_last). Each step has a time budget
(``GPU_STEPS``) within the whole command's (``GPU_CHECK_BUDGET_S``); a step that runs over is
stopped, with everything it started, and recorded as ``timeout``. The file holds the device,
driver, CUDA, torch, CuPy, NVRTC and sanitizer versions, and each step's command, status,
time and output. Exit status: 0 no step failed, 1 a step failed or ran out of time, 2 no GPU.

``op``, ``model`` and ``selfcheck`` results go to ``<date>-<device>.json``, with the rows of
earlier runs of that day and device, and a markdown table beside it.

This package holds the command (``build_parser``, ``main``) and one module per mode (``op``,
``model``, ``race``, ``data``, ``host``, ``selfcheck``, ``gpu``), on top of what they share
(``_common``: timing and memory; ``results``: the results files).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
from pathlib import Path

import torch

from rednet.analysis.shapes import InvolutionShape, involution_shapes
from rednet.engine import UsageError, check_device_option, run_command
from rednet.ops import MEMORY_FORMATS
from rednet.tools._options import add_json, add_option

from ._common import DTYPES, copy_gbps, cupy_version, device_name, log
from .data import run_data
from .gpu import run_gpu
from .host import run_host
from .model import MODES, run_model
from .op import OP_BACKENDS, PASSES, run_op
from .race import RACE_PATHS, race_mode
from .results import OUTPUT, check_destination, command_line, default_out, print_if_asked, results_file, write_results
from .selfcheck import run_selfcheck

__all__ = ["build_parser", "main", "resolve_args"]


def _csv(s: str) -> list[str]:
    return s.split(",")


def _csv_ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",")]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("mode", choices=("op", "model", "selfcheck", "race", "data", "host", "gpu"))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=_csv_ints, default=None,
                   help="op batch sizes, comma-separated (default: 64,128 on cuda, 2 on cpu)")
    p.add_argument("--shapes", type=_csv, default=None,
                   help="op shape names, comma-separated (default: all; e.g. stem,layer1,layer2.down)")
    p.add_argument("--backends", type=_csv, default=None,
                   help="comma-separated; op: reference,unfold,cupy (cpu: reference,unfold); model: reference,cupy")
    p.add_argument("--dtypes", type=_csv, default=None, help="op dtypes (default: fp32,bf16 on cuda, fp32 on cpu)")
    p.add_argument("--memory-formats", "--layouts", type=_csv, default=None,
                   help="op memory formats, nchw and/or nhwc (default: both on cuda, nchw on cpu)")
    p.add_argument("--passes", type=_csv, default=None, help="fwd,fwd+bwd (default: both on cuda, fwd+bwd on cpu)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per row; the median is reported (default 50 cuda, 5 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 10 cuda, 1 cpu)")
    p.add_argument("--models", type=_csv, default=None,
                   help="model: rednet26,rednet50,rednet101,resnet50,resnet101; race: rednet50,resnet50 "
                        "(the last is the baseline)")
    p.add_argument("--modes", type=_csv, default=None, help="train,infer (default: both)")
    p.add_argument("--model-batch", type=int, default=128, help="first batch tried; halved on out-of-memory")
    p.add_argument("--race-batch", type=_csv_ints, default=None, help="race: batch sizes (default 1,8)")
    p.add_argument("--paths", type=_csv, default=None,
                   help=f"race: comma-separated, of {','.join(RACE_PATHS)} (default: all)")
    add_option(p, "--img-size", old=("--race-size",), type=int, default=224, metavar="PX",
               help="race: image height and width in pixels (default 224)")
    p.add_argument("--no-ort-standard", dest="ort_standard", action="store_false",
                   help="race: leave out RedNet with standard ONNX ops (the slow portable graph)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--no-amp", action="store_true", help="model mode in fp32 instead of AMP bf16")
    p.add_argument("--copy-mb", type=int, default=None,
                   help="buffer size for the copy bandwidth (default 1024 cuda, 256 cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--output", default=str(OUTPUT), metavar="DIR",
                   help=f"the results folder (default {OUTPUT}; the committed results: benchmarks/results)")
    add_json(p, "the results (written into --output in any case)")
    p.add_argument("--checks-only", action="store_true", help="selfcheck: stop after the checks, no benchmarks")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="host: also time the launch plans of this git revision, alternating round by round")
    p.add_argument("--images", type=int, default=300, help="data: JPEGs per split (default 300)")
    p.add_argument("--workers", type=int, default=2, help="data: loader workers feeding the main process (default 2)")
    return p


def resolve_args(args: argparse.Namespace) -> list[InvolutionShape]:
    """Fill in the device-dependent defaults and check every list; the op shapes to run.

    Raises:
        UsageError: a bad argument, with what to choose instead.
    """
    gpu = args.device == "cuda"
    check_device_option(args.device)  # a GPU for --device cuda, and a $REDNET_INVOLUTION_BACKEND that runs there
    race = args.mode == "race"
    if race and gpu:
        raise UsageError("race runs on the CPU; drop --device cuda (use model mode on a GPU)")
    args.models = args.models or (["rednet50", "resnet50"] if race else
                                  ["rednet26", "rednet50", "rednet101", "resnet50", "resnet101"])
    args.batch = args.batch or ([64, 128] if gpu else [2])
    args.backends = args.backends or (["reference", "unfold", "cupy"] if gpu and args.mode == "op" else
                                      ["reference", "cupy"] if gpu else ["reference", "unfold"])
    args.dtypes = args.dtypes or (["fp32", "bf16"] if gpu else ["fp32"])
    args.memory_formats = args.memory_formats or (list(MEMORY_FORMATS) if gpu else
                                                  ["nhwc"] if race else ["nchw"])
    args.race_batch = args.race_batch or [1, 8]
    args.paths = args.paths or list(RACE_PATHS)
    bad = [p for p in args.paths if p not in RACE_PATHS]
    if bad:
        raise UsageError(f"--paths: unknown {bad}; choose from {list(RACE_PATHS)}")
    if race and "ort" in args.paths:
        for mod in ("onnx", "onnxscript", "onnxruntime"):
            if importlib.util.find_spec(mod) is None:
                raise UsageError(f"--paths ort needs the {mod} package (pip install {mod}); or leave ort out")
    args.modes = args.modes or list(MODES)
    args.passes = args.passes or (list(PASSES) if gpu else ["fwd+bwd"])
    args.repeats = args.repeats or (50 if gpu else 7 if race else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2 if race else 1)
    for flag, vals, allowed in (("--dtypes", args.dtypes, DTYPES), ("--memory-formats", args.memory_formats,
                                MEMORY_FORMATS), ("--passes", args.passes, PASSES), ("--modes", args.modes, MODES),
                                ("--backends", args.backends, OP_BACKENDS)):
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise UsageError(f"{flag}: unknown {bad}; choose from {list(allowed)}")
    if args.mode != "op":
        return []
    shapes = involution_shapes("rednet50", 224)
    if args.shapes:
        names = [s["name"] for s in shapes]
        unknown = [w for w in args.shapes if w not in names]
        if unknown:
            raise UsageError(f"--shapes: unknown {unknown}; choose from {names}")
        shapes = [s for s in shapes if s["name"] in args.shapes]
    return shapes


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    modes = {"selfcheck": lambda: run_selfcheck(args, argv), "data": lambda: run_data(args, argv),
             "host": lambda: run_host(args, argv), "gpu": lambda: run_gpu(args, argv)}
    return run_command(modes.get(args.mode, lambda: _benchmark(args, argv)))


def _benchmark(args: argparse.Namespace, argv: list[str] | None) -> int:
    shapes = resolve_args(args)
    check_destination(args)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    date = dt.date.today().isoformat()
    gbps = copy_gbps(device, args.copy_mb or (1024 if device.type == "cuda" else 256))
    log(f"{device_name(device)}: copy bandwidth {gbps:.1f} GB/s")
    command = command_line(argv)
    res = dict(device=device_name(device), torch=torch.__version__, cuda=torch.version.cuda, cupy=cupy_version(),
               date=date, copy_gbps=gbps, command=command, op=[], model=[])
    if args.mode == "race":
        return race_mode(args, date, command)
    out = results_file(args) or default_out(device, date, Path(args.output))
    res[args.mode] = run_op(args, device, gbps, shapes) if args.mode == "op" else run_model(args, device)
    write_results(out, res, args.mode)
    print_if_asked(args, res)
    return 0

