"""Smoke tests of tools/benchmark.py on the CPU: one tiny shape of the op mode, and the data mode; each checks
the results file."""
from __future__ import annotations

import json

import pytest
import torch

from rednet.analysis.shapes import involution_shapes

from ..helpers import load_tool


@pytest.fixture(scope="module")
def benchmark():
    return load_tool("benchmark")


def test_rednet50_involution_shapes():
    shapes = involution_shapes("rednet50")
    names = [s["name"] for s in shapes]
    assert names == ["stem", "layer1", "layer2.down", "layer2", "layer3.down", "layer3", "layer4.down", "layer4"]
    assert sum(s["count"] for s in shapes) == 1 + 3 + 4 + 6 + 3
    # Forward elements per image without the stem: 7.51M (docs/reference.md, performance anchors).
    fwd = 0
    for s in shapes[1:]:
        ho = (s["H"] - 1) // s["stride"] + 1
        fwd += s["count"] * (s["C"] * s["H"] * s["W"] + (s["C"] + s["G"] * s["K"] ** 2) * ho * ho)
    assert round(fwd / 1e6, 2) == 7.51


def test_involution_shapes_of_a_module_leaves_it_as_it_was():
    import rednet

    model = rednet.create_model("rednet26")
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    assert involution_shapes(model, 64) == involution_shapes("rednet26", 64)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k


