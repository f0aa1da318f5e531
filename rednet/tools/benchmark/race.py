"""``race`` mode: RedNet-50 against ResNet-50 on the CPU, one process, interleaved, on every deployment path."""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import rednet
from rednet.ops import (
    can_use_fused_kernel,
    export_fused,
    onnx_translation_table,
    ort_library_path,
    select_backend,
)

from ._common import load_average, log, ort_version
from .model import infer_step, train_step
from .results import print_if_asked, results_file

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
    return train_step(model, model, imgs, target, fp32) if mode == "train" else infer_step(model, model, imgs, fp32)


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
    size, threads = args.img_size, torch.get_num_threads()
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


def race_mode(args: argparse.Namespace, date: str, command: str) -> int:
    """``race``: run it, add the run to the day's race file, and print it for ``--json`` alone."""
    out = results_file(args) or Path(args.output) / f"{date}-cpu-race.json"
    cpu = cpu_info()
    log(f"CPU: {cpu['model']} ({cpu['vendor']}, family {cpu['family']} model {cpu['model_number']}), "
        f"SIMD: {' '.join(cpu['simd']) or 'unknown'}; {torch.get_num_threads()} threads")
    load_before = load_average()
    run = dict(date=date, time=dt.datetime.now().strftime("%H:%M:%S"), command=command, cpu=cpu,
               threads=torch.get_num_threads(), torch=torch.__version__, onnxruntime=ort_version(),
               race=run_race(args))
    # Other processes on the same cores move the ratios: say how busy the machine was.
    run["load_average"] = dict(before=load_before, after=load_average())
    if "ort" in args.paths:
        run["ort_call_overhead"] = ort_call_overhead(torch.get_num_threads())
        o = run["ort_call_overhead"]
        log(f"ort call overhead: Identity {o['identity_us']:.1f} us, rednet.Involution {o['involution_us']:.1f} us "
            f"per run(): {o['overhead_us']:.1f} us more")
    append_race(out, run)
    print_if_asked(args, run)
    return 0
