"""The GPU training path on CPU stand-ins (issue 18): the fast path by default and the warnings when
a run is off it, the launch-plan cache, and the CUDA graphs switch.

A CUDA device is stood in for by a ``torch.device("cuda", 0)`` handed to the functions that
decide (nothing runs on it), by ``rednet.ops``' availability seams, and, for the op, by CPU
tensors taking the CUDA implementation with the launch replaced by a no-op.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import rednet
from rednet.engine import load_config
from rednet.engine.builder import execution_warnings
from rednet.ops import _cupy

from ..helpers import CONFIGS

CUDA = torch.device("cuda", 0)
NOT_IMPORTABLE = ("reference (CuPy is not importable (ModuleNotFoundError: No module named 'cupy'); install "
                  "cupy-cuda13x (pip install rednet[cuda]))")


@pytest.fixture(scope="module")
def rednet26():
    with torch.device("meta"):  # only its modules are looked at
        return rednet.create_model("rednet26")


# ----------------------------------------------------------------------------------------
# 1. The fast path by default.


@pytest.mark.parametrize("name", ["imagenet_recipe"] + [f"rednet{d}" for d in (26, 38, 50, 101, 152)])
def test_the_imagenet_configs_train_channels_last(name):
    cfg = load_config(f"{name}.yaml")
    assert cfg.train.channels_last and cfg.train.amp == "bf16"
    assert (CONFIGS / f"{name}.yaml").is_file()


def test_nchw_on_cuda_warns_once_with_the_fix(rednet26):
    cfg = load_config("rednet26", ["train.channels_last=false"])
    (warning,) = execution_warnings(rednet26, cfg, CUDA, "cupy")
    assert "NCHW" in warning and "--set train.channels_last=true" in warning
    assert execution_warnings(rednet26, load_config("rednet26"), CUDA, "cupy") == []  # the fast path: silent


def test_no_usable_cupy_on_cuda_warns_once_with_the_fix(rednet26, monkeypatch):
    cfg = load_config("rednet26")
    (warning,) = execution_warnings(rednet26, cfg, CUDA, NOT_IMPORTABLE)
    assert "No module named 'cupy'" in warning and "pip install rednet[cuda]" in warning
    assert "PyTorch reference" in warning and warning.count("pip install") == 1
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    (warning,) = execution_warnings(rednet26, cfg, CUDA, "reference (CuPy sees no usable CUDA device (driver or "
                                                          "runtime mismatch?))")
    assert "driver or runtime mismatch" in warning and 'Fix: pip install "rednet[cuda]"' in warning
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a torch for CUDA 12: the extra's CuPy is the wrong one
    (warning,) = execution_warnings(rednet26, cfg, CUDA, "reference (CuPy sees no usable CUDA device)")
    assert "pip install cupy-cuda12x" in warning
    # Both at once: two warnings, each with its own fix.
    assert len(execution_warnings(rednet26, load_config("rednet26", ["train.channels_last=false"]), CUDA,
                                  NOT_IMPORTABLE)) == 2


def test_no_warning_where_nothing_is_lost(rednet26):
    nchw = load_config("rednet26", ["train.channels_last=false"])
    assert execution_warnings(rednet26, nchw, torch.device("cpu"), "reference (no compiler)") == []  # not CUDA
    forced = "reference (forced by $REDNET_INVOLUTION_BACKEND or use_backend)"
    assert execution_warnings(rednet26, load_config("rednet26"), CUDA, forced) == []  # asked for
    with torch.device("meta"):
        resnet = rednet.create_model("resnet18")
    assert execution_warnings(resnet, nchw, CUDA, "none (the model has no involution layers)") == []


def test_the_warning_follows_what_rednet_ops_says_about_the_device(rednet26, monkeypatch):
    # No injected answer: describe_backend is asked, through the ops' availability seam.
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    monkeypatch.setattr(_cupy, "installed", lambda: False)
    monkeypatch.setattr(_cupy, "can_run_on", lambda *a: (False, "CuPy is not importable (ModuleNotFoundError)"))
    cfg = load_config("rednet26")
    (warning,) = execution_warnings(rednet26, cfg, CUDA)
    assert "CuPy is not importable" in warning and "rednet[cuda]" in warning
    monkeypatch.setattr(_cupy, "can_run_on", lambda *a: (True, "ok"))
    assert execution_warnings(rednet26, cfg, CUDA) == []


def test_the_trainer_logs_the_warning_once_after_the_execution_line(tmp_path, monkeypatch, caplog):
    from rednet.engine import trainer

    def on_cuda(model, cfg, device, backend=None):  # the run's CPU stands in for a CUDA device
        return execution_warnings(model, cfg, CUDA, backend)

    monkeypatch.setattr(trainer, "execution_warnings", on_cuda)
    cfg = load_config(None, ["model.name=rednet26", "model.num_classes=4", "data.dataset=synthetic", "data.img_size=16",
                             "data.batch_size=4", "data.workers=0", "data.synthetic_train_size=4",
                             "data.synthetic_val_size=4", "train.epochs=1", "train.device=cpu",
                             "train.channels_last=false", f"train.output={tmp_path}"])
    with caplog.at_level(logging.INFO, logger="rednet"):
        trainer.fit(cfg)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "rednet"]
    at = next(i for i, (_, m) in enumerate(messages) if m.startswith("execution: "))
    warnings = [m for level, m in messages if level == logging.WARNING]
    assert len(warnings) == 1 and messages[at + 1] == (logging.WARNING, warnings[0])
    assert "--set train.channels_last=true" in warnings[0]


# ----------------------------------------------------------------------------------------
# 5. Host overhead: launch plans cached by shape, the host cost measured with a fake launch,
# and CUDA graphs through torch.compile's reduce-overhead mode.


def _nhwc(b=2, c=64, g=4, h=14, w=14, k=7, s=1, dtype=torch.bfloat16):
    p = (k - 1) // 2
    ho, wo = ((n + 2 * p - k) // s + 1 for n in (h, w))
    x = torch.randn(b, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    kernel = torch.randn(b, g * k * k, ho, wo).to(dtype).contiguous(memory_format=torch.channels_last)
    return x, kernel.view(b, g, k, k, ho, wo), s, p


def test_launch_plans_are_cached_by_shape_and_never_hold_a_pointer():
    from rednet.ops import _plan

    _plan._geometry.cache_clear()
    x, kernel, s, p = _nhwc()
    first = _plan.plan_forward(x, kernel, s, p, 1)[1]
    x2, kernel2, _, _ = _nhwc()  # the same shapes, other storage
    y2, second = _plan.plan_forward(x2, kernel2, s, p, 1)
    info = _plan._geometry.cache_info()
    assert (info.misses, info.hits, info.maxsize) == (1, 1, 1024)  # planned once; bounded
    assert (first.name, first.grid, first.smem, first.args[3:]) == (second.name, second.grid, second.smem,
                                                                     second.args[3:])
    # The addresses are this call's, put in front of the cached arguments.
    assert [int(a) for a in second.args[:3]] == [x2.data_ptr(), _plan.dense_kernel(kernel2, "nhwc").data_ptr(),
                                                 y2.data_ptr()]
    assert first.args[:3] != second.args[:3]
    kept = _plan._geometry("fwd", x.dtype, tuple(x.shape), tuple(kernel.shape), s, p, 1, "nhwc", True,
                           _plan.max_shared_bytes(x.device))
    assert kept.name == first.name and _plan._geometry.cache_info().misses == 1  # what the cache holds
    assert not any(isinstance(v, np.uint64) for v in kept.tail)  # no pointer in it


def test_what_a_plan_depends_on_besides_the_shape_is_in_the_cache_key(monkeypatch):
    from rednet.ops import _plan

    x, kernel, s, p = _nhwc()
    assert "_nhwc<" in _plan.plan_forward(x, kernel, s, p, 1)[1].name
    off = torch.empty(x.numel() + 8, dtype=x.dtype)[1:1 + x.numel()]  # 2 bytes off 16-byte alignment
    x_off = off.view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)
    assert x_off.is_contiguous(memory_format=torch.channels_last) and x_off.data_ptr() % 16
    assert "_nhwc_scalar<" in _plan.plan_forward(x_off, kernel, s, p, 1)[1].name  # not the aligned plan
    monkeypatch.setattr(_plan, "max_shared_bytes", lambda device: 16 * 1024)  # a device with less shared memory
    assert "_nhwc_scalar<" in _plan.plan_forward(x, kernel, s, p, 1)[1].name
    nchw = _plan.plan_forward(x.contiguous(), kernel.contiguous(), s, p, 1)[1]
    assert "_nchw<" in nchw.name  # the memory format is part of it too


def test_the_host_cost_is_measured_on_the_cuda_path_and_leaves_nothing_behind(monkeypatch):
    from rednet.ops import _cpu, _plan, _selfcheck, involution, involution_reference, measure_host_overhead

    before = (_cupy.launch, _cupy.can_run_on, _cpu.can_run_on, dict(_selfcheck._verdicts))
    planned = []
    real = _plan._launch
    monkeypatch.setattr(_plan, "_launch", lambda kind, *a: planned.append(kind) or real(kind, *a))
    x, kernel, s, p = _nhwc(b=1, c=32, g=2, h=9, w=9)
    us = measure_host_overhead(x, kernel, s, p, calls=3, rounds=2)
    assert set(us) == {"fwd_us", "fwd_us_min", "fwd_bwd_us", "fwd_bwd_us_min"} and all(v > 0 for v in us.values())
    assert set(planned) == {"fwd", "bwd_input", "bwd_kernel"}  # the CUDA implementations ran every pass
    assert (_cupy.launch, _cupy.can_run_on, _cpu.can_run_on, _selfcheck._verdicts) == before
    planned.clear()
    xf, kf = x.float(), kernel.float()
    torch.testing.assert_close(involution(xf, kf, s, p), involution_reference(xf, kf, s, p, 1))
    assert planned == []  # the CPU path again


def test_benchmark_host_mode_reports_per_layer_step(tmp_path, capsys):
    from ..helpers import load_tool

    out = tmp_path / "host.json"
    benchmark = load_tool("benchmark")
    assert benchmark.main(["host", "--batch", "1", "--repeats", "2", "--dtypes", "bf16", "--memory-formats", "nhwc",
                           "--baseline", "HEAD", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 8 and sum(r["count"] for r in res["rows"]) == 17  # RedNet-50's involution layers
    (total,) = res["totals"]
    assert total["layers"] == 17 and total["per_layer_step_us"] > 0 and total["baseline_per_layer_step_us"] > 0
    assert total["per_step_ms"] == pytest.approx(total["per_layer_step_us"] * 17 / 1e3)
    assert total["vs_baseline"] > 0 and res["baseline"] == "HEAD"
    assert "per layer-step us" in out.with_suffix(".md").read_text()
    assert "| bf16 | nhwc | 17 |" in capsys.readouterr().out
    assert benchmark.main(["host", "--baseline", "no-such-revision", "--json", str(out)]) == 2
    assert "--baseline no-such-revision: git cannot show" in capsys.readouterr().err


def test_compile_mode_is_a_checked_config_key():
    from rednet.engine import ConfigError

    assert load_config(None, ["train.compile=true", "train.compile_mode=reduce-overhead"]).train.compile_mode == \
        "reduce-overhead"
    with pytest.raises(ConfigError, match="train.compile_mode.*'default' unless train.compile is true"):
        load_config(None, ["train.compile_mode=reduce-overhead"])
    with pytest.raises(ConfigError, match="train.compile_mode"):
        load_config(None, ["train.compile=true", "train.compile_mode=cudagraphs"])


@pytest.mark.parametrize("sets,mode", [
    (["train.compile=true", "train.compile_mode=reduce-overhead"], "reduce-overhead"),
    (["train.compile=true"], None),
    ([], "not compiled"),
])
def test_the_trainer_compiles_with_the_configured_mode(monkeypatch, sets, mode):
    from rednet.engine.distributed import DistInfo
    from rednet.engine.trainer import _wrap_for_training

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    model = torch.nn.Linear(2, 2)
    wrapped, no_sync = _wrap_for_training(model, load_config(None, sets), DistInfo())
    assert wrapped is model and no_sync is None
    assert calls == ([] if mode == "not compiled" else [{"mode": mode}])


def test_the_op_compiles_fullgraph_in_reduce_overhead_mode():
    # On a CPU the capture is skipped (CUDA graphs are for CUDA tensors); what is checked is that the
    # op traces through its fake function into one graph with the mode set, and computes the same.
    from rednet.ops import involution, involution_reference

    x, kernel, s, p = _nhwc(b=2, c=32, g=2, h=9, w=9, k=3, dtype=torch.float32)
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: involution(a * 2, b, s, p) + 1, mode="reduce-overhead", fullgraph=True)
    for _ in range(2):
        torch.testing.assert_close(fn(x, kernel), involution_reference(x * 2, kernel, s, p, 1) + 1)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------
# On a GPU (``pytest -m gpu``; skipped without one).


def _cuda_kernel_or_skip():
    ok, why = _cupy.can_run_on("cuda", None, torch.float32)
    if not ok:
        pytest.skip(why)


class _Block(torch.nn.Module):
    """Conv, BatchNorm, involution: a RedNet block's kinds of layers, small enough to compile fast."""

    def __init__(self):
        super().__init__()
        from rednet.layers import Involution

        self.conv = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(32)
        self.inv = Involution(32, 7, 1)

    def forward(self, x):
        return self.inv(torch.relu(self.bn(self.conv(x)))).mean((2, 3))


