"""``gpu`` mode: a GPU's first run, in one command and one results file."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from rednet.engine import UsageError
from rednet.ops import (
    MEMORY_FORMATS,
)

from ._common import CHECKOUT, cupy_version, log
from .op import PASSES
from .results import check_destination, command_line, new_results_file, print_if_asked, results_file
from .selfcheck import nvrtc_version

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
    py = sys.executable
    bench = [py, "-m", "rednet", "benchmark"]
    tests = CHECKOUT / "tests"
    if (tests / "conftest.py").is_file():
        steps = [GpuStep("pytest -m gpu", [py, "-m", "pytest", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider",
                                           str(tests)], GPU_STEPS["pytest -m gpu"])]
    else:
        steps = [GpuStep("pytest -m gpu", None, GPU_STEPS["pytest -m gpu"],
                         skip=f"no test suite beside the package ({tests}): run from a checkout or the sdist")]
    for tool in ("memcheck", "racecheck"):
        name = f"compute-sanitizer {tool}"
        if sanitizer is None:
            steps.append(GpuStep(name, None, GPU_STEPS[name], skip="compute-sanitizer not found on PATH, beside nvcc "
                                 "or in $CUDA_HOME: it comes with the CUDA toolkit, not with the pip wheels"))
            continue
        # Only the involution kernels are instrumented; without PyTorch's caching allocator every
        # tensor is an allocation of its own, so an access past a tensor's end is one memcheck sees.
        steps.append(GpuStep(name, [sanitizer, "--tool", tool, "--error-exitcode", "1", "--kernel-name",
                                    "kns=involution", *bench, "selfcheck", "--checks-only", "--json",
                                    str(tmp / f"selfcheck-{tool}.json")], GPU_STEPS[name],
                             env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
    steps.append(GpuStep("op benchmark", [*bench, "op", "--device", "cuda", "--batch", "64", "--dtypes", "bf16",
                                          "--backends", "cupy", "--json", str(tmp / "op.json")],
                         GPU_STEPS["op benchmark"], results=tmp / "op.json"))
    steps.append(GpuStep("RedNet-50 vs ResNet-50 training", [*bench, "model", "--device", "cuda", "--models",
                                                             "rednet50,resnet50", "--modes", "train", "--backends",
                                                             "cupy", "--json", str(tmp / "model.json")],
                         GPU_STEPS["RedNet-50 vs ResNet-50 training"], results=tmp / "model.json"))
    return steps


def _stop_group(proc) -> None:
    """SIGTERM to the step's process group (what it started too), then SIGKILL to whatever is left 5 s later."""
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
    import subprocess

    row = dict(name=step.name, command=shlex.join(step.argv) if step.argv else None, budget_s=round(budget_s, 1),
               status="", seconds=0.0, returncode=None, reason="", output="")
    if step.argv is None:
        return {**row, "status": "skipped", "reason": step.skip}
    if budget_s < _MIN_STEP_S:
        return {**row, "status": "not run", "reason": f"the command's {GPU_CHECK_BUDGET_S} s were spent"}
    env = {**os.environ, **step.env}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), env.get("PYTHONPATH")) if p)
    log(f"[{step.name}] {row['command']}  (at most {budget_s:.0f} s)")
    start = time.monotonic()
    proc = subprocess.Popen(step.argv, cwd=CHECKOUT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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
                cuda=torch.version.cuda, torch=torch.__version__, cupy=cupy_version(), nvrtc=nvrtc_version(),
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


def run_gpu(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The first GPU run: the steps within their budgets, one results file; 0 if none failed."""

    if not torch.cuda.is_available():
        raise UsageError(f"gpu needs a CUDA GPU, and torch sees none (torch {torch.__version__}, built with CUDA "
                         f"{torch.version.cuda}); nothing was run")
    check_destination(args)
    started = time.monotonic()
    device = torch.device("cuda", torch.cuda.current_device())
    sanitizer = find_sanitizer()
    env = gpu_environment(device, sanitizer)
    date = dt.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower())
    with tempfile.TemporaryDirectory() as tmp:
        steps = run_steps(gpu_steps(Path(tmp), sanitizer))
    res = dict(date=date, command=command_line(argv), budget_s=GPU_CHECK_BUDGET_S,
               seconds=round(time.monotonic() - started, 1), environment=env, steps=steps)
    out = new_results_file(results_file(args) or Path(args.output) / f"{date}-gpu-check-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(gpu_markdown(res))
    for r in steps:
        print(f"{r['status'].upper():<8} {r['name']:<32} {r['seconds']:6.1f} s  {r.get('summary') or r['reason']}")
    print(f"wrote {out} and {out.with_suffix('.md').name}")
    print_if_asked(args, res)
    return 0 if all(r["status"] in ("passed", "skipped") for r in steps) else 1

