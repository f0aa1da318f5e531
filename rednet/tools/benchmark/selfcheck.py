"""``selfcheck`` mode: a machine's first contact with the CUDA kernels, then ``op`` and ``model``."""
from __future__ import annotations

import argparse
import datetime as dt
import platform
from pathlib import Path

import torch

from rednet.engine import UsageError
from rednet.ops import (
    MEMORY_FORMATS,
    check_cuda_kernel,
)

from ._common import DTYPES, cupy_version, device_name
from .results import check_destination, command_line, default_out, results_file, write_results

CHECK_WINDOWS = ((3, 1, 1), (7, 1, 1), (7, 2, 1))  # RedNet's (K, stride, dilation): stem, blocks, stride-2 blocks


def nvrtc_version() -> str | None:
    try:
        from cupy.cuda import nvrtc

        return ".".join(map(str, nvrtc.getVersion()))
    except Exception:  # noqa: BLE001  (CuPy or its NVRTC missing or broken: the report then says none)
        return None


def environment_lines(device: torch.device) -> list[str]:
    """What a report about the kernels needs: the GPU, and torch, CUDA, CuPy and NVRTC versions."""
    major, minor = torch.cuda.get_device_capability(device)
    return [f"device: {torch.cuda.get_device_name(device)} (sm_{major}{minor}), {torch.cuda.device_count()} visible",
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), CuPy {cupy_version()}, NVRTC {nvrtc_version()}",
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
    from . import main  # the command itself, whose package imports this module

    code = main(["op", "--device", "cuda", "--batch", "64", "--json", str(out)])
    return code or main(["model", "--device", "cuda", "--models", "rednet50,resnet50", "--json", str(out)])


def run_selfcheck(args: argparse.Namespace, argv: list[str] | None) -> int:
    if not torch.cuda.is_available():
        raise UsageError(f"selfcheck needs a CUDA GPU, and torch sees none (torch {torch.__version__}, built with "
                         f"CUDA {torch.version.cuda}); nothing was checked")
    check_destination(args)
    device = torch.device("cuda", torch.cuda.current_device())
    for line in environment_lines(device):
        print(line)
    rows = run_checks(device, args.dtypes)
    date = dt.date.today().isoformat()
    out = results_file(args) or default_out(device, date, Path(args.output))
    res = dict(device=device_name(device), torch=torch.__version__, cuda=torch.version.cuda, cupy=cupy_version(),
               date=date, copy_gbps=None, command=command_line(argv), selfcheck=rows)
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
              f"{out}.")
        return 1
    print(f"all {len(rows)} checks passed")
    if args.checks_only:
        return 0
    return run_benchmarks(out)