def test_op_cpu_writes_results(benchmark, tmp_path):
    out = tmp_path / "bench.json"
    code = benchmark.main(["op", "--device", "cpu", "--shapes", "layer4", "--batch", "1", "--repeats", "1",
                           "--warmup", "0", "--copy-mb", "8", "--threads", "1", "--json", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    for key in ("device", "torch", "cuda", "cupy", "date", "copy_gbps", "op", "model"):
        assert key in res
    assert res["copy_gbps"] > 0 and res["model"] == []
    rows = {r["backend"]: r for r in res["op"]}
    assert set(rows) == {"reference", "unfold"}
    for r in rows.values():
        assert r["shape"] == "512x7x7 K7 s1 G32" and r["dtype"] == "fp32" and r["layout"] == "nchw"
        assert r["pass"] == "fwd+bwd" and r["ms"] > 0 and r["floor_ms"] > 0
    # The floor depends on the shape only, not on the backend.
    assert rows["unfold"]["floor_ms"] == rows["reference"]["floor_ms"]
    # unfold materialises (B, C*K*K, Ho*Wo) columns: 49x the input, 4.9 MB here.
    assert rows["unfold"]["peak_mem_mb"] > 4 * rows["reference"]["peak_mem_mb"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| 512x7x7 K7 s1 G32 | layer4 |" in md and "Speedup over unfold" in md


@pytest.mark.parametrize("argv,message", [
    (["op", "--device", "cpu", "--shapes", "layer9"], "error: --shapes: unknown ['layer9']; choose from ['stem', "),
    (["op", "--device", "cpu", "--memory-formats", "nchw,chwn"], "error: --memory-formats: unknown ['chwn']"),
    (["op", "--device", "cpu", "--layouts", "chwn"], "error: --memory-formats: unknown ['chwn']"),
    (["model", "--device", "cpu", "--modes", "serve"], "error: --modes: unknown ['serve']"),
])
def test_bad_arguments_exit_2_with_one_error_line(benchmark, tmp_path, capsys, argv, message):
    out = tmp_path / "bench.json"
    assert benchmark.main([*argv, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_exits_2(benchmark, capsys):
    assert benchmark.main(["op", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "error: --device cuda: no CUDA device is visible to torch; use --device cpu\n"


def test_help_works(benchmark, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--help"])
    assert exc.value.code == 0
    assert "--memory-formats" in capsys.readouterr().out


def test_race_writes_interleaved_ratios(benchmark, tmp_path):
    out = tmp_path / "race.json"
    argv = ["race", "--models", "rednet26,resnet18", "--race-batch", "1", "--repeats", "2", "--warmup", "0",
            "--paths", "eager,ort", "--no-ort-standard", "--img-size", "64", "--threads", "1", "--copy-mb", "8",
            "--json", str(out)]
    assert benchmark.main(argv) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["cpu"]["model"] and isinstance(run["cpu"]["simd"], list) and run["threads"] == 1
    rows = run["race"]
    assert [(r["path"], r["model"]) for r in rows] == [
        ("eager", "rednet26"), ("eager", "resnet18"), ("ort", "rednet26 (rednet.Involution)"), ("ort", "resnet18")]
    red, base = rows[:2]
    assert len(red["times_ms"]) == 2 and red["baseline"] == "resnet18" and base["vs_baseline"] == 1.0
    assert red["involution"] in ("fused", "reference") and base["involution"] == "-"
    assert red["vs_baseline"] > 0 and red["img_per_s"] > 0
    assert all(r["max_abs_diff"] < 1e-4 for r in rows[2:])  # ONNX Runtime against eager PyTorch
    assert run["ort_call_overhead"]["involution_us"] > 0
    # A second run is appended, never written over the first.
    assert benchmark.main(argv[:-2] + ["--paths", "eager", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 and runs[0] == run
    md = out.with_suffix(".md").read_text()
    assert md.count("SIMD flags:") == 2 and "| ort | 1 | rednet26 (rednet.Involution) | fused |" in md


def test_op_native_against_the_reference(benchmark, tmp_path):
    out = tmp_path / "op.json"
    assert benchmark.main(["op", "--device", "cpu", "--shapes", "layer4", "--batch", "1", "--repeats", "1",
                           "--warmup", "0", "--copy-mb", "8", "--threads", "1", "--backends", "reference,native",
                           "--memory-formats", "nhwc", "--json", str(out)]) == 0
    assert {r["backend"] for r in json.loads(out.read_text())["op"]} == {"reference", "native"}
    assert "Speedup over reference" in out.with_suffix(".md").read_text()


# --- issue 20, item 8: results out of the checkout, never written over, no profiler noise ------------

TINY_OP = ["op", "--device", "cpu", "--shapes", "layer4", "--batch", "1", "--repeats", "1", "--warmup", "0",
           "--copy-mb", "8", "--threads", "1"]


def test_a_second_run_of_the_day_adds_its_rows_and_its_command(benchmark, tmp_path, capsys):
    """A second op (or model, or selfcheck) run of the same day and device replaced the first one's rows."""
    import datetime as dt

    first = [*TINY_OP, "--backends", "unfold", "--output", str(tmp_path)]
    assert benchmark.main(first) == 0
    out = tmp_path / f"{dt.date.today().isoformat()}-cpu.json"
    rows = json.loads(out.read_text())["op"]
    assert [r["run"] for r in rows] == [1]
    second = [*TINY_OP, "--backends", "reference,unfold", "--output", str(tmp_path), "--json"]
    assert benchmark.main(second) == 0
    printed = json.loads(capsys.readouterr().out)  # --json alone: the results on stdout too
    model = ["model", "--device", "cpu", "--models", "resnet18", "--modes", "infer", "--model-batch", "1",
             "--repeats", "1", "--warmup", "0", "--copy-mb", "8", "--output", str(tmp_path)]
    assert benchmark.main(model) == 0
    res = json.loads(out.read_text())
    assert res["op"][:1] == rows and [r["run"] for r in res["op"]] == [1, 2, 2] and printed["op"] == res["op"]
    assert [(r["model"], r["run"]) for r in res["model"]] == [("resnet18", 3)]
    commands = [run["command"] for run in res["runs"]]
    assert commands == [f"python -m rednet benchmark {' '.join(argv)}" for argv in (first, second, model)]
    md = out.with_suffix(".md").read_text()
    assert all(f"`{command}`" in md for command in commands) and md.count("| layer4 |") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, out.with_suffix(".md").name]


def test_modes_with_a_file_per_run_write_a_new_one(benchmark, tmp_path):
    taken = tmp_path / "r.json"
    taken.write_text("earlier\n")
    assert benchmark.results.new_results_file(taken) == tmp_path / "r-2.json"
    (tmp_path / "r-2.md").write_text("earlier\n")  # its markdown alone counts too
    assert benchmark.results.new_results_file(taken) == tmp_path / "r-3.json"
    assert benchmark.results.new_results_file(tmp_path / "new.json") == tmp_path / "new.json"


def test_the_cpu_op_benchmark_writes_under_runs_and_prints_only_its_own_lines(tmp_path):
    """Kineto printed its USDT profiler_start/stop lines and `ERROR ... gpuGetDeviceCount failed` on stderr,
    and the results went into the checkout's benchmarks/results/."""
    import datetime as dt
    import os
    import re
    import subprocess
    import sys

    from ..helpers import ROOT

    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-m", "rednet", "benchmark", *TINY_OP], cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 4 and proc.stdout == "", proc.stderr  # bandwidth, two rows, wrote
    assert all(re.match(r"(cpu: .* copy bandwidth|\[\d/2\] layer4 |wrote runs/benchmarks/)", line) for line in lines), \
        proc.stderr
    assert (tmp_path / "runs" / "benchmarks" / f"{dt.date.today().isoformat()}-cpu.json").is_file()


# --- the data mode (issue 17, item 7): end to end, a smoke test; no timing is asserted ------------


def test_benchmark_data_mode_writes_its_results(tmp_path, capsys):
    import json

    from ..helpers import load_tool

    bench = load_tool("benchmark")
    assert bench.main(["data", "--images", "4", "--batch", "8"]) == 2  # not one batch: exit 2, one line
    assert capsys.readouterr().err.startswith("error:")
    out = tmp_path / "data.json"
    argv = ["data", "--images", "16", "--batch", "8", "--repeats", "1", "--workers", "0", "--json", str(out)]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    assert [r["kind"] for r in res["rows"]] == ["train", "eval", "read"]  # no workers: no main-process row
    assert res["environment"]["cpu_model"] and res["command"].endswith(" ".join(argv))
    assert all(r["old"] > 0 and r["new"] > 0 for r in res["rows"]) and out.with_suffix(".md").is_file()
