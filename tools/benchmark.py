#!/usr/bin/env python
"""Benchmark the involution operator and RedNet against its memory floor and ResNet.

    python tools/benchmark.py op --device cpu                 # reference vs unfold, batch 2
    python tools/benchmark.py op --device cuda                # every backend, batch 64 and 128
    python tools/benchmark.py model --device cuda [--compile] # img/s, RedNet vs ResNet (timm)
    python tools/benchmark.py selfcheck                       # first run on a GPU: check, then op and model
    python tools/benchmark.py race --threads 2                # CPU: RedNet-50 vs ResNet-50, interleaved
    python tools/benchmark.py data                            # input pipeline: CPU per image, old vs new

``op``: every distinct involution of RedNet-50 at 224x224 (stem, the four stages, the
stride-2 first blocks), forward and forward+backward, per backend, dtype and memory format. Each
row has the floor: the bytes the pass must move (x, kernel and y once forward; grad_y, x
and kernel read and grad_x, grad_kernel written backward) divided by the copy bandwidth
measured in the same run, and the peak memory the pass allocates beyond its inputs.

``model``: training (forward, backward, SGD step; AMP bf16, channels_last) and inference
images/s with peak memory, per involution backend, against ResNet-50/101.

``race``: RedNet-50 against ResNet-50 in one process on the same threads (default batch 8,
224 px, fp32, channels_last and NCHW, inference and a training step): the models' steps
alternate, repeat after repeat, and the result is the median of each model's times and
the median of the per-repeat ratios (ResNet ms / RedNet ms: above 1, RedNet is faster).

``selfcheck``: a machine's first contact with the CUDA kernels. One pass/fail line per
dtype, RedNet window (K, stride, dilation) and memory format of the kernels' first-contact
check (compile, then forward and both gradients against the reference; see
``rednet.ops.check_cuda_kernel``), then, if all pass, ``op`` at batch 64 and ``model`` for
RedNet-50 vs ResNet-50 (AMP bf16, channels_last). Exit status: 0 all passed, 1 a check
failed (its cause is printed: include this output in a report), 2 no GPU.

``data``: the input pipeline's CPU cost on ImageNet-like JPEGs made from scikit-image's photos,
the path before issue 17 (PIL, float32 batches) against rednet.data's (torchvision.io, uint8),
interleaved round by round, in CPU time (see ``rednet.analysis.inputbench``); into
``benchmarks/results/<date>-data-cpu[-N].json`` (a new file each run).

Results go to ``benchmarks/results/<date>-<device>.json`` (rows of the other modes already
in that file are kept) and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import rednet
from rednet.analysis.shapes import InvolutionShape, involution_shapes
from rednet.engine import UsageError, run_command
from rednet.ops import (
    MEMORY_FORMATS,
    can_use_cuda_kernel,
    check_cuda_kernel,
    involution,
    involution_cupy,
    involution_output_size,
    involution_reference,
    involution_unfold,
    select_backend,
    use_backend,
)

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
OP_BACKENDS = {
    "reference": involution_reference,
    "unfold": involution_unfold,
    "cupy": involution_cupy,
    "native": lambda x, kernel, stride, padding, dilation: involution(x, kernel, stride, padding, dilation, "native"),
}
PASSES = ("fwd", "fwd+bwd")
MODES = ("train", "infer")
SECTIONS = ("op", "model", "selfcheck", "race")  # one per mode; each run replaces its own and keeps the others
CHECK_WINDOWS = ((3, 1, 1), (7, 1, 1), (7, 2, 1))  # RedNet's (K, stride, dilation): stem, blocks, stride-2 blocks


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def shape_str(s: InvolutionShape) -> str:
    return f"{s['C']}x{s['H']}x{s['W']} K{s['K']} s{s['stride']} G{s['G']}"


# ----------------------------------------------------------------------------------------
# Timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` after ``warmup`` calls: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes PyTorch allocates during one call of ``fn``, beyond what was live before.

    CUDA: the caching allocator's peak statistic. CPU: the profiler's allocation/free
    events replayed in order (PyTorch allocations only, not the Python heap).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every allocation (+bytes) and free (-bytes) as a raw "[memory]" event; the aggregated
    # FunctionEvents fold them into their ops, which loses the order.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def copy_gbps(device: torch.device, mbytes: int) -> float:
    """Device copy bandwidth: bytes read plus bytes written per second of ``dst.copy_(src)``."""
    n = mbytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, repeats=20)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------
# op mode


class OpCase(NamedTuple):
    shape: InvolutionShape
    batch: int
    dtype: str  # a key of DTYPES
    memory_format: str  # one of MEMORY_FORMATS
    backend: str  # a key of OP_BACKENDS


def op_inputs(s: InvolutionShape, batch: int, dtype: torch.dtype, memory_format: str, device: torch.device):
    """x (B, C, H, W) and kernel (B, G, K, K, Ho, Wo), laid out as a channels_last network makes them."""
    k, st = s["K"], s["stride"]
    pad = (k - 1) // 2
    ho, wo = (involution_output_size(n, k, st, pad, 1) for n in (s["H"], s["W"]))
    fmt = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
    x = torch.randn(batch, s["C"], s["H"], s["W"], device=device, dtype=dtype).contiguous(memory_format=fmt)
    gen = torch.randn(batch, s["G"] * k * k, ho, wo, device=device, dtype=dtype).contiguous(memory_format=fmt)
    return x, gen.view(batch, s["G"], k, k, ho, wo), st, pad


def floor_bytes(x: torch.Tensor, kernel: torch.Tensor, y_numel: int, with_backward: bool) -> int:
    fwd = x.numel() + kernel.numel() + y_numel  # read x and kernel, write y
    bwd = y_numel + x.numel() + kernel.numel() + x.numel() + kernel.numel()  # read grad_y, x, kernel; write grads
    return (fwd + (bwd if with_backward else 0)) * x.element_size()


def _op_step(fn: Callable, with_backward: bool, x: torch.Tensor, kernel: torch.Tensor, stride: int,
             pad: int) -> Callable[[], object]:
    """One timed call of ``fn``: the forward alone, or the forward and both gradients."""
    if not with_backward:
        def forward():
            with torch.no_grad():
                return fn(x, kernel, stride, pad, 1)
        return forward
    xg, kg = x.detach().requires_grad_(), kernel.detach().requires_grad_()
    grad_y = torch.randn(x.shape[0], x.shape[1], *kernel.shape[-2:], device=x.device, dtype=x.dtype)

    def forward_backward():
        y = fn(xg, kg, stride, pad, 1)
        return torch.autograd.grad(y, (xg, kg), grad_y)
    return forward_backward


def _op_rows(case: OpCase, args, device: torch.device, gbps: float, progress: str) -> list[dict]:
    """One row per pass of ``case``: median ms, the bandwidth floor and the peak memory."""
    s, batch, dname, memory_format, backend = case
    x, kernel, stride, pad = op_inputs(s, batch, DTYPES[dname], memory_format, device)
    y_numel = batch * s["C"] * kernel.shape[-2] * kernel.shape[-1]
    rows = []
    for pas in args.passes:
        try:
            step = _op_step(OP_BACKENDS[backend], pas == "fwd+bwd", x, kernel, stride, pad)
            ms = time_ms(step, device, args.warmup, args.repeats)
            mem = peak_bytes(step, device)
        except torch.OutOfMemoryError:
            log(f"  OOM: {backend} {s['name']} {dname} {memory_format} {pas} batch {batch}")
            ms, mem = None, None
            torch.cuda.empty_cache()
        fb = floor_bytes(x, kernel, y_numel, pas == "fwd+bwd")
        # "layout" is the results files' key for the memory format; kept so old files still merge.
        row = dict(shape=shape_str(s), name=s["name"], count=s["count"], batch=batch, dtype=dname,
                   layout=memory_format, backend=backend, **{"pass": pas}, ms=ms, floor_ms=fb / (gbps * 1e9) * 1e3,
                   peak_mem_mb=None if mem is None else mem / 2**20)
        rows.append(row)
        log(f"{progress} {s['name']:<12} {shape_str(s):<24} b{batch} {dname} {memory_format} {backend:<9} "
            f"{pas:<7} {'OOM' if ms is None else f'{ms:9.3f} ms'}  floor {row['floor_ms']:.3f} ms  "
            f"peak {'-' if mem is None else f'{mem / 2**20:.1f} MiB'}")
    return rows


def run_op(args, device: torch.device, gbps: float, shapes: list[InvolutionShape]) -> list[dict]:
    rows = []
    cases = [OpCase(s, b, dn, fmt, be) for b in args.batch for s in shapes for dn in args.dtypes
             for fmt in args.memory_formats for be in args.backends]
    for n, case in enumerate(cases, 1):
        if case.backend == "cupy":
            ok, why = can_use_cuda_kernel(torch.empty(0, device=device, dtype=DTYPES[case.dtype]))
            if not ok:
                log(f"skip cupy: {why}")
                continue
        rows += _op_rows(case, args, device, gbps, f"[{n}/{len(cases)}]")
    return rows


# ----------------------------------------------------------------------------------------
# model mode


def _make_model(name: str, device: torch.device) -> torch.nn.Module:
    # rednet.create_model builds any timm model too; `import rednet` alone no longer registers RedNet with timm.
    return rednet.create_model(name, num_classes=1000).to(device).to(memory_format=torch.channels_last)


def _train_step(run: Callable, model: torch.nn.Module, imgs: torch.Tensor, target: torch.Tensor,
                amp) -> Callable[[], None]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def step():
        with amp:
            loss = torch.nn.functional.cross_entropy(run(imgs), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _infer_step(run: Callable, model: torch.nn.Module, imgs: torch.Tensor, amp) -> Callable[[], object]:
    model.eval()

    def step():
        with torch.inference_mode(), amp:
            return run(imgs)
    return step


def _model_throughput(name: str, backend: str, mode: str, batch: int, device: torch.device, args) -> dict:
    # "-": a model without involutions; the reference is forced so nothing probes CuPy.
    with use_backend(backend if backend != "-" else "reference"):
        if args.compile:
            torch._dynamo.reset()  # a fresh trace per model and backend; frees the previous ones
        model = _make_model(name, device)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_amp)
        imgs = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (batch,), device=device)
        run = torch.compile(model) if args.compile else model
        if mode == "train":
            step = _train_step(run, model, imgs, target, amp)
        else:
            step = _infer_step(run, model, imgs, amp)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = time_ms(step, device, args.warmup, args.repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(model=name, backend=backend, mode=mode, batch=batch, img_per_s=batch / (ms * 1e-3),
                peak_mem_gb=peak, compile=args.compile, amp="bf16" if not args.no_amp else "off")


def _largest_batch_throughput(name: str, backend: str, mode: str, device: torch.device, args) -> dict | None:
    """Throughput at --model-batch, halved on out-of-memory until it fits; None if batch 1 does not."""
    batch = args.model_batch
    while batch >= 1:
        try:
            return _model_throughput(name, backend, mode, batch, device, args)
        except torch.OutOfMemoryError:
            log(f"  OOM: {name} {backend} {mode} batch {batch}; halving")
            batch //= 2
            gc.collect()
            torch.cuda.empty_cache()
    return None


def run_model(args, device: torch.device) -> list[dict]:
    rows = []
    jobs = [(m, be) for m in args.models if m.startswith("rednet") for be in args.backends
            if be in ("reference", "cupy")]
    jobs += [(m, "-") for m in args.models if not m.startswith("rednet")]
    for name, backend in jobs:
        if backend == "cupy":
            ok, why = can_use_cuda_kernel(torch.empty(0, device=device))
            if not ok:
                log(f"skip {name} cupy: {why}")
                continue
        for mode in args.modes:
            row = _largest_batch_throughput(name, backend, mode, device, args)
            if row is None:
                continue
            rows.append(row)
            peak = row["peak_mem_gb"] if row["peak_mem_gb"] is None else round(row["peak_mem_gb"], 2)
            log(f"{name:<10} {backend:<9} {mode:<5} batch {row['batch']:<4} {row['img_per_s']:9.1f} img/s  "
                f"peak {peak} GB")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------
# race mode


def _race_step(name: str, mode: str, memory_format: str, batch: int) -> Callable[[], object]:
    """One fp32 training step or inference pass of ``name`` on the CPU, in ``memory_format``."""
    fmt = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
    model = rednet.create_model(name, num_classes=1000).to(memory_format=fmt)
    imgs = torch.randn(batch, 3, 224, 224).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (batch,))
    fp32 = torch.autocast("cpu", enabled=False)
    return _train_step(model, model, imgs, target, fp32) if mode == "train" else _infer_step(model, model, imgs, fp32)


def run_race(args) -> list[dict]:
    """Each model's step in turn, ``repeats`` times, per (memory format, mode); the last model is the baseline."""
    rows = []
    probe = torch.empty(1, 16, 8, 8)
    for memory_format in args.memory_formats:
        for mode in args.modes:
            steps = {name: _race_step(name, mode, memory_format, args.race_batch) for name in args.models}
            for step in steps.values():
                for _ in range(args.warmup):
                    step()
            times: dict[str, list[float]] = {name: [] for name in steps}
            for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every model
                for name, step in steps.items():
                    t0 = time.perf_counter()
                    step()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            base = args.models[-1]
            for name, ms in times.items():
                ratio = statistics.median(b / t for b, t in zip(times[base], ms))
                backend = select_backend(probe) if name.startswith("rednet") else "-"
                row = dict(model=name, memory_format=memory_format, mode=mode, batch=args.race_batch,
                           threads=torch.get_num_threads(), backend=backend, ms=statistics.median(ms),
                           img_per_s=args.race_batch / statistics.median(ms) * 1e3, baseline=base,
                           vs_baseline=ratio, times_ms=ms)
                rows.append(row)
                log(f"{memory_format} {mode:<5} {name:<10} {backend:<9} median {row['ms']:8.1f} ms  "
                    f"{row['img_per_s']:6.1f} img/s  {ratio:.2f}x {base}")
            del steps
            gc.collect()
    return rows


