"""``tools/benchmark.py selfcheck`` on CPU: no GPU exits 2; with the GPU and the checks faked,
one line per configuration, the results file, exit 1 with the causes on a failure."""
from __future__ import annotations

import json

import pytest
import torch

from rednet.ops import KernelCheck

from ..helpers import load_tool


@pytest.fixture(scope="module")
def benchmark():
    return load_tool("benchmark")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_selfcheck_without_a_gpu_says_so_and_exits_2(benchmark, capsys, tmp_path):
    out = tmp_path / "r.json"
    assert benchmark.main(["selfcheck", "--json", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: selfcheck needs a CUDA GPU, and torch sees none (torch ")
    assert captured.err.count("\n") == 1 and captured.out == "" and not out.exists()


@pytest.fixture
def fake_gpu(benchmark, monkeypatch):
    """A visible "GPU" whose kernel checks answer from ``checks``: (dtype, K, stride, nhwc?) -> KernelCheck."""
    checks = {}
    seen = []
    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(benchmark.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(benchmark.selfcheck, "environment_lines", lambda device: [f"device: Fake GPU on {device}"])
    monkeypatch.setattr(benchmark.selfcheck, "device_name", lambda device: "Fake GPU")

    def check(device, dtype, k, s, d, fmt):
        seen.append((str(device), dtype, k, s, d, fmt))
        return checks.get((dtype, k, s, fmt), KernelCheck(True, "passed", "", 0.01))

    monkeypatch.setattr(benchmark.selfcheck, "check_cuda_kernel", check)
    benchmarks = []
    monkeypatch.setattr(benchmark.selfcheck, "run_benchmarks", lambda out: benchmarks.append(out) or 0)
    return checks, seen, benchmarks


def test_selfcheck_all_passing_prints_one_line_each_then_benchmarks(benchmark, fake_gpu, capsys, tmp_path):
    checks, seen, benchmarks = fake_gpu
    out = tmp_path / "r.json"
    assert benchmark.main(["selfcheck", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "device: Fake GPU on cuda:0"
    assert len(seen) == 4 * 3 * 2 == sum(line.startswith("PASS  ") for line in lines)  # dtype x window x format
    assert "PASS  bf16  K7 s2 d1 nhwc    0.01 s" in lines and lines[-1] == "all 24 checks passed"
    assert benchmarks == [out]
    res = json.loads(out.read_text())
    assert len(res["selfcheck"]) == 24 and all(r["ok"] for r in res["selfcheck"]) and res["op"] == []
    assert "## First-contact check of the CUDA kernels" in out.with_suffix(".md").read_text()


def test_selfcheck_failure_prints_the_cause_skips_benchmarks_and_exits_1(benchmark, fake_gpu, capsys, tmp_path):
    checks, seen, benchmarks = fake_gpu
    headers = KernelCheck(False, "compile", "RuntimeError: Failed to find CUDA headers\nsecond line", 0.2)
    for fmt in ("nchw", "nhwc"):
        checks[(torch.float16, 7, 2, fmt)] = headers
    checks[(torch.bfloat16, 3, 1, "nhwc")] = KernelCheck(False, "result", "grad_kernel differs from the reference", 0)
    out = tmp_path / "r.json"
    earlier = [dict(model="resnet50", backend="-", mode="train", batch=64, img_per_s=100.0, peak_mem_gb=1.0)]
    out.write_text(json.dumps({"model": earlier}))  # an earlier model run of the same day is kept
    assert benchmark.main(["selfcheck", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "FAIL  fp16  K7 s2 d1 nchw    0.20 s  compile: RuntimeError: Failed to find CUDA headers\n" in text
    assert "FAIL  bf16  K3 s1 d1 nhwc    0.00 s  result: grad_kernel differs from the reference" in text
    assert "3 of 24 checks failed; auto uses the reference" in text
    assert text.count("second line") == 1  # each distinct cause in full, once
    assert "issue tracker" in text and str(out) in text
    assert benchmarks == []
    res = json.loads(out.read_text())
    assert res["model"] == earlier and sum(not r["ok"] for r in res["selfcheck"]) == 3
    assert "FAIL: compile" in out.with_suffix(".md").read_text()


def test_selfcheck_where_the_kernels_cannot_run_at_all(benchmark, fake_gpu, capsys, tmp_path, monkeypatch):
    why = "CuPy is not importable (ModuleNotFoundError: No module named 'cupy')"
    monkeypatch.setattr(benchmark.selfcheck, "check_cuda_kernel",
                        lambda *a: KernelCheck(False, "unavailable", why, 0.0))
    assert benchmark.main(["selfcheck", "--json", str(tmp_path / "r.json")]) == 1
    text = capsys.readouterr().out
    assert f"FAIL  the cupy backend cannot run here: {why}" in text and "1 of 1 checks failed" in text
