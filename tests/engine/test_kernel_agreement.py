"""The CUDA kernels' check for a model, agreed by every rank before the first step (issue 18, section 4).

On CPU: ``rednet.ops``' seams make CPU tensors take the CUDA path (CuPy "can run", compiling
is a no-op, the op's CPU implementation stands in for the kernels) and each test decides what
the check answers (``_selfcheck._stages``), per rank. The jobs are two gloo processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import rednet
import rednet.ops as ops
from rednet.engine import load_config
from rednet.engine.distributed import DistInfo
from rednet.engine.kernelcheck import KernelConfig, check_kernels, involution_configs
from rednet.ops import KernelCheckWarning, _cpu, _cupy, _selfcheck, check_cuda_kernel, decline_cuda_kernel

from ..helpers import ROOT

BF16, F32 = torch.bfloat16, torch.float32
CPU = torch.device("cpu")


def _cfg(*extra: str):
    return load_config(None, ["model.name=rednet26", "model.num_classes=4", "data.img_size=32", "train.device=cpu",
                              "train.channels_last=true", *extra])


def _model():
    torch.manual_seed(0)
    return rednet.create_model("rednet26", num_classes=4).to(memory_format=torch.channels_last)


def _stand_in(stages) -> None:
    """CPU tensors take the CUDA path; ``stages(key) -> (stage, cause)`` is what each check finds."""
    _cupy.can_run_on = lambda *a: (True, "ok")
    _cpu.can_run_on = lambda *a: (False, "CPU tensors stand in for CUDA ones here")
    _cupy.prepare = lambda device, module: None
    _selfcheck._stages = stages


def _passes(key):
    return "result", ""


@pytest.fixture
def seams(monkeypatch):
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    for module, name in ((_cupy, "can_run_on"), (_cpu, "can_run_on"), (_cupy, "prepare"), (_selfcheck, "_stages")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.setattr(_selfcheck, "_verdicts", {})
    monkeypatch.setattr(_selfcheck, "_warned", set())
    _stand_in(_passes)


def test_the_configurations_are_those_the_layers_run_with():
    model = _model().train()
    rng = torch.get_rng_state()
    nhwc = [KernelConfig(BF16, k, s, 1, "nhwc") for k, s in ((3, 1), (7, 1), (7, 2))]
    assert involution_configs(model, CPU, 32, 3, BF16, True) == nhwc  # maps of 16x16 (stem) down to 2x2
    # 16 px: stage 3 runs on 1x1 maps, and stage 4's strided block reads one. A 1x1 map is
    # contiguous in both formats, so the operator (memory_format_of) takes it as NCHW.
    assert involution_configs(model, CPU, 16, 3, BF16, True) == nhwc + [KernelConfig(BF16, 7, 1, 1, "nchw"),
                                                                         KernelConfig(BF16, 7, 2, 1, "nchw")]
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    nchw_model = model.to(memory_format=torch.contiguous_format)  # what a run with channels_last false trains
    assert involution_configs(nchw_model, CPU, 64, 3, None, False) == [KernelConfig(F32, k, s, 1, "nchw")
                                                                       for k, s in ((3, 1), (7, 1), (7, 2))]


def test_without_a_cuda_kernel_in_play_nothing_is_checked(monkeypatch):
    monkeypatch.setattr(_selfcheck, "_verdicts", {})
    assert check_kernels(_model(), _cfg(), DistInfo()) is None  # a CPU run
    with torch.device("meta"):
        resnet = rednet.create_model("resnet18")
    assert check_kernels(resnet, _cfg("model.name=resnet18"), DistInfo(device=torch.device("cuda", 0))) is None
    assert _selfcheck._verdicts == {}


def test_one_process_checks_up_front_and_a_failure_falls_back_with_one_warning(seams):
    def k3_fails(key):
        return ("compile", "nvrtc: error (stand-in)") if key.kernel_size == 3 else ("result", "")

    _stand_in(k3_fails)
    result = check_kernels(_model(), _cfg(), DistInfo())
    assert [(str(c), ok) for c, ok in result] == [("float32 K=3 stride=1 dilation=1 nhwc", False),
                                                  ("float32 K=7 stride=1 dilation=1 nhwc", True),
                                                  ("float32 K=7 stride=2 dilation=1 nhwc", True)]
    assert len(_selfcheck._verdicts) == 3  # checked before any step
    with pytest.warns(KernelCheckWarning, match="compile stage") as record:
        _model().train()(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
    assert len(record) == 1


def test_a_configuration_declined_for_a_peer_uses_the_reference_and_warns_once(seams):
    x = torch.randn(2, 32, 9, 9).contiguous(memory_format=torch.channels_last)
    kernel = torch.randn(2, 2 * 9, 9, 9).contiguous(memory_format=torch.channels_last).view(2, 2, 3, 3, 9, 9)
    assert check_cuda_kernel(CPU, F32, 3, memory_format="nhwc").ok
    check = decline_cuda_kernel(CPU, F32, 3, memory_format="nhwc", cause="rank 1 of 2 failed (stand-in)")
    assert (check.ok, check.stage) == (False, "peer")
    calls = []
    real = ops.involution_reference
    ops.involution_reference = lambda *a: calls.append(1) or real(*a)
    try:
        with pytest.warns(KernelCheckWarning, match=r"not used for cpu float32 K=3 .* nhwc \(peer stage\): rank 1 of 2 "
                                                    r"failed \(stand-in\)\. The reference is used") as record:
            ops.involution(x, kernel, 1)
            ops.involution(x, kernel, 1)
    finally:
        ops.involution_reference = real
    assert len(record) == 1 and len(calls) == 2
    with pytest.raises(RuntimeError, match="peer stage"):
        ops.involution(x, kernel, 1, backend="cupy")
    # This process's own failure is kept, not replaced by the peer's.
    _stand_in(lambda key: ("launch", "CUDA_ERROR_LAUNCH_FAILED (stand-in)"))
    assert check_cuda_kernel(CPU, F32, 7).stage == "launch"
    assert decline_cuda_kernel(CPU, F32, 7, cause="elsewhere").stage == "launch"


def test_the_trainer_checks_before_the_first_step(seams, tmp_path, caplog):
    import logging

    from rednet.engine.trainer import fit

    cfg = _cfg("data.dataset=synthetic", "data.img_size=16", "data.batch_size=4", "data.workers=0",
               "data.synthetic_train_size=4", "data.synthetic_val_size=4", "train.epochs=1", f"train.output={tmp_path}")
    with caplog.at_level(logging.INFO, logger="rednet"):
        fit(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "rednet"]
    check = next(i for i, m in enumerate(lines) if m.startswith("CUDA kernel check: "))
    assert lines[check].startswith("CUDA kernel check: 5 of 5 configurations run the CUDA kernel (1 process, ")
    assert check < next(i for i, m in enumerate(lines) if m.startswith("execution: "))
    assert len(_selfcheck._verdicts) == 5


# ----------------------------------------------------------------------------------------
# Two gloo processes.


def _worker() -> None:
    """One rank of a two-process job (run by _job): stand-ins, check_kernels, then a training step."""
    import torch.distributed as dist

    rank, scenario = int(os.environ["RANK"]), os.environ["SCENARIO"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.environ['INIT_FILE']}", rank=rank, world_size=2)

    def stages(key):
        if rank == 1 and key.kernel_size == 7 and key.stride == 2:
            if scenario == "fails":
                return "launch", "CUDA_ERROR_LAUNCH_FAILED (stand-in)"
            if scenario == "dead":
                return "context", "CUDA error: an illegal memory access was encountered (stand-in)"
            if scenario == "hangs":
                time.sleep(120)
        return "result", ""

    _stand_in(stages)
    report = {"rank": rank, "error": None, "warnings": [], "kernel": [], "reference": []}
    real_op, real_ref = ops._involution_op, ops.involution_reference
    ops._involution_op = lambda x, k, s, *a: report["kernel"].append([k.shape[2], s]) or real_op(x, k, s, *a)
    ops.involution_reference = lambda x, k, s, *a: report["reference"].append([k.shape[2], s]) or real_ref(x, k, s, *a)
    model = _model()
    start = time.perf_counter()
    try:
        result = check_kernels(model, _cfg(), DistInfo(rank, 2, rank, CPU))
        report["result"] = [[str(c), ok] for c, ok in result]
        report["kernel"].clear()
        report["reference"].clear()  # the calls of the check's own forward pass (on the reference)
    except RuntimeError as e:
        report["error"] = str(e)
    report["seconds"] = time.perf_counter() - start
    if report["error"] is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
        report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, KernelCheckWarning)]
    Path(os.environ["REPORT"].format(rank=rank)).write_text(json.dumps(report))
    dist.destroy_process_group()


def _job(tmp_path, scenario: str, **env) -> tuple[list[subprocess.Popen], str]:
    base = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "SCENARIO": scenario,
            "INIT_FILE": str(tmp_path / "init"), "REPORT": str(tmp_path / "rank{rank}.json"), **env}
    base.pop("REDNET_INVOLUTION_BACKEND", None)
    worker = "from tests.engine.test_kernel_agreement import _worker; _worker()"
    procs = [subprocess.Popen([sys.executable, "-c", worker],
                              cwd=ROOT, env={**base, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    return procs, str(tmp_path / "rank{rank}.json")


def _finish(procs, timeout=240) -> list[str]:
    return [p.communicate(timeout=timeout)[0] for p in procs]


def _reports(pattern) -> list[dict]:
    return [json.loads(Path(pattern.format(rank=r)).read_text()) for r in range(2)]


def test_a_check_failing_on_one_rank_sends_every_rank_to_the_reference(tmp_path):
    procs, pattern = _job(tmp_path, "fails")
    outputs = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outputs
    r0, r1 = _reports(pattern)
    assert r0["result"] == r1["result"] == [["float32 K=3 stride=1 dilation=1 nhwc", True],
                                            ["float32 K=7 stride=1 dilation=1 nhwc", True],
                                            ["float32 K=7 stride=2 dilation=1 nhwc", False]]
    for r in (r0, r1):
        assert [7, 2] in r["reference"] and [7, 2] not in r["kernel"]  # both ranks: the reference for it
        assert [3, 1] in r["kernel"] and [7, 1] in r["kernel"] and [3, 1] not in r["reference"]
        assert len(r["warnings"]) == 1, r["warnings"]
    assert "(peer stage): rank 1 of 2 failed its first-contact check at the launch stage" in r0["warnings"][0]
    assert "CUDA_ERROR_LAUNCH_FAILED (stand-in)" in r0["warnings"][0]
    assert "K=7 stride=2 dilation=1 nhwc at the launch stage: CUDA_ERROR_LAUNCH_FAILED" in r1["warnings"][0]


def test_a_dead_device_on_one_rank_stops_every_rank_at_once(tmp_path):
    procs, pattern = _job(tmp_path, "dead", REDNET_KERNEL_CHECK_TIMEOUT="600")  # not the timeout: the verdict
    outputs = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outputs
    for r in _reports(pattern):
        assert "left the device of rank 1 unusable (CUDA error: an illegal memory access" in r["error"]
        assert "REDNET_INVOLUTION_BACKEND=reference" in r["error"]
        assert r["seconds"] < 60 and r["warnings"] == []  # no step was taken


def test_a_rank_that_hangs_in_its_check_is_waited_for_only_the_timeout(tmp_path):
    procs, pattern = _job(tmp_path, "hangs", REDNET_KERNEL_CHECK_TIMEOUT="3")
    try:
        out0 = procs[0].communicate(timeout=180)[0]
    finally:
        procs[1].kill()  # torchrun would stop it once rank 0 exits
        procs[1].communicate()
    assert procs[0].returncode == 0, out0
    r0 = json.loads(Path(pattern.format(rank=0)).read_text())
    assert "did not answer within 3 s" in r0["error"] and "REDNET_KERNEL_CHECK_TIMEOUT" in r0["error"]
    assert r0["seconds"] < 40


@pytest.mark.gpu
def test_gpu_rednet_configurations_pass_up_front(monkeypatch):
    ok, why = _cupy.can_run_on("cuda", None, torch.float32)
    if not ok:
        pytest.skip(why)
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    device = torch.device("cuda", torch.cuda.current_device())
    model = _model().to(device)
    cfg = _cfg("train.device=cuda", "train.amp=bf16", "data.img_size=224")
    result = check_kernels(model, cfg, DistInfo(device=device))
    assert [(str(c), ok) for c, ok in result] == [(f"bfloat16 K={k} stride={s} dilation=1 nhwc", True)
                                                  for k, s in ((3, 1), (7, 1), (7, 2))]