# ----------------------------------------------------------------------------------------
# Results


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def default_out(device: torch.device, date: str) -> Path:
    if device.type == "cpu":
        slug = "cpu"
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return ROOT / "benchmarks" / "results" / f"{date}-{slug}.json"


def _fmt(v, nd=3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def markdown(res: dict) -> str:
    gbps = "-" if res.get("copy_gbps") is None else f"{res['copy_gbps']:.1f}"
    lines = [f"# Benchmark {res['date']}: {res['device']}", "",
             f"torch {res['torch']}, CUDA {res['cuda']}, CuPy {res['cupy']}; "
             f"copy bandwidth {gbps} GB/s.",
             f"Command: `{res['command']}`", ""]
    if res.get("selfcheck"):
        lines += ["## First-contact check of the CUDA kernels", "",
                  "| dtype | K | stride | dilation | memory format | result | s | cause |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["selfcheck"]:
            cause = r["cause"].splitlines()[0][:200].replace("|", "/") if r["cause"] else ""
            lines.append(f"| {r['dtype']} | {r['K']} | {r['stride']} | {r['dilation']} | {r['memory_format']} | "
                         f"{'pass' if r['ok'] else 'FAIL: ' + r['stage']} | {r['seconds']:.2f} | {cause} |")
        lines.append("")
    if res.get("op"):
        lines += ["## Involution op (RedNet-50 shapes at 224x224)", "",
                  "| shape | name | batch | dtype | layout | pass | backend | ms | floor ms | x floor | peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["op"]:
            ratio = None if r["ms"] is None else r["ms"] / r["floor_ms"]
            lines.append(f"| {r['shape']} | {r['name']} | {r['batch']} | {r['dtype']} | {r['layout']} | {r['pass']} | "
                         f"{r['backend']} | {_fmt(r['ms'])} | {_fmt(r['floor_ms'])} | {_fmt(ratio, 1)} | "
                         f"{_fmt(r.get('peak_mem_mb'), 1)} |")
        lines += _speedups(res["op"])
    if res.get("race"):
        lines += ["## RedNet vs ResNet, one process, interleaved (224x224)", "",
                  "| memory format | mode | batch | threads | model | backend | median ms | img/s | "
                  "throughput vs baseline (median of per-repeat ratios) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["race"]:
            lines.append(f"| {r['memory_format']} | {r['mode']} | {r['batch']} | {r['threads']} | {r['model']} | "
                         f"{r['backend']} | {r['ms']:.1f} | {r['img_per_s']:.1f} | {r['vs_baseline']:.2f}x |")
        lines.append("")
    if res.get("model"):
        lines += ["## Models (224x224)", "", "| model | backend | mode | batch | img/s | peak GB |",
                  "|---|---|---|---|---|---|"]
        for r in res["model"]:
            lines.append(f"| {r['model']} | {r['backend']} | {r['mode']} | {r['batch']} | {r['img_per_s']:.1f} | "
                         f"{_fmt(r['peak_mem_gb'], 2)} |")
        lines.append("")
    return "\n".join(lines)


def _speedups(rows: list[dict]) -> list[str]:
    """Baseline time / backend time per shape, and over a whole RedNet-50 pass (shapes weighted by count).

    The baseline is unfold where it ran, else the reference.
    """
    base_name = "unfold" if any(r["backend"] == "unfold" for r in rows) else "reference"
    out = ["", f"### Speedup over {base_name}", "",
           f"| batch | dtype | layout | pass | backend | per shape ({base_name} ms / ms) | RedNet-50 total ms "
           f"| {base_name} total ms | speedup |",
           "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, dict[str, dict[str, dict]]] = {}
    for r in rows:
        group = groups.setdefault((r["batch"], r["dtype"], r["layout"], r["pass"]), {})
        group.setdefault(r["backend"], {})[r["name"]] = r
    for key, by_backend in groups.items():
        base = by_backend.get(base_name)
        for backend, by_name in by_backend.items():
            if backend == base_name or not base:
                continue
            common = [n for n in by_name if n in base and by_name[n]["ms"] and base[n]["ms"]]
            if not common:
                continue
            per = ", ".join(f"{n} {base[n]['ms'] / by_name[n]['ms']:.1f}x" for n in common)
            tot = sum(by_name[n]["ms"] * by_name[n]["count"] for n in common)
            tot_u = sum(base[n]["ms"] * base[n]["count"] for n in common)
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {backend} | {per} | {tot:.1f} | {tot_u:.1f} | "
                       f"{tot_u / tot:.1f}x |")
    return out + [""] if len(out) > 5 else [""]


def _csv(s: str) -> list[str]:
    return s.split(",")


def _csv_ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("mode", choices=("op", "model", "selfcheck", "race", "data"))
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
    p.add_argument("--race-batch", type=int, default=8, help="race: images per step (default 8)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--no-amp", action="store_true", help="model mode in fp32 instead of AMP bf16")
    p.add_argument("--copy-mb", type=int, default=None,
                   help="buffer size for the copy bandwidth (default 1024 cuda, 256 cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", type=Path, default=None,
                   help="results file (default benchmarks/results/<date>-<device>.json)")
    p.add_argument("--checks-only", action="store_true", help="selfcheck: stop after the checks, no benchmarks")
    p.add_argument("--images", type=int, default=300, help="data: JPEGs per split (default 300)")
    p.add_argument("--workers", type=int, default=2, help="data: loader workers feeding the main process (default 2)")
    return p


def resolve_args(args: argparse.Namespace) -> list[InvolutionShape]:
    """Fill in the device-dependent defaults and check every list; the op shapes to run.

    Raises:
        UsageError: a bad argument, with what to choose instead.
    """
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to torch; use --device cpu")
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
                                                  ["nhwc", "nchw"] if race else ["nchw"])
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


def _cupy_version() -> str | None:
    try:
        import cupy
    except Exception:  # noqa: BLE001  (a broken CuPy install fails in many ways; the results then say none)
        return None
    return cupy.__version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = {"selfcheck": lambda: run_selfcheck(args), "data": lambda: run_data(args, argv)}
    return run_command(modes.get(args.mode, lambda: _benchmark(args, argv)))


def _benchmark(args: argparse.Namespace, argv: list[str] | None) -> int:
    shapes = resolve_args(args)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    date = dt.date.today().isoformat()
    gbps = copy_gbps(device, args.copy_mb or (1024 if device.type == "cuda" else 256))
    log(f"{device_name(device)}: copy bandwidth {gbps:.1f} GB/s")
    command = "python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = dict(device=device_name(device), torch=torch.__version__, cuda=torch.version.cuda, cupy=_cupy_version(),
               date=date, copy_gbps=gbps, command=command, op=[], model=[])
    out = args.json or default_out(device, date)
    if args.mode == "race":
        res["race"] = run_race(args)
    else:
        res[args.mode] = run_op(args, device, gbps, shapes) if args.mode == "op" else run_model(args, device)
    write_results(out, res, args.mode)
    return 0


def write_results(out: Path, res: dict, mode: str) -> None:
    """Write ``res`` and its markdown beside it, keeping the other modes' rows already in ``out``."""
    old = json.loads(out.read_text()) if out.exists() else {}  # same day and device
    for section in SECTIONS:
        if section != mode:
            res[section] = old.get(section, [])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    log(f"wrote {out} and {out.with_suffix('.md').name}")


# ----------------------------------------------------------------------------------------
# data mode


def run_data(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The input pipeline, old against new, in CPU time; a new results file each run."""
    import tempfile

    from rednet.analysis import inputbench

    batch, rounds = (args.batch or [64])[0], args.repeats or 5
    if args.images < batch or rounds < 1 or args.workers < 0:
        raise UsageError(f"--images ({args.images}) must hold one --batch ({batch}); --repeats >= 1, --workers >= 0")
    date = dt.date.today().isoformat()
    out = args.json
    if out is None:  # never overwrite an earlier run's file
        out = ROOT / "benchmarks" / "results" / f"{date}-data-cpu.json"
        n = 2
        while out.exists():
            out, n = out.with_name(f"{date}-data-cpu-{n}.json"), n + 1
    with tempfile.TemporaryDirectory() as tmp:
        res = inputbench.run(Path(tmp), args.images, rounds, batch, args.workers, log=log)
    res = dict(date=date, command="python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               environment=inputbench.environment(), **res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(inputbench.markdown(res))
    print(inputbench.markdown(res))
    log(f"wrote {out} and {out.with_suffix('.md').name}")
    return 0


# ----------------------------------------------------------------------------------------
# selfcheck mode


def _nvrtc_version() -> str | None:
    try:
        from cupy.cuda import nvrtc

        return ".".join(map(str, nvrtc.getVersion()))
    except Exception:  # noqa: BLE001  (CuPy or its NVRTC missing or broken: the report then says none)
        return None


def environment_lines(device: torch.device) -> list[str]:
    """What a report about the kernels needs: the GPU, and torch, CUDA, CuPy and NVRTC versions."""
    major, minor = torch.cuda.get_device_capability(device)
    return [f"device: {torch.cuda.get_device_name(device)} (sm_{major}{minor}), {torch.cuda.device_count()} visible",
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), CuPy {_cupy_version()}, NVRTC {_nvrtc_version()}",
            f"python {platform.python_version()}, {platform.platform()}"]


def _check_line(row: dict) -> str:
    head = (f"{'PASS' if row['ok'] else 'FAIL'}  {row['dtype']:<5} K{row['K']} s{row['stride']} d{row['dilation']} "
            f"{row['memory_format']}  {row['seconds']:6.2f} s")
    return head if row["ok"] else f"{head}  {row['stage']}: {row['cause'].splitlines()[0][:300]}"


def run_checks(device: torch.device) -> list[dict]:
    """The first-contact check of every dtype, RedNet window and memory format; prints one line each.

    Stops after the first check if the kernels cannot run here at all (no CuPy, no device).
    """
    rows = []
    configs = [(dn, w, fmt) for dn in ("fp32", "bf16", "fp16", "fp64") for w in CHECK_WINDOWS for fmt in MEMORY_FORMATS]
    for dname, (k, s, d), fmt in configs:
        check = check_cuda_kernel(device, DTYPES[dname], k, s, d, fmt)
        rows.append(dict(dtype=dname, K=k, stride=s, dilation=d, memory_format=fmt, ok=check.ok, stage=check.stage,
                         cause=check.cause, seconds=check.seconds))
        if check.stage == "unavailable":
            print(f"FAIL  the cupy backend cannot run here: {check.cause}")
            break
        print(_check_line(rows[-1]), flush=True)
    return rows


def run_benchmarks(out: Path) -> int:
    """``op`` at batch 64 and ``model`` for RedNet-50 vs ResNet-50 (AMP bf16, channels_last) into ``out``."""
    code = main(["op", "--device", "cuda", "--batch", "64", "--json", str(out)])
    return code or main(["model", "--device", "cuda", "--models", "rednet50,resnet50", "--json", str(out)])


def run_selfcheck(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise UsageError(f"selfcheck needs a CUDA GPU, and torch sees none (torch {torch.__version__}, built with "
                         f"CUDA {torch.version.cuda}); nothing was checked")
    device = torch.device("cuda", torch.cuda.current_device())
    for line in environment_lines(device):
        print(line)
    rows = run_checks(device)
    date = dt.date.today().isoformat()
    out = args.json or default_out(device, date)
    res = dict(device=device_name(device), torch=torch.__version__, cuda=torch.version.cuda, cupy=_cupy_version(),
               date=date, copy_gbps=None, command="python tools/benchmark.py selfcheck", selfcheck=rows)
    write_results(out, res, "selfcheck")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        dead = any(r["stage"] == "context" for r in failed)
        print(f"\n{len(failed)} of {len(rows)} checks failed; " + (
            "a kernel fault left the device unusable in this process." if dead else
            "auto uses the reference for those configurations (correct results, slower)."))
        for cause in dict.fromkeys(f"[{r['stage']}] {r['cause']}" for r in failed):  # each distinct cause once
            print(f"\n{cause}")
        print("\nPlease report it on the project's issue tracker with this whole output and "
              f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}.")
        return 1
    print(f"all {len(rows)} checks passed")
    if args.checks_only:
        return 0
    return run_benchmarks(out)


if __name__ == "__main__":
    sys.exit(main())
