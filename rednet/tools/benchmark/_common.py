"""What every benchmark mode shares: timing, peak memory, the copy bandwidth, names and versions."""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import rednet
from rednet.analysis.shapes import InvolutionShape

# The folder that holds the package: a checkout (with tests/ and git), or site-packages when installed.
CHECKOUT = Path(rednet.__file__).resolve().parents[1]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def shape_str(s: InvolutionShape) -> str:
    return f"{s['C']}x{s['H']}x{s['W']} K{s['K']} s{s['stride']} G{s['G']}"


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

    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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


# Kineto, the profiler's library, logs each profile's start and stop and, without a GPU, an ERROR
# that it found none (gpuGetDeviceCount), all on stderr, at every level below this one. It reads
# the level when its first profile starts.
_KINETO_SILENT = "6"


@contextlib.contextmanager
def _quiet_profiler():
    """Keep the profiler's own log lines off stderr for a CPU profile, unless $KINETO_LOG_LEVEL asks for them."""
    if "KINETO_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["KINETO_LOG_LEVEL"] = _KINETO_SILENT
    try:
        yield
    finally:
        del os.environ["KINETO_LOG_LEVEL"]


def copy_gbps(device: torch.device, mbytes: int) -> float:
    """Device copy bandwidth: bytes read plus bytes written per second of ``dst.copy_(src)``."""
    n = mbytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, repeats=20)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def fmt(v, nd=3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def cupy_version() -> str | None:
    try:
        import cupy
    except Exception:  # noqa: BLE001  (a broken CuPy install fails in many ways; the results then say none)
        return None
    return cupy.__version__


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, ours included), where the OS reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__

