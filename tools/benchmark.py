#!/usr/bin/env python
"""Benchmark the involution operator and RedNet against its memory floor and ResNet.

    python tools/benchmark.py op --device cpu                 # reference vs unfold, batch 2
    python tools/benchmark.py op --device cuda                # every backend, batch 64 and 128
    python tools/benchmark.py model --device cuda [--compile] # img/s, RedNet vs ResNet (timm)
    python tools/benchmark.py selfcheck                       # first run on a GPU: check, then op and model
    python tools/benchmark.py race --threads 2                # CPU: RedNet-50 vs ResNet-50, every path
    python tools/benchmark.py data                            # input pipeline: CPU per image, old vs new
    python tools/benchmark.py host                            # host cost of a CUDA call, launches faked
    python tools/benchmark.py gpu                             # a GPU's first run: tests, sanitizer, speed

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
and SIMD flags, on which the ratios depend. Each run is appended to
``benchmarks/results/<date>-cpu-race.json`` (and ``.md``); earlier runs are kept.

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

``host``: the host's share of the CUDA path (validation, backend choice, the custom op and its
autograd, launch plans, allocation) per involution layer-step (forward and both gradients),
with each launch replaced by a no-op (``rednet.ops.measure_host_overhead``), over RedNet-50's
involution layers at 224x224 (default batch 32, bf16, both memory formats). It runs on a CPU,
its tensors standing in for CUDA ones; into ``benchmarks/results/<date>-host-<device>[-N].json``.

``gpu``: everything a first GPU run should record, in under 10 minutes, into one results file
(``benchmarks/results/<date>-gpu-check-<device>[-N].json`` and its markdown): ``pytest -m gpu``;
``compute-sanitizer`` memcheck and racecheck on the first-contact check's problems (``selfcheck``;
the sanitizer comes with the CUDA toolkit, found on PATH or beside ``nvcc``, and its steps are
recorded as skipped without it); the op against its floor (batch 64, bf16, both memory formats);
RedNet-50 against ResNet-50 training images/s (bf16, channels_last). Each step has a time budget
(``GPU_STEPS``) within the whole command's (``GPU_CHECK_BUDGET_S``); a step that runs over is
stopped, with everything it started, and recorded as ``timeout``. The file holds the device,
driver, CUDA, torch, CuPy, NVRTC and sanitizer versions, and each step's command, status,
time and output. Exit status: 0 no step failed, 1 a step failed or ran out of time, 2 no GPU.

Results of the other modes go to ``benchmarks/results/<date>-<device>.json`` (rows of the
other modes already in that file are kept) and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
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
    can_use_fused_kernel,
    check_cuda_kernel,
    export_fused,
    involution,
    involution_cupy,
    involution_output_size,
    involution_reference,
    involution_unfold,
    onnx_translation_table,
    ort_library_path,
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

RACE_PATHS = ("eager", "train", "compile", "ort")
# The instruction-set flags that decide which kernels oneDNN, MLAS and the native pass use.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512dq", "avx512cd", "avx512bw",
              "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
ORT_PAUSE_S = 0.1  # before each timed ONNX Runtime run: a session's threads spin on after run() returns


def cpu_info() -> dict:
    """The CPU's model name, vendor, family/model numbers, logical CPUs and SIMD flags (Linux; less elsewhere)."""
    info = dict(model=platform.processor() or platform.machine(), vendor=None, family=None, model_number=None,
                logical_cpus=os.cpu_count(), simd=[])
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = {}
    for line in text.split("\n\n")[0].splitlines():  # the first CPU's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    info.update(model=fields.get("model name", info["model"]), vendor=fields.get("vendor_id"),
                family=fields.get("cpu family"), model_number=fields.get("model"),
                simd=[f for f in SIMD_FLAGS if f in flags])
    return info


def _race_model(name: str, memory_format: str) -> torch.nn.Module:
    fmt = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
    torch.manual_seed(0)
    return rednet.create_model(name, num_classes=1000).to(memory_format=fmt)


def _race_inputs(batch: int, size: int, memory_format: str) -> torch.Tensor:
    fmt = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).contiguous(
        memory_format=fmt)


def _eager_step(name: str, mode: str, memory_format: str, batch: int, size: int) -> Callable[[], object]:
    """One fp32 training step or inference pass of ``name`` on the CPU, in ``memory_format``."""
    model = _race_model(name, memory_format)
    imgs = _race_inputs(batch, size, memory_format)
    target = torch.randint(0, 1000, (batch,))
    fp32 = torch.autocast("cpu", enabled=False)
    return _train_step(model, model, imgs, target, fp32) if mode == "train" else _infer_step(model, model, imgs, fp32)


