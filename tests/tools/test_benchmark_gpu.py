"""``tools/benchmark.py gpu`` without a GPU: exit 2 with one line; with the GPU faked and the steps
standing in, the budgets (a step stopped with what it started, the whole command's limit), the
sanitizer found or skipped, and the one results file."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from ..helpers import load_tool


@pytest.fixture(scope="module")
def benchmark():
    return load_tool("benchmark")


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_gpu_mode_without_a_gpu_says_so_and_exits_2(benchmark, capsys, tmp_path):
    out = tmp_path / "r.json"
    assert benchmark.main(["gpu", "--json", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: gpu needs a CUDA GPU, and torch sees none (torch ")
    assert captured.err.count("\n") == 1 and captured.out == "" and not out.exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_step_over_its_budget_is_stopped_with_what_it_started(benchmark, tmp_path):
    spawner = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
               "print('child', p.pid, flush=True); time.sleep(60)")
    steps = [benchmark.gpu.GpuStep("passes", _py("print('fine')"), 30),
             benchmark.gpu.GpuStep("fails", _py("import sys; print('broken'); sys.exit(3)"), 30),
             benchmark.gpu.GpuStep("hangs", _py(spawner), 2),
             benchmark.gpu.GpuStep("absent", None, 30, skip="compute-sanitizer not found")]
    start = time.monotonic()
    rows = benchmark.gpu.run_steps(steps, total_s=120)
    assert time.monotonic() - start < 30
    assert [r["status"] for r in rows] == ["passed", "failed", "timeout", "skipped"]
    assert rows[0]["output"] == "fine\n" and rows[1]["returncode"] == 3 and "broken" in rows[1]["output"]
    hung = rows[2]
    assert hung["reason"] == "stopped after its budget of 2 s" and 2 <= hung["seconds"] < 15
    child = int(hung["output"].split()[1])  # what it printed before it was stopped is kept
    time.sleep(0.5)
    assert not _alive(child)  # the process it started was stopped with it
    assert rows[3]["reason"] == "compute-sanitizer not found" and rows[3]["command"] is None


def test_the_whole_command_keeps_to_its_budget(benchmark, monkeypatch):
    monkeypatch.setattr(benchmark.gpu, "_STOP_S", 1.0)
    steps = [benchmark.gpu.GpuStep("slow", _py("import time; time.sleep(60)"), 100),
             benchmark.gpu.GpuStep("next", _py("print('late')"), 100)]
    start = time.monotonic()
    rows = benchmark.gpu.run_steps(steps, total_s=4)
    assert time.monotonic() - start < 15
    assert rows[0]["status"] == "timeout" and rows[0]["budget_s"] == pytest.approx(3, abs=0.2)
    assert rows[1]["status"] == "not run" and "were spent" in rows[1]["reason"]


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho fake\n")
    path.chmod(0o755)
    return path


def test_the_sanitizer_is_found_beside_nvcc_or_skipped(benchmark, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert benchmark.gpu.find_sanitizer() is None
    steps = benchmark.gpu.gpu_steps(tmp_path, None)
    skipped = [s for s in steps if s.argv is None]
    assert [s.name for s in skipped] == ["compute-sanitizer memcheck", "compute-sanitizer racecheck"]
    assert "CUDA toolkit" in skipped[0].skip and len(steps) == 5
    # The toolkit's layout: bin/nvcc (reached through a link on PATH) and compute-sanitizer/compute-sanitizer.
    toolkit = tmp_path / "cuda-13.0"
    nvcc = _executable(toolkit / "bin" / "nvcc")
    sanitizer = _executable(toolkit / "compute-sanitizer" / "compute-sanitizer")
    (empty / "nvcc").symlink_to(nvcc)
    assert benchmark.gpu.find_sanitizer() == str(sanitizer)
    on_path = _executable(tmp_path / "tools" / "compute-sanitizer")
    monkeypatch.setenv("PATH", f"{on_path.parent}{os.pathsep}{empty}")
    assert benchmark.gpu.find_sanitizer() == str(on_path)  # PATH first
    steps = benchmark.gpu.gpu_steps(tmp_path, str(sanitizer))
    memcheck = steps[1]
    assert memcheck.argv[:3] == [str(sanitizer), "--tool", "memcheck"] and "selfcheck" in memcheck.argv
    assert memcheck.env == {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    assert sum(benchmark.gpu.GPU_STEPS.values()) <= benchmark.gpu.GPU_CHECK_BUDGET_S < 600


def test_what_each_step_found_is_summarised(benchmark):
    assert benchmark.gpu.summarise_step("pytest -m gpu", "...\n===== 48 passed, 3 skipped in 201.52s (0:03:21) =====\n",
                                    None) == "48 passed, 3 skipped"
    assert benchmark.gpu.summarise_step("compute-sanitizer memcheck", "x\n========= ERROR SUMMARY: 0 errors\n",
                                    None) == "ERROR SUMMARY: 0 errors"
    op = {"op": [dict(layout="nhwc", **{"pass": "fwd"}, ms=1.0, floor_ms=0.5, count=2),
                 dict(layout="nhwc", **{"pass": "fwd"}, ms=3.0, floor_ms=1.0, count=1)]}
    assert benchmark.gpu.summarise_step("op benchmark", "", op) == \
        "nhwc fwd 5.00 ms per RedNet-50 pass, 2.50x the floor"
    model = {"model": [dict(model="rednet50", mode="train", img_per_s=2000.0),
                       dict(model="resnet50", mode="train", img_per_s=2500.0)]}
    assert benchmark.gpu.summarise_step("RedNet-50 vs ResNet-50 training", "", model) == \
        "rednet50 2000 img/s, resnet50 2500 img/s (0.80x)"


def test_gpu_mode_writes_one_results_file(benchmark, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(benchmark.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(benchmark.gpu, "find_sanitizer", lambda: None)
    env = dict(device="Fake GPU", capability="sm_90", driver="580.65", cuda="13.0", torch=torch.__version__,
               cupy="14.0.0", nvrtc="13.0", compute_sanitizer=None)
    monkeypatch.setattr(benchmark.gpu, "gpu_environment", lambda device, sanitizer: dict(env))
    fail = {"on": False}

    def steps(tmp, sanitizer):
        op = tmp / "op.json"
        rows = [dict(layout="nhwc", **{"pass": "fwd+bwd"}, ms=2.0, floor_ms=1.0, count=17)]
        write = f"import json; open({str(op)!r}, 'w').write(json.dumps({{'op': {rows!r}}}))"
        return [benchmark.gpu.GpuStep("pytest -m gpu", _py("print('== 3 passed in 1.00s ==')"), 30),
                benchmark.gpu.GpuStep("compute-sanitizer memcheck", None, 30, skip="compute-sanitizer not found"),
                benchmark.gpu.GpuStep("op benchmark", _py(write), 30, results=op),
                benchmark.gpu.GpuStep("RedNet-50 vs ResNet-50 training",
                                      _py(f"import sys; sys.exit({int(fail['on'])})"), 30)]

    monkeypatch.setattr(benchmark.gpu, "gpu_steps", steps)
    out = tmp_path / "gpu.json"
    assert benchmark.main(["gpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["environment"] == env and res["budget_s"] == benchmark.gpu.GPU_CHECK_BUDGET_S
    assert [r["status"] for r in res["steps"]] == ["passed", "skipped", "passed", "passed"]
    assert res["steps"][0]["summary"] == "3 passed"
    assert res["steps"][2]["summary"] == "nhwc fwd+bwd 34.00 ms per RedNet-50 pass, 2.00x the floor"
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# GPU check ") and "| compute-sanitizer memcheck | skipped |" in text
    assert "wrote" in capsys.readouterr().out
    fail["on"] = True  # a failed step: exit 1, still one file; a new one, the first run's stays as it was
    first = out.read_text()
    assert benchmark.main(["gpu", "--json", str(out)]) == 1
    assert json.loads((tmp_path / "gpu-2.json").read_text())["steps"][3]["status"] == "failed"
    assert out.read_text() == first and (tmp_path / "gpu-2.md").is_file()
