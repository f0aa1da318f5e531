#!/usr/bin/env python
"""Benchmark the involution operator and RedNet against its memory floor and ResNet.

    python tools/benchmark.py op --device cpu                 # reference vs unfold, batch 2
    python tools/benchmark.py op --device cuda                # every backend, batch 64 and 128
    python tools/benchmark.py model --device cuda [--compile] # img/s, RedNet vs ResNet (timm)

``op``: every distinct involution of RedNet-50 at 224x224 (stem, the four stages, the
stride-2 first blocks), forward and forward+backward, per backend, dtype and layout. Each
row has the floor: the bytes the pass must move (x, kernel and y once forward; grad_y, x
and kernel read and grad_x, grad_kernel written backward) divided by the copy bandwidth
measured in the same run, and the peak memory the pass allocates beyond its inputs.

``model``: training (forward, backward, SGD step; AMP bf16, channels_last) and inference
images/s with peak memory, per involution backend, against ResNet-50/101.

Results go to ``benchmarks/results/<date>-<device>.json`` (rows of the other mode already
in that file are kept) and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from rednet.ops import can_use_cuda_kernel, involution_reference, involution_unfold  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
LAYOUTS = ("nchw", "nhwc")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# Shapes


def rednet_involution_shapes(model: str = "rednet50", size: int = 224) -> list[dict]:
    """Distinct involution calls of ``model`` at ``size`` (traced on the meta device), with counts."""
    import rednet
    from rednet.layers import Involution

    net = rednet.create_model(model).to("meta")
    seen: dict[tuple, dict] = {}
    hooks = []
    for name, mod in net.named_modules():
        if isinstance(mod, Involution):
            def hook(mod, args, name=name):
                _, c, h, w = args[0].shape
                key = (c, h, w, mod.kernel_size, mod.stride, mod.groups)
                if key not in seen:
                    stage = name.split(".")[0]  # stem / layer1..4
                    label = stage + (".down" if mod.stride > 1 else "")
                    seen[key] = dict(name=label, C=c, H=h, W=w, K=mod.kernel_size, stride=mod.stride, G=mod.groups, count=0)
                seen[key]["count"] += 1
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        net(torch.empty(1, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()
    return list(seen.values())


def shape_str(s: dict) -> str:
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
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
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


def _backend_fn(backend: str):
    if backend == "reference":
        return involution_reference
    if backend == "unfold":
        return involution_unfold
    if backend == "cupy":
        from rednet.ops._cupy import involution_cupy

        return involution_cupy
    raise ValueError(f"unknown backend {backend!r}")


def op_inputs(s: dict, batch: int, dtype: torch.dtype, layout: str, device: torch.device):
    """x (B, C, H, W) and kernel (B, G, K, K, Ho, Wo), laid out as a channels_last network makes them."""
    k, st = s["K"], s["stride"]
    pad = (k - 1) // 2
    ho, wo = ((n + 2 * pad - k) // st + 1 for n in (s["H"], s["W"]))
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(batch, s["C"], s["H"], s["W"], device=device, dtype=dtype).contiguous(memory_format=fmt)
    gen = torch.randn(batch, s["G"] * k * k, ho, wo, device=device, dtype=dtype).contiguous(memory_format=fmt)
    return x, gen.view(batch, s["G"], k, k, ho, wo), st, pad


def floor_bytes(x: torch.Tensor, kernel: torch.Tensor, y_numel: int, with_backward: bool) -> int:
    fwd = x.numel() + kernel.numel() + y_numel  # read x and kernel, write y
    bwd = y_numel + x.numel() + kernel.numel() + x.numel() + kernel.numel()  # read grad_y, x, kernel; write grads
    return (fwd + (bwd if with_backward else 0)) * x.element_size()


def run_op(args, device: torch.device, gbps: float) -> list[dict]:
    shapes = rednet_involution_shapes()
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = [w for w in wanted if w not in {s["name"] for s in shapes}]
        if unknown:
            raise SystemExit(f"unknown shape(s) {unknown}; choose from {[s['name'] for s in shapes]}")
        shapes = [s for s in shapes if s["name"] in wanted]
    rows = []
    combos = [(b, s, dn, lay, be) for b in args.batch for s in shapes for dn in args.dtypes for lay in args.layouts
              for be in args.backends]
    for n, (batch, s, dname, layout, backend) in enumerate(combos, 1):
        if backend == "cupy":
            ok, why = can_use_cuda_kernel(torch.empty(0, device=device, dtype=DTYPES[dname]))
            if not ok:
                log(f"skip cupy: {why}")
                continue
        fn = _backend_fn(backend)
        x, kernel, stride, pad = op_inputs(s, batch, DTYPES[dname], layout, device)
        y_numel = batch * s["C"] * kernel.shape[-2] * kernel.shape[-1]
        for pas in args.passes:
            try:
                if pas == "fwd":
                    def step():
                        with torch.no_grad():
                            return fn(x, kernel, stride, pad, 1)
                else:
                    xg, kg = x.detach().requires_grad_(), kernel.detach().requires_grad_()
                    grad_y = torch.randn(batch, s["C"], *kernel.shape[-2:], device=device, dtype=x.dtype)

                    def step():
                        y = fn(xg, kg, stride, pad, 1)
                        return torch.autograd.grad(y, (xg, kg), grad_y)
                ms = time_ms(step, device, args.warmup, args.repeats)
                mem = peak_bytes(step, device)
            except torch.OutOfMemoryError:
                log(f"  OOM: {backend} {s['name']} {dname} {layout} {pas} batch {batch}")
                ms, mem = None, None
                torch.cuda.empty_cache()
            fb = floor_bytes(x, kernel, y_numel, pas == "fwd+bwd")
            row = dict(shape=shape_str(s), name=s["name"], count=s["count"], batch=batch, dtype=dname, layout=layout,
                       backend=backend, **{"pass": pas}, ms=ms, floor_ms=fb / (gbps * 1e9) * 1e3,
                       peak_mem_mb=None if mem is None else mem / 2**20)
            rows.append(row)
            log(f"[{n}/{len(combos)}] {s['name']:<12} {shape_str(s):<24} b{batch} {dname} {layout} {backend:<9} "
                f"{pas:<7} {'OOM' if ms is None else f'{ms:9.3f} ms'}  floor {row['floor_ms']:.3f} ms  "
                f"peak {'-' if mem is None else f'{mem / 2**20:.1f} MiB'}")
        del x, kernel
    return rows


# ----------------------------------------------------------------------------------------
# model mode


def _make_model(name: str, device: torch.device) -> torch.nn.Module:
    import timm

    import rednet  # noqa: F401  (registers the RedNet models with timm)

    return timm.create_model(name, num_classes=1000).to(device).to(memory_format=torch.channels_last)


def _model_throughput(name: str, backend: str, mode: str, batch: int, device: torch.device, args) -> dict:
    # Read by the front door on every eager call, and once per trace under torch.compile.
    os.environ["REDNET_INVOLUTION_BACKEND"] = backend if backend != "-" else "reference"
    if args.compile:
        torch._dynamo.reset()  # the backend is baked into a trace; never reuse one across backends
    model = _make_model(name, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_amp)
    imgs = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=device)
    run = torch.compile(model) if args.compile else model
    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

        def step():
            with amp:
                loss = torch.nn.functional.cross_entropy(run(imgs), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.inference_mode(), amp:
                return run(imgs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = time_ms(step, device, args.warmup, args.repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(model=name, backend=backend, mode=mode, batch=batch, img_per_s=batch / (ms * 1e-3),
                peak_mem_gb=peak, compile=args.compile, amp="bf16" if not args.no_amp else "off")


def run_model(args, device: torch.device) -> list[dict]:
    env = os.environ.get("REDNET_INVOLUTION_BACKEND")
    try:
        return _run_models(args, device)
    finally:
        if env is None:
            os.environ.pop("REDNET_INVOLUTION_BACKEND", None)
        else:
            os.environ["REDNET_INVOLUTION_BACKEND"] = env


def _run_models(args, device: torch.device) -> list[dict]:
    rows = []
    jobs = [(m, be) for m in args.models if m.startswith("rednet") for be in args.backends if be in ("reference", "cupy")]
    jobs += [(m, "-") for m in args.models if not m.startswith("rednet")]
    for name, backend in jobs:
        if backend == "cupy" and not can_use_cuda_kernel(torch.empty(0, device=device))[0]:
            log(f"skip {name} cupy: {can_use_cuda_kernel(torch.empty(0, device=device))[1]}")
            continue
        for mode in args.modes:
            batch = args.model_batch
            while batch >= 1:
                try:
                    row = _model_throughput(name, backend, mode, batch, device, args)
                    break
                except torch.OutOfMemoryError:  # the largest batch that fits
                    log(f"  OOM: {name} {backend} {mode} batch {batch}; halving")
                    batch //= 2
                    gc.collect()
                    torch.cuda.empty_cache()
            else:
                continue
            rows.append(row)
            log(f"{name:<10} {backend:<9} {mode:<5} batch {row['batch']:<4} {row['img_per_s']:9.1f} img/s  "
                f"peak {row['peak_mem_gb'] if row['peak_mem_gb'] is None else round(row['peak_mem_gb'], 2)} GB")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------
# Results


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def default_out(device: torch.device, date: str) -> Path:
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return ROOT / "benchmarks" / "results" / f"{date}-{slug}.json"


def _fmt(v, nd=3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def markdown(res: dict) -> str:
    lines = [f"# Benchmark {res['date']}: {res['device']}", "",
             f"torch {res['torch']}, CUDA {res['cuda']}, CuPy {res['cupy']}; copy bandwidth {res['copy_gbps']:.1f} GB/s.",
             f"Command: `{res['command']}`", ""]
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
    if res.get("model"):
        lines += ["## Models (224x224)", "", "| model | backend | mode | batch | img/s | peak GB |", "|---|---|---|---|---|---|"]
        for r in res["model"]:
            lines.append(f"| {r['model']} | {r['backend']} | {r['mode']} | {r['batch']} | {r['img_per_s']:.1f} | "
                         f"{_fmt(r['peak_mem_gb'], 2)} |")
        lines.append("")
    return "\n".join(lines)


def _speedups(rows: list[dict]) -> list[str]:
    """unfold time / backend time per shape, and over a whole RedNet-50 pass (shapes weighted by count)."""
    out = ["", "### Speedup over unfold", "",
           "| batch | dtype | layout | pass | backend | per shape (unfold ms / ms) | RedNet-50 total ms | unfold total ms | speedup |",
           "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, dict[str, dict[str, dict]]] = {}
    for r in rows:
        groups.setdefault((r["batch"], r["dtype"], r["layout"], r["pass"]), {}).setdefault(r["backend"], {})[r["name"]] = r
    for key, by_backend in groups.items():
        base = by_backend.get("unfold")
        for backend, by_name in by_backend.items():
            if backend == "unfold" or not base:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("mode", choices=("op", "model"))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="op batch sizes, comma-separated (default: 64,128 on cuda, 2 on cpu)")
    p.add_argument("--shapes", default=None, help="op shape names, comma-separated (default: all; e.g. stem,layer1,layer2.down)")
    p.add_argument("--backends", type=lambda s: s.split(","), default=None,
                   help="comma-separated; op: reference,unfold,cupy (cpu: reference,unfold); model: reference,cupy")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=None, help="op dtypes (default: fp32,bf16 on cuda, fp32 on cpu)")
    p.add_argument("--layouts", type=lambda s: s.split(","), default=None, help="op layouts (default: nchw,nhwc on cuda, nchw on cpu)")
    p.add_argument("--passes", type=lambda s: s.split(","), default=None, help="fwd,fwd+bwd (default: both on cuda, fwd+bwd on cpu)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row; the median is reported (default 50 cuda, 5 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 10 cuda, 1 cpu)")
    p.add_argument("--models", type=lambda s: s.split(","), default=["rednet26", "rednet50", "rednet101", "resnet50", "resnet101"])
    p.add_argument("--modes", type=lambda s: s.split(","), default=["train", "infer"])
    p.add_argument("--model-batch", type=int, default=128, help="first batch tried; halved on out-of-memory")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--no-amp", action="store_true", help="model mode in fp32 instead of AMP bf16")
    p.add_argument("--copy-mb", type=int, default=None, help="buffer size for the copy bandwidth (default 1024 cuda, 256 cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", type=Path, default=None, help="results file (default benchmarks/results/<date>-<device>.json)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    args.batch = args.batch or ([64, 128] if gpu else [2])
    args.backends = args.backends or (["reference", "unfold", "cupy"] if gpu and args.mode == "op" else
                                      ["reference", "cupy"] if gpu else ["reference", "unfold"])
    args.dtypes = args.dtypes or (["fp32", "bf16"] if gpu else ["fp32"])
    args.layouts = args.layouts or (list(LAYOUTS) if gpu else ["nchw"])
    args.passes = args.passes or (["fwd", "fwd+bwd"] if gpu else ["fwd+bwd"])
    args.repeats = args.repeats or (50 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    for name, vals, allowed in (("dtypes", args.dtypes, DTYPES), ("layouts", args.layouts, LAYOUTS),
                                ("passes", args.passes, ("fwd", "fwd+bwd")), ("modes", args.modes, ("train", "infer")),
                                ("backends", args.backends, ("reference", "unfold", "cupy"))):
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise SystemExit(f"--{name}: unknown {bad}; choose from {list(allowed)}")
    torch.manual_seed(0)

    date = dt.date.today().isoformat()
    gbps = copy_gbps(device, args.copy_mb or (1024 if gpu else 256))
    log(f"{device_name(device)}: copy bandwidth {gbps:.1f} GB/s")
    try:
        import cupy

        cupy_version = cupy.__version__
    except Exception:
        cupy_version = None
    res = dict(device=device_name(device), torch=torch.__version__, cuda=torch.version.cuda, cupy=cupy_version, date=date,
               copy_gbps=gbps, command="python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               op=[], model=[])
    out = args.json or default_out(device, date)
    if out.exists():  # keep the other mode's rows of the same day and device
        old = json.loads(out.read_text())
        res[("model" if args.mode == "op" else "op")] = old.get("model" if args.mode == "op" else "op", [])
    res[args.mode] = run_op(args, device, gbps) if args.mode == "op" else run_model(args, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    log(f"wrote {out} and {out.with_suffix('.md').name}")
    return res


if __name__ == "__main__":
    main()