def _compiled_step(name: str, memory_format: str, batch: int, size: int) -> Callable[[], object]:
    """Inference through ``torch.compile`` (inductor, freezing: weights folded as constants), compiled here."""
    import torch._inductor.config

    model = _race_model(name, memory_format).eval()
    imgs = _race_inputs(batch, size, memory_format)
    compiled = torch.compile(model, dynamic=False)
    t0 = time.perf_counter()
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        compiled(imgs)  # compiles
    log(f"  compiled {name} at batch {batch} in {time.perf_counter() - t0:.0f} s")

    def step():
        with torch.no_grad():
            return compiled(imgs)
    return step


def _export_onnx(name: str, formulation: str, size: int, path: Path) -> torch.nn.Module:
    """``name`` (eval, random weights) exported as tools/export.py does (``formulation``: fused or standard);
    the eager model it came from."""
    model = _race_model(name, "nchw").eval()
    kwargs = dict(dynamo=True, external_data=False, input_names=["input"], output_names=["output"],
                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
    t0 = time.perf_counter()
    with export_fused() if formulation == "fused" else contextlib.nullcontext():
        torch.onnx.export(model, (torch.randn(2, 3, size, size),), path,
                          custom_translation_table=onnx_translation_table() if formulation == "fused" else None,
                          **kwargs)
    log(f"  exported {name} ({formulation} involution) in {time.perf_counter() - t0:.0f} s")
    return model


def _ort_session(path: Path, custom: bool, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if custom:
        options.register_custom_ops_library(ort_library_path())
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_call_overhead(threads: int, calls: int = 2000) -> dict:
    """Per-call cost of the rednet.Involution op in ONNX Runtime, apart from its arithmetic.

    Two one-node graphs on the same tiny tensor (1x1x1x16: a 1x1 window, 16 channels, one
    group): Identity, and rednet.Involution. The median ``run()`` of each over ``calls`` calls,
    interleaved in rounds; the difference is what the op's dispatch adds (reading seven inputs'
    shapes through the C API, allocating the output, one ParallelFor).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = np.random.default_rng(0).standard_normal((1, 1, 1, 16)).astype(np.float32)
    weights = {"wr": np.eye(16, dtype=np.float32), "br": np.zeros(16, np.float32), "ws": np.eye(16, dtype=np.float32),
               "bs": np.zeros(16, np.float32), "scale": np.ones(16, np.float32), "shift": np.zeros(16, np.float32)}
    graphs = {
        "identity": helper.make_node("Identity", ["X"], ["Y"]),
        "involution": helper.make_node("Involution", ["X", *weights], ["Y"], domain="ai.rednet", kernel_size=1,
                                       stride=1, groups=1, relu=0),
    }
    sessions = {}
    for key, node in graphs.items():
        graph = helper.make_graph([node], key, [helper.make_tensor_value_info("X", TensorProto.FLOAT, x.shape)],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(v, k) for k, v in weights.items()] if key != "identity"
                                  else [])
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.rednet", 1)]
        proto = helper.make_model(graph, opset_imports=opsets)
        proto.ir_version = 9  # what ONNX Runtime 1.17+ reads
        path = Path(tempfile.mkdtemp()) / f"{key}.onnx"
        onnx.save(proto, path)
        sessions[key] = _ort_session(path, key == "involution", threads)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(10):  # rounds, interleaved
        for key, sess in sessions.items():
            for _ in range(calls // 10):
                t0 = time.perf_counter()
                sess.run(None, {"X": x})
                times[key].append((time.perf_counter() - t0) * 1e6)
    us = {k: statistics.median(v) for k, v in times.items()}
    return dict(identity_us=us["identity"], involution_us=us["involution"],
                overhead_us=us["involution"] - us["identity"], calls=calls, threads=threads)


class _Entry(NamedTuple):
    model: str  # row label
    involution: str  # how involution runs: fused, native, reference, standard ops; "-" without involution
    step: Callable[[], object]
    pause_s: float = 0.0


def _time_interleaved(entries: list[_Entry], warmup: int, repeats: int) -> dict[str, list[float]]:
    for e in entries:
        for _ in range(warmup):
            e.step()
    times: dict[str, list[float]] = {e.model: [] for e in entries}
    for _ in range(repeats):  # interleaved: a slow spell of the machine hits every model
        for e in entries:
            if e.pause_s:
                time.sleep(e.pause_s)
            t0 = time.perf_counter()
            e.step()
            times[e.model].append((time.perf_counter() - t0) * 1e3)
    return times


def _race_rows(path: str, mode: str, memory_format: str, batch: int, entries: list[_Entry],
               times: dict[str, list[float]], extra: dict | None = None) -> list[dict]:
    base = entries[-1].model
    rows = []
    for e in entries:
        ms = times[e.model]
        ratio = statistics.median(b / t for b, t in zip(times[base], ms))
        row = dict(path=path, mode=mode, model=e.model, involution=e.involution, memory_format=memory_format,
                   batch=batch, threads=torch.get_num_threads(), ms=statistics.median(ms),
                   img_per_s=batch / statistics.median(ms) * 1e3, baseline=base, vs_baseline=ratio, times_ms=ms,
                   **(extra or {}).get(e.model, {}))
        rows.append(row)
        log(f"{path:<8} {memory_format} batch {batch:<3} {e.model:<26} {e.involution:<9} median {row['ms']:8.1f} ms  "
            f"{row['img_per_s']:7.1f} img/s  {ratio:.2f}x {base}")
    return rows


def _involution_of(name: str, mode: str, memory_format: str) -> str:
    """How ``name``'s involutions run in eager PyTorch: fused (inference, channels_last), else the backend."""
    if not name.startswith("rednet"):
        return "-"
    x = torch.empty(1, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    if mode == "infer" and memory_format == "nhwc" and can_use_fused_kernel(x, 64, 7, 4)[0] \
            and select_backend(x) == "native":
        return "fused"
    return select_backend(x)


def run_race(args) -> list[dict]:
    """Every path of ``args.paths`` at every batch, the models' runs interleaved; the last model is the baseline."""
    rows = []
    red, base = args.models[0], args.models[-1]
    size, threads = args.race_size, torch.get_num_threads()
    for memory_format in args.memory_formats:
        for path in [p for p in args.paths if p in ("eager", "train", "compile")]:
            batches = [max(args.race_batch)] if path == "train" else args.race_batch
            for batch in batches:
                mode = "train" if path == "train" else "infer"
                if path == "compile":
                    entries = [_Entry(m, _involution_of(m, mode, memory_format),
                                      _compiled_step(m, memory_format, batch, size)) for m in args.models]
                else:
                    entries = [_Entry(m, _involution_of(m, mode, memory_format),
                                      _eager_step(m, mode, memory_format, batch, size)) for m in args.models]
                times = _time_interleaved(entries, args.warmup, args.repeats)
                rows += _race_rows(path, mode, memory_format, batch, entries, times)
                del entries
                gc.collect()
    if "ort" in args.paths:
        rows += _race_ort(args, red, base, size, threads)
    return rows


def _race_ort(args, red: str, base: str, size: int, threads: int) -> list[dict]:
    """RedNet with the rednet.Involution op and with standard ops, against the baseline, in ONNX Runtime."""
    import numpy as np

    tmp = Path(tempfile.mkdtemp(prefix="rednet-race-"))
    specs = [(f"{red} (rednet.Involution)", red, "fused"), (f"{red} (standard ops)", red, "standard"),
             (base, base, "standard")]
    if not args.ort_standard:
        specs = [specs[0], specs[2]]
    sessions, models = {}, {}
    for label, name, formulation in specs:
        path = tmp / f"{name}-{formulation}.onnx"
        models[label] = _export_onnx(name, formulation, size, path)
        sessions[label] = _ort_session(path, formulation == "fused", threads)
    rows = []
    for batch in args.race_batch:
        x = _race_inputs(batch, size, "nchw")
        extra = {}
        for label, sess in sessions.items():  # ONNX Runtime against eager PyTorch, same weights and input
            with torch.no_grad():
                ref = models[label](x).numpy()
            out = sess.run(None, {"input": x.numpy()})[0]
            extra[label] = dict(max_abs_diff=float(np.abs(out - ref).max()))

        def runner(sess, feed):
            return lambda: sess.run(None, feed)
        feed = {"input": x.numpy()}
        entries = [_Entry(label, "fused" if formulation == "fused" else ("standard ops" if name.startswith("rednet")
                          else "-"), runner(sessions[label], feed), ORT_PAUSE_S) for label, name, formulation in specs]
        times = _time_interleaved(entries, args.warmup, args.repeats)
        rows += _race_rows("ort", "infer", "nchw", batch, entries, times, extra)
    shutil.rmtree(tmp, ignore_errors=True)
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
    p.add_argument("--race-size", type=int, default=224, help="race: image size in pixels (default 224)")
    p.add_argument("--no-ort-standard", dest="ort_standard", action="store_false",
                   help="race: leave out RedNet with standard ONNX ops (the slow portable graph)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--no-amp", action="store_true", help="model mode in fp32 instead of AMP bf16")
    p.add_argument("--copy-mb", type=int, default=None,
                   help="buffer size for the copy bandwidth (default 1024 cuda, 256 cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", type=Path, default=None,
                   help="results file (default benchmarks/results/<date>-<device>.json)")
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
                                                  ["nhwc"] if race else ["nchw"])
    args.race_batch = args.race_batch or [1, 8]
    args.paths = args.paths or list(RACE_PATHS)
    bad = [p for p in args.paths if p not in RACE_PATHS]
    if bad:
        raise ValueError(f"--paths: unknown {bad}; choose from {list(RACE_PATHS)}")
    if race and "ort" in args.paths:
        for mod in ("onnx", "onnxscript", "onnxruntime"):
            if importlib.util.find_spec(mod) is None:
                raise ValueError(f"--paths ort needs the {mod} package (pip install {mod}); or leave ort out")
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
    modes = {"selfcheck": lambda: run_selfcheck(args), "data": lambda: run_data(args, argv),
             "host": lambda: run_host(args, argv), "gpu": lambda: run_gpu(args)}
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
    if args.mode == "race":
        out = args.json or ROOT / "benchmarks" / "results" / f"{date}-cpu-race.json"
        cpu = cpu_info()
        log(f"CPU: {cpu['model']} ({cpu['vendor']}, family {cpu['family']} model {cpu['model_number']}), "
            f"SIMD: {' '.join(cpu['simd']) or 'unknown'}; {torch.get_num_threads()} threads")
        load_before = _load_average()
        run = dict(date=date, time=dt.datetime.now().strftime("%H:%M:%S"), command=command, cpu=cpu,
                   threads=torch.get_num_threads(), torch=torch.__version__, onnxruntime=_ort_version(),
                   race=run_race(args))
        # Other processes on the same cores move the ratios: say how busy the machine was.
        run["load_average"] = dict(before=load_before, after=_load_average())
        if "ort" in args.paths:
            run["ort_call_overhead"] = ort_call_overhead(torch.get_num_threads())
            o = run["ort_call_overhead"]
            log(f"ort call overhead: Identity {o['identity_us']:.1f} us, rednet.Involution {o['involution_us']:.1f} us "
                f"per run(): {o['overhead_us']:.1f} us more")
        append_race(out, run)
        return 0
    out = args.json or default_out(device, date)
    res[args.mode] = run_op(args, device, gbps, shapes) if args.mode == "op" else run_model(args, device)
    write_results(out, res, args.mode)
    return 0


def _load_average() -> float | None:
    """The 1-minute load average (runnable processes, ours included), where the OS reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def append_race(out: Path, run: dict) -> None:
    """Add ``run`` to the race file ``out`` (and rewrite its markdown), keeping the runs already there."""
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    runs.append(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    out.with_suffix(".md").write_text(race_markdown(runs))
    log(f"wrote {out} and {out.with_suffix('.md').name} ({len(runs)} run(s))")


def _fmt_load(load: dict | None) -> str:
    if not load or load.get("before") is None:
        return "unknown"
    return f"{load['before']} and {load['after']}"


def race_markdown(runs: list[dict]) -> str:
    lines = ["# RedNet-50 vs ResNet-50 on the CPU, one process, interleaved", "",
             "Throughput relative to the baseline: the median of the per-repeat ratios (baseline ms / model ms; "
             "above 1, the model is faster). Generated by `tools/benchmark.py race`; each run is appended.", ""]
    for run in runs:
        cpu = run["cpu"]
        lines += [f"## {run['date']} {run['time']}: {cpu['model']}, {run['threads']} threads", "",
                  f"- CPU: {cpu['model']} (vendor {cpu['vendor']}, family {cpu['family']}, model "
                  f"{cpu['model_number']}), {cpu['logical_cpus']} logical CPUs",
                  f"- SIMD flags: {' '.join(cpu['simd']) or 'unknown'}",
                  f"- torch {run['torch']}, onnxruntime {run['onnxruntime']}",
                  f"- 1-minute load average before and after the run: {_fmt_load(run.get('load_average'))} "
                  f"(on {cpu['logical_cpus']} logical CPUs; above {run['threads']}, other processes shared the cores)",
                  f"- command: `{run['command']}`", "",
                  "| path | batch | model | involution | median ms | img/s | vs baseline | max abs diff vs eager |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in run["race"]:
            diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
            path = r["path"] if r["memory_format"] == "nhwc" or r["path"] == "ort" else f"{r['path']} (NCHW)"
            lines.append(f"| {path} | {r['batch']} | {r['model']} | {r['involution']} | {r['ms']:.1f} | "
                         f"{r['img_per_s']:.1f} | {r['vs_baseline']:.2f}x | {diff} |")
        if run.get("ort_call_overhead"):
            o = run["ort_call_overhead"]
            lines += ["", f"ONNX Runtime per-call overhead of `rednet.Involution` ({o['threads']} threads, median of "
                      f"{o['calls']} `run()` calls on a 1x1x1x16 input): {o['involution_us']:.1f} us against "
                      f"{o['identity_us']:.1f} us for an Identity node, {o['overhead_us']:.1f} us more."]
        lines.append("")
    return "\n".join(lines)


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
# host mode


def _new_results_path(stem: str) -> Path:
    """``benchmarks/results/<stem>.json``, or ``<stem>-N.json``: an earlier run's file is never overwritten."""
    out, n = ROOT / "benchmarks" / "results" / f"{stem}.json", 2
    while out.exists():
        out, n = out.with_name(f"{stem}-{n}.json"), n + 1
    return out


def host_markdown(res: dict) -> str:
    base = res.get("baseline")
    lines = [f"# Host cost of the CUDA involution path {res['date']}: {res['device']}", "",
             f"torch {res['torch']}; launches replaced by no-ops; batch {res['batch']}; {res['rounds']} rounds of "
             f"{res['calls']} calls, median of the rounds' means (fastest round in brackets)"
             + (f"; baseline: the launch plans of {base}, alternating round by round." if base else "."),
             f"Command: `{res['command']}`", "",
             "| dtype | layout | shape | name | count | fwd us | fwd+bwd us |"
             + (" baseline fwd+bwd us |" if base else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if base else "")]
    for r in res["rows"]:
        lines.append(f"| {r['dtype']} | {r['layout']} | {r['shape']} | {r['name']} | {r['count']} | "
                     f"{r['fwd_us']:.1f} ({r['fwd_us_min']:.1f}) | {r['fwd_bwd_us']:.1f} ({r['fwd_bwd_us_min']:.1f}) |"
                     + (f" {r['baseline_fwd_bwd_us']:.1f} |" if base else ""))
    lines += ["", "| dtype | layout | layers | per layer-step us | per RedNet-50 step ms |"
              + (" baseline per layer-step us | current / baseline |" if base else ""),
              "|---|---|---|---|---|" + ("---|---|" if base else "")]
    for t in res["totals"]:
        lines.append(f"| {t['dtype']} | {t['layout']} | {t['layers']} | {t['per_layer_step_us']:.1f} "
                     f"({t['per_layer_step_us_min']:.1f}) | {t['per_step_ms']:.2f} |"
                     + (f" {t['baseline_per_layer_step_us']:.1f} | {t['vs_baseline']:.3f} |" if base else ""))
    return "\n".join(lines) + "\n"


def _baseline_plans(rev: str, tmp: Path):
    """``rednet/ops/_plan.py`` as it was at git revision ``rev``, imported as a module of ``rednet.ops``."""
    import importlib.util
    import subprocess

    got = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:rednet/ops/_plan.py"], capture_output=True,
                         text=True)
    if got.returncode:
        raise UsageError(f"--baseline {rev}: git cannot show rednet/ops/_plan.py there ({got.stderr.strip()})")
    path = tmp / "_plan_baseline.py"
    path.write_text(got.stdout)
    spec = importlib.util.spec_from_file_location("rednet.ops._plan_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _host_rounds(x, kernel, stride: int, pad: int, rounds: int, plans) -> dict[str, dict[str, list[float]]]:
    """Per side (``current``, and ``baseline`` when ``plans``), each round's per-call means; the sides alternate."""
    from rednet.ops import measure_host_overhead

    sides = {"current": None} if plans is None else {"current": None, "baseline": plans}
    out: dict[str, dict[str, list[float]]] = {side: {"fwd_us": [], "fwd_bwd_us": []} for side in sides}
    for r in range(rounds):
        for side in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            us = measure_host_overhead(x, kernel, stride, pad, calls=100, rounds=1, plans=sides[side])
            for key in ("fwd_us", "fwd_bwd_us"):
                out[side][key].append(us[key])
    return out


def run_host(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Host microseconds per involution layer-step of the CUDA path over RedNet-50's layers; a new file each run."""
    import tempfile

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, rounds = (args.batch or [32])[0], args.repeats or 7
    dtypes, formats = args.dtypes or ["bf16"], args.memory_formats or list(MEMORY_FORMATS)
    for flag, vals, allowed in (("--dtypes", dtypes, DTYPES), ("--memory-formats", formats, MEMORY_FORMATS)):
        if any(v not in allowed for v in vals):
            raise UsageError(f"{flag}: unknown {[v for v in vals if v not in allowed]}; choose from {list(allowed)}")
    if batch < 1 or rounds < 1:
        raise UsageError("--batch and --repeats must be >= 1")
    shapes = involution_shapes("rednet50", 224)
    rows, totals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        plans = _baseline_plans(args.baseline, Path(tmp)) if args.baseline else None
        for dname in dtypes:
            for fmt in formats:
                part, network = [], {"current": [0.0] * rounds, "baseline": [0.0] * rounds}
                for s in shapes:
                    x, kernel, stride, pad = op_inputs(s, batch, DTYPES[dname], fmt, device)
                    got = _host_rounds(x, kernel, stride, pad, rounds, plans)
                    row = dict(shape=shape_str(s), name=s["name"], count=s["count"], batch=batch, dtype=dname,
                               layout=fmt)
                    for key, values in got["current"].items():
                        row[key], row[f"{key}_min"] = statistics.median(values), min(values)
                    for side, values in got.items():
                        network[side] = [t + v * s["count"] for t, v in zip(network[side], values["fwd_bwd_us"])]
                    if plans is not None:
                        row["baseline_fwd_bwd_us"] = statistics.median(got["baseline"]["fwd_bwd_us"])
                    part.append(row)
                    log(f"{dname} {fmt} {s['name']:<12} {shape_str(s):<24} fwd {row['fwd_us']:7.1f} us  "
                        f"fwd+bwd {row['fwd_bwd_us']:7.1f} us"
                        + (f"  baseline {row['baseline_fwd_bwd_us']:7.1f} us" if plans is not None else ""))
                layers = sum(r["count"] for r in part)
                total = dict(dtype=dname, layout=fmt, layers=layers,
                             per_step_ms=statistics.median(network["current"]) / 1e3,
                             per_layer_step_us=statistics.median(network["current"]) / layers,
                             per_layer_step_us_min=min(network["current"]) / layers)
                if plans is not None:
                    total["baseline_per_layer_step_us"] = statistics.median(network["baseline"]) / layers
                    total["vs_baseline"] = statistics.median(c / b for c, b in zip(network["current"],
                                                                                    network["baseline"]))
                totals.append(total)
                rows += part
    date = dt.date.today().isoformat()
    res = dict(date=date, device=device_name(device), torch=torch.__version__, batch=batch, rounds=rounds, calls=100,
               baseline=args.baseline,
               command="python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               rows=rows, totals=totals)
    out = args.json or _new_results_path(f"{date}-host-{device.type}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(host_markdown(res))
    print(host_markdown(res))
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


def run_checks(device: torch.device, dtypes: list[str] | None = None) -> list[dict]:
    """The first-contact check of every dtype (or ``dtypes``), RedNet window and memory format; prints one line each.

    Stops after the first check if the kernels cannot run here at all (no CuPy, no device).
    """
    rows = []
    configs = [(dn, w, fmt) for dn in dtypes or ("fp32", "bf16", "fp16", "fp64") for w in CHECK_WINDOWS
               for fmt in MEMORY_FORMATS]
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
    rows = run_checks(device, args.dtypes)
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


# ----------------------------------------------------------------------------------------
# gpu mode: a GPU's first run, in one command and one results file


# Every step together, each stop included; with the version queries (10 s each at most), CUDA's
# start and the file, the command stays under 10 minutes.
GPU_CHECK_BUDGET_S = 540
GPU_STEPS = {"pytest -m gpu": 240, "compute-sanitizer memcheck": 75, "compute-sanitizer racecheck": 75,
             "op benchmark": 60, "RedNet-50 vs ResNet-50 training": 90}  # seconds each, at most
_STOP_S = 10.0  # stopping a step that ran over: SIGTERM, 5 s, SIGKILL, its last output
_MIN_STEP_S = 2.0  # a step is not started with less time left than this
_OUTPUT_TAIL = 20000  # characters of a step's output kept in the results file


class GpuStep(NamedTuple):
    """One step of ``gpu`` mode: a command with a time budget, or a skip with its reason."""

    name: str
    argv: list[str] | None  # None: skipped
    budget_s: float
    skip: str = ""
    env: dict[str, str] = {}
    results: Path | None = None  # a JSON file the step writes, read into the results


def find_sanitizer() -> str | None:
    """``compute-sanitizer`` on PATH, else beside ``nvcc`` (a link followed) or in ``$CUDA_HOME``; None if absent.

    It comes with the CUDA toolkit, in ``bin/`` or its own ``compute-sanitizer/`` folder, not
    with the pip wheels of torch or CuPy.
    """
    import os
    import shutil

    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(Path(nvcc).resolve().parent.parent)
    roots += [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    for root in roots:
        for candidate in (root / "bin" / "compute-sanitizer", root / "compute-sanitizer" / "compute-sanitizer"):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def gpu_steps(tmp: Path, sanitizer: str | None) -> list[GpuStep]:
    """The four checks of a first GPU run (the sanitizer as two steps), each with its budget."""
    py, bench = sys.executable, str(ROOT / "tools" / "benchmark.py")
    steps = [GpuStep("pytest -m gpu", [py, "-m", "pytest", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider",
                                       str(ROOT / "tests")], GPU_STEPS["pytest -m gpu"])]
    for tool in ("memcheck", "racecheck"):
        name = f"compute-sanitizer {tool}"
        if sanitizer is None:
            steps.append(GpuStep(name, None, GPU_STEPS[name], skip="compute-sanitizer not found on PATH, beside nvcc "
                                 "or in $CUDA_HOME: it comes with the CUDA toolkit, not with the pip wheels"))
            continue
        # Only the involution kernels are instrumented; without PyTorch's caching allocator every
        # tensor is an allocation of its own, so an access past a tensor's end is one memcheck sees.
        steps.append(GpuStep(name, [sanitizer, "--tool", tool, "--error-exitcode", "1", "--kernel-name",
                                    "kns=involution", py, bench, "selfcheck", "--checks-only", "--json",
                                    str(tmp / f"selfcheck-{tool}.json")], GPU_STEPS[name],
                             env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
    steps.append(GpuStep("op benchmark", [py, bench, "op", "--device", "cuda", "--batch", "64", "--dtypes", "bf16",
                                          "--backends", "cupy", "--json", str(tmp / "op.json")],
                         GPU_STEPS["op benchmark"], results=tmp / "op.json"))
    steps.append(GpuStep("RedNet-50 vs ResNet-50 training", [py, bench, "model", "--device", "cuda", "--models",
                                                             "rednet50,resnet50", "--modes", "train", "--backends",
                                                             "cupy", "--json", str(tmp / "model.json")],
                         GPU_STEPS["RedNet-50 vs ResNet-50 training"], results=tmp / "model.json"))
    return steps


def _stop_group(proc) -> None:
    """SIGTERM to the step's process group (what it started too), then SIGKILL to whatever is left 5 s later."""
    import os
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # a child that outlived the step, or ignored SIGTERM
    except ProcessLookupError:
        pass


def run_step(step: GpuStep, budget_s: float) -> dict:
    """Run ``step`` for at most ``budget_s`` seconds; its row of the results."""
    import os
    import shlex
    import subprocess

    row = dict(name=step.name, command=shlex.join(step.argv) if step.argv else None, budget_s=round(budget_s, 1),
               status="", seconds=0.0, returncode=None, reason="", output="")
    if step.argv is None:
        return {**row, "status": "skipped", "reason": step.skip}
    if budget_s < _MIN_STEP_S:
        return {**row, "status": "not run", "reason": f"the command's {GPU_CHECK_BUDGET_S} s were spent"}
    env = {**os.environ, **step.env}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(rednet.__file__).parents[1]), env.get("PYTHONPATH"))
                                        if p)
    log(f"[{step.name}] {row['command']}  (at most {budget_s:.0f} s)")
    start = time.monotonic()
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=budget_s)
        status = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired as e:
        _stop_group(proc)
        try:
            out, _ = proc.communicate(timeout=_STOP_S / 2)
        except subprocess.TimeoutExpired:  # the pipe is still held open: keep what had come
            out = (e.output or b"").decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
        status = "timeout"
        row["reason"] = f"stopped after its budget of {budget_s:.0f} s"
    row.update(status=status, seconds=round(time.monotonic() - start, 1), returncode=proc.returncode,
               output=out[-_OUTPUT_TAIL:])
    row["summary"] = summarise_step(step.name, out, _read_json(step.results))
    log(f"[{step.name}] {status} in {row['seconds']} s" + (f": {row['summary']}" if row["summary"] else ""))
    return row


def _read_json(path: Path | None) -> dict | None:
    try:
        return json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None


def summarise_step(name: str, output: str, results: dict | None) -> str:
    """One line of what a step found: test counts, sanitizer errors, op time against its floor, img/s."""
    if name.startswith("pytest"):
        found = re.findall(r"^=+ (.+?) in [\d.]+s", output, re.M)
        return found[-1] if found else ""
    if name.startswith("compute-sanitizer"):
        found = re.findall(r"(ERROR SUMMARY: \d+ errors?|RACECHECK SUMMARY: \d+ hazards? displayed.*)", output)
        return "; ".join(dict.fromkeys(found))
    if name == "op benchmark" and results and results.get("op"):
        parts = []
        for layout in MEMORY_FORMATS:
            for pas in PASSES:
                rows = [r for r in results["op"] if (r["layout"], r["pass"]) == (layout, pas) and r["ms"]]
                if rows:
                    ms = sum(r["ms"] * r["count"] for r in rows)
                    floor = sum(r["floor_ms"] * r["count"] for r in rows)
                    parts.append(f"{layout} {pas} {ms:.2f} ms per RedNet-50 pass, {ms / floor:.2f}x the floor")
        return "; ".join(parts)
    if name.startswith("RedNet-50") and results and results.get("model"):
        speed = {r["model"]: r["img_per_s"] for r in results["model"] if r["mode"] == "train"}
        if {"rednet50", "resnet50"} <= speed.keys():
            return (f"rednet50 {speed['rednet50']:.0f} img/s, resnet50 {speed['resnet50']:.0f} img/s "
                    f"({speed['rednet50'] / speed['resnet50']:.2f}x)")
    return ""


def run_steps(steps: list[GpuStep], total_s: float = GPU_CHECK_BUDGET_S) -> list[dict]:
    """Each step in turn, within its budget and what is left of ``total_s``."""
    deadline = time.monotonic() + total_s
    return [run_step(step, min(step.budget_s, deadline - time.monotonic() - _STOP_S)) for step in steps]


def _first_line(argv: list[str]) -> str | None:
    import subprocess

    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return lines[-1] if done.returncode == 0 and lines else None


def gpu_environment(device: torch.device, sanitizer: str | None) -> dict:
    """Device, driver, CUDA, torch, CuPy, NVRTC and sanitizer versions."""
    props = torch.cuda.get_device_properties(device)
    return dict(device=props.name, capability=f"sm_{props.major}{props.minor}",
                memory_gb=round(props.total_memory / 2**30, 1), devices=torch.cuda.device_count(),
                driver=_first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i",
                                    str(device.index or 0)]),
                cuda=torch.version.cuda, torch=torch.__version__, cupy=_cupy_version(), nvrtc=_nvrtc_version(),
                compute_sanitizer=sanitizer and _first_line([sanitizer, "--version"]),
                python=platform.python_version(), platform=platform.platform())


def gpu_markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# GPU check {res['date']}: {env['device']}", "",
             ", ".join(f"{k} {v}" for k, v in env.items() if k != "device"), "",
             f"Command: `{res['command']}`; {res['seconds']:.0f} s of a {res['budget_s']} s budget.", "",
             "| step | status | s | budget s | summary |", "|---|---|---|---|---|"]
    for r in res["steps"]:
        summary = (r.get("summary") or r["reason"]).replace("|", "/")
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']} | {r['budget_s']} | {summary} |")
    for r in res["steps"]:
        if r["output"]:
            lines += ["", f"## {r['name']}: {r['status']}", "", f"`{r['command']}`", "", "```",
                      r["output"][-6000:].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def run_gpu(args: argparse.Namespace) -> int:
    """The first GPU run: the steps within their budgets, one results file; 0 if none failed."""
    import tempfile

    if not torch.cuda.is_available():
        raise UsageError(f"gpu needs a CUDA GPU, and torch sees none (torch {torch.__version__}, built with CUDA "
                         f"{torch.version.cuda}); nothing was run")
    started = time.monotonic()
    device = torch.device("cuda", torch.cuda.current_device())
    sanitizer = find_sanitizer()
    env = gpu_environment(device, sanitizer)
    date = dt.date.today().isoformat()
    out = args.json or _new_results_path(f"{date}-gpu-check-{re.sub(r'[^a-z0-9]+', '-', env['device'].lower())}")
    with tempfile.TemporaryDirectory() as tmp:
        steps = run_steps(gpu_steps(Path(tmp), sanitizer))
    res = dict(date=date, command="python tools/benchmark.py gpu", budget_s=GPU_CHECK_BUDGET_S,
               seconds=round(time.monotonic() - started, 1), environment=env, steps=steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(gpu_markdown(res))
    for r in steps:
        print(f"{r['status'].upper():<8} {r['name']:<32} {r['seconds']:6.1f} s  {r.get('summary') or r['reason']}")
    print(f"wrote {out} and {out.with_suffix('.md').name}")
    return 0 if all(r["status"] in ("passed", "skipped") for r in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