@pytest.mark.gpu
def test_gpu_training_steps_in_cuda_graphs_match_eager(monkeypatch):
    _cuda_kernel_or_skip()
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    torch.manual_seed(0)
    eager = _Block().cuda().to(memory_format=torch.channels_last)
    graphed = _Block().cuda().to(memory_format=torch.channels_last)
    graphed.load_state_dict(eager.state_dict())
    compiled = torch.compile(graphed, mode="reduce-overhead")
    launches = []
    real = _cupy.launch
    monkeypatch.setattr(_cupy, "launch", lambda plan, dev: launches.append(plan.name) or real(plan, dev))
    for step in range(4):  # warm-up, record, replays
        x = torch.randn(8, 32, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want, got = eager(x), compiled(x)
        want.float().square().sum().backward()
        got.float().square().sum().backward()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        for a, b in zip(eager.parameters(), graphed.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=5e-2, atol=5e-2)
            a.grad = b.grad = None
    assert any("_nhwc" in n for n in launches)  # the kernels ran, not the reference
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_host_overhead_with_the_launch_left_out():
    from rednet.ops import measure_host_overhead

    _cuda_kernel_or_skip()
    x, kernel, s, p = _nhwc()
    us = measure_host_overhead(x.cuda(), kernel.cuda(), s, p, calls=20, rounds=3)
    assert 0 < us["fwd_us"] < us["fwd_bwd_us"]
