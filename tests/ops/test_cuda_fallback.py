"""The CUDA path's first-contact check and fallback, on CPU through the modules' seams.

The ``seams`` fixture makes CPU tensors take the CUDA path: CuPy "can run", compiling is a
no-op, and the ``rednet::involution`` op's CPU implementations stand in for the kernels
(in float32 for half types, so they are as accurate as the kernels and a check passes unless
a test breaks a stage). Each test then breaks
one stage (compile, launch, the device's report at synchronisation, a result) and checks
that ``auto`` falls back to the reference with one warning naming the cause, and that a
forced ``cupy`` raises with it. The real kernels are checked on a GPU in ``test_ops_gpu.py``.
"""
from __future__ import annotations

import contextlib
import re
import threading
import warnings
from types import SimpleNamespace

import pytest
import torch

import rednet.ops as ops
from rednet.ops import (
    KernelCheckWarning,
    _cpu,
    _cupy,
    _dispatch,
    _selfcheck,
    check_cuda_kernel,
    involution,
    involution_reference,
    use_backend,
)


def _inputs(k=3, stride=1, channels_last=False, dtype=torch.float32, b=2, c=8, g=2, h=9, w=10):
    p = (k - 1) // 2
    ho, wo = ((n + 2 * p - k) // stride + 1 for n in (h, w))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(b, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
    kernel = torch.randn(b, g * k * k, ho, wo, dtype=dtype).contiguous(memory_format=fmt).view(b, g, k, k, ho, wo)
    return x, kernel, stride


@pytest.fixture
def seams(monkeypatch):
    state = SimpleNamespace(prepared=[], checked=[], kernel_calls=0, reference_calls=0)
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    monkeypatch.setattr(_cupy, "can_run_on", lambda *a: (True, "ok"))  # "CuPy imports and sees the device"
    # CPU tensors stand in for CUDA ones here, so auto must not take them to the native CPU kernel.
    monkeypatch.setattr(_cpu, "can_run_on", lambda *a: (False, "not in these tests"))
    monkeypatch.setattr(_cupy, "prepare", lambda device, module: state.prepared.append(module))
    monkeypatch.setattr(_selfcheck, "_verdicts", {})  # a fresh process, as far as the check knows
    monkeypatch.setattr(_selfcheck, "_warned", set())
    state.real_pass = real_pass = _selfcheck._kernel_pass

    def one_pass(name, x, kernel, grad_out, stride, padding, dilation):
        if name == "output":  # one entry per problem checked
            state.checked.append((x.dtype, kernel.shape[2], stride, dilation, x.is_contiguous()))
        if x.dtype in (torch.float16, torch.bfloat16):  # the CPU op computes in the dtype; a kernel accumulates
            up = [t.float() for t in (x, kernel, grad_out)]  # in float32 and rounds once, as the check demands
            return real_pass(name, *up, stride, padding, dilation).to(x.dtype)
        return real_pass(name, x, kernel, grad_out, stride, padding, dilation)

    monkeypatch.setattr(_selfcheck, "_kernel_pass", one_pass)
    state.real_op = real_op = ops._involution_op
    state.real_ref = real_ref = ops.involution_reference

    def op(*a):
        state.kernel_calls += 1
        return real_op(*a)

    def ref(*a):
        state.reference_calls += 1
        return real_ref(*a)

    monkeypatch.setattr(ops, "_involution_op", op)
    monkeypatch.setattr(ops, "involution_reference", ref)
    return state


def test_a_passing_check_runs_once_then_the_kernel_runs(seams):
    x, kernel, s = _inputs(k=7)
    x.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelCheckWarning)
        y = involution(x, kernel, s)
        y2 = involution(x, kernel, s)
    assert seams.kernel_calls == 2 and seams.reference_calls == 0
    assert seams.prepared == [(torch.float32, 7, 1, 1)]
    assert len(seams.checked) == len(_selfcheck.PROBLEMS)  # one check, on every problem; not repeated
    torch.testing.assert_close(y, involution_reference(x, kernel, 1, 3, 1))
    torch.testing.assert_close(y2, y)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.shape == x.shape
    check = check_cuda_kernel("cpu", torch.float32, 7)
    assert check.ok and check.stage == "passed" and check.cause == "" and check.seconds >= 0


def test_the_check_leaves_the_callers_random_state_alone(seams):
    x, kernel, s = _inputs()
    state = torch.get_rng_state()
    involution(x, kernel, s)
    assert len(seams.checked) > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_compile_failure_falls_back_once_with_the_cause_and_forcing_raises(seams, monkeypatch):
    def no_headers(device, module):
        raise RuntimeError("Failed to find CUDA headers")

    monkeypatch.setattr(_cupy, "prepare", no_headers)
    x, kernel, s = _inputs()
    with pytest.warns(KernelCheckWarning) as record:
        y = involution(x, kernel, s)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "compile stage" in msg and "Failed to find CUDA headers" in msg and "cpu float32 K=3" in msg
    assert "python tools/benchmark.py selfcheck" in msg and "issue tracker" in msg
    torch.testing.assert_close(y, involution_reference(x, kernel, 1, 1, 1))
    assert seams.kernel_calls == 0 and seams.reference_calls == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelCheckWarning)
        involution(x, kernel, s)  # the same configuration: no second check, no second warning
        xc, kc, _ = _inputs(channels_last=True)
        involution(xc, kc, s)  # another configuration failing with the same cause: no second warning
    assert seams.checked == [] and seams.kernel_calls == 0
    for force in ({"backend": "cupy"}, {}):
        with use_backend("cupy") if not force else contextlib.nullcontext():
            with pytest.raises(RuntimeError, match=r"compile stage: RuntimeError: Failed to find CUDA headers\..*"
                                                   r"benchmark.py selfcheck"):
                involution(x, kernel, s, **force)
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "cupy")
    with pytest.raises(RuntimeError, match=r"compile stage.*Unset \$REDNET_INVOLUTION_BACKEND"):
        involution(x, kernel, s)
    check = check_cuda_kernel("cpu", torch.float32, 3)
    assert not check.ok and check.stage == "compile" and "Failed to find CUDA headers" in check.cause


def _raise(exc):
    def fn(*a, **k):
        raise exc
    return fn


def _raising(exc):
    return lambda real: _raise(exc)


def _wrong(name, how):
    """A _kernel_pass whose pass ``name`` (output, grad_input, grad_kernel) is broken ``how``, given the real one."""
    def broken(real):
        def one_pass(pass_name, *args):
            out = real(pass_name, *args)
            return _break(out, how) if pass_name == name else out
        return one_pass
    return broken


def _break(out, how):
    t = out.contiguous().clone()
    if how == "nan":
        t.view(-1)[3] = float("nan")
    elif how == "unwritten":
        t.zero_()
    else:  # one element off by 1% of the scale: far beyond float32's tolerance
        t.view(-1)[5] += 0.01 * t.abs().max()
    return t


def _fails_at(name, exc):
    """A _kernel_pass that raises ``exc`` at pass ``name``."""
    def broken(real):
        def one_pass(pass_name, *args):
            if pass_name == name:
                raise exc
            return real(pass_name, *args)
        return one_pass
    return broken


@pytest.mark.parametrize("name,stage,patch,detail", [
    ("launch raises", "launch", ("_kernel_pass", _fails_at("grad_input", RuntimeError("CUDA_ERROR_INVALID_VALUE"))),
     "grad_input kernel involution_bwd_input_nhwc_scalar<float, 7, 2, 1> for x (2, 6, 9, 37): RuntimeError: "
     "CUDA_ERROR_INVALID_VALUE"),
    ("device error at sync", "launch", ("_synchronize", _raising(RuntimeError("CUDA error: launch failure"))),
     "output kernel involution_fwd_nhwc_scalar<float, 7, 2, 1> for x (2, 6, 9, 37): RuntimeError: CUDA error: "
     "launch failure"),
    ("wrong y", "result", ("_kernel_pass", _wrong("output", "off")), "output differs from the reference at 1 of"),
    ("wrong grad_x", "result", ("_kernel_pass", _wrong("grad_input", "off")), "grad_input differs"),
    ("unwritten grad_kernel", "result", ("_kernel_pass", _wrong("grad_kernel", "unwritten")), "grad_kernel differs"),
    ("nan in y", "result", ("_kernel_pass", _wrong("output", "nan")), "output differs from the reference at 1 of"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_every_failing_stage_falls_back_and_forcing_raises(seams, monkeypatch, name, stage, patch, detail):
    monkeypatch.setattr(_selfcheck, patch[0], patch[1](seams.real_pass))
    monkeypatch.setattr(_selfcheck, "_device_usable", lambda device: True)
    x, kernel, s = _inputs(k=7, stride=2, channels_last=True)
    key = "cpu float32 K=7 stride=2 dilation=1 nhwc"
    with pytest.warns(KernelCheckWarning, match=f"{key} at the {stage} stage") as rec:
        y = involution(x, kernel, s)
    assert len(rec) == 1 and detail in str(rec[0].message)
    torch.testing.assert_close(y, involution_reference(x, kernel, 2, 3, 1))
    assert seams.kernel_calls == 0
    with pytest.raises(RuntimeError, match=f"at the {stage} stage.*{re.escape(detail[:20])}"):
        involution(x, kernel, s, backend="cupy")
    check = check_cuda_kernel("cpu", torch.float32, 7, 2, 1, "nhwc")
    assert (check.ok, check.stage) == (False, stage)


def test_a_fault_that_kills_the_device_raises_even_in_auto(seams, monkeypatch):
    monkeypatch.setattr(_selfcheck, "_synchronize", _raise(RuntimeError("CUDA error: an illegal memory access")))
    monkeypatch.setattr(_selfcheck, "_device_usable", lambda device: False)
    x, kernel, s = _inputs()
    for _ in range(2):  # the verdict is kept: the second call says the same without checking again
        with pytest.raises(RuntimeError, match="context stage.*illegal memory access.*"
                                               "REDNET_INVOLUTION_BACKEND=reference"):
            involution(x, kernel, s)
    assert len(seams.checked) == 1  # stopped at the first pass whose synchronisation failed; not run again


def test_verdicts_are_per_configuration(seams, monkeypatch):
    real = _selfcheck._kernel_pass

    def nhwc_k7_broken(name, x, kernel, grad_out, stride, padding, dilation):
        if kernel.shape[2] == 7 and not x.is_contiguous() and x.dtype == torch.float32:
            raise RuntimeError("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES")
        return real(name, x, kernel, grad_out, stride, padding, dilation)

    monkeypatch.setattr(_selfcheck, "_kernel_pass", nhwc_k7_broken)
    with pytest.warns(KernelCheckWarning, match="K=7 stride=1 dilation=1 nhwc at the launch stage"):
        involution(*_inputs(k=7, channels_last=True))
    assert seams.kernel_calls == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelCheckWarning)
        for k, cl in ((7, False), (3, True), (3, False)):
            involution(*_inputs(k=k, channels_last=cl))
    assert seams.kernel_calls == 3
    assert not check_cuda_kernel("cpu", torch.float32, 7, memory_format="nhwc").ok
    assert check_cuda_kernel("cpu", torch.float32, 7, memory_format="nchw").ok
    assert check_cuda_kernel("cpu", torch.float64, 7, memory_format="nhwc").ok  # dtype is part of the key too


def test_during_cuda_graph_capture_an_unchecked_configuration_is_not_checked(seams, monkeypatch):
    monkeypatch.setattr(_selfcheck, "_capturing", lambda device: True)
    x, kernel, s = _inputs()
    with pytest.warns(KernelCheckWarning, match="capture stage.*warm-up.*This call uses the reference"):
        y = involution(x, kernel, s)
    torch.testing.assert_close(y, involution_reference(x, kernel, 1, 1, 1))
    assert seams.checked == [] and seams.prepared == [] and _selfcheck._verdicts == {}
    with pytest.raises(RuntimeError, match="capture stage"):
        involution(x, kernel, s, backend="cupy")
    monkeypatch.setattr(_selfcheck, "_capturing", lambda device: False)  # capture over: the next call checks
    involution(x, kernel, s)
    assert seams.kernel_calls == 1 and len(seams.checked) == len(_selfcheck.PROBLEMS)
    monkeypatch.setattr(_selfcheck, "_capturing", lambda device: True)  # checked before capture: kernel in the graph
    involution(x, kernel, s)
    assert seams.kernel_calls == 2


def test_first_contact_inside_inference_mode_autocast_and_fake_tensors(seams):
    from torch._subclasses.fake_tensor import FakeTensorMode

    # The check needs autograd for the reference's gradients and exact dtypes: inference
    # mode, autocast and fake tensors around the first call must not reach it.
    x, kernel, s = _inputs(dtype=torch.float64)
    with torch.inference_mode():
        involution(x, kernel, s)
    assert check_cuda_kernel("cpu", torch.float64, 3).ok
    with torch.autocast("cpu", dtype=torch.bfloat16):
        involution(*_inputs(k=7))  # float32 inputs, cast to bfloat16 by the front door: a bfloat16 check
    assert check_cuda_kernel("cpu", torch.bfloat16, 7).ok
    assert not any(k.dtype == torch.float32 for k in _selfcheck._verdicts)
    xf, kf, _ = _inputs(k=5, dtype=torch.float64)
    with FakeTensorMode() as mode:
        y = involution(mode.from_tensor(xf), mode.from_tensor(kf), 1)
    assert y.shape == (2, 8, 9, 10)
    assert check_cuda_kernel("cpu", torch.float64, 5).ok  # checked on real tensors despite the fake mode
    assert seams.kernel_calls == 3


def test_concurrent_first_calls_run_one_check(seams):
    x, kernel, s = _inputs()
    barrier = threading.Barrier(4)
    errors = []

    def work():
        try:
            barrier.wait()
            involution(x, kernel, s)
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(seams.checked) == len(_selfcheck.PROBLEMS) and seams.kernel_calls == 4


def _graph_targets(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("fails", [False, True])
def test_under_torch_compile_the_check_runs_while_tracing_and_stays_out_of_the_graph(seams, monkeypatch, fails):
    if fails:
        nvrtc_error = RuntimeError("nvrtc: error: invalid value for --gpu-architecture")
        monkeypatch.setattr(_cupy, "prepare", _raise(nvrtc_error))
    monkeypatch.setattr(ops, "_involution_op", seams.real_op)  # the counting spies are not traceable
    monkeypatch.setattr(ops, "involution_reference", seams.real_ref)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, kernel, s = _inputs(k=7)
    fn = torch.compile(lambda a, b: involution(a, b, 1), fullgraph=True, backend=backend)
    if fails:
        with pytest.warns(KernelCheckWarning, match="invalid value for --gpu-architecture"):
            y = fn(x, kernel)
    else:
        y = fn(x, kernel)
    y2 = fn(x, kernel)
    torch.testing.assert_close((y, y2), (involution_reference(x, kernel, 1, 3, 1),) * 2)
    assert len(graphs) == 1
    targets = _graph_targets(graphs[0])
    assert any(t.startswith("rednet.involution") for t in targets) is not fails
    # Nothing of the check is in the graph: no gradient ops, no random inputs.
    assert not any("backward" in t or "randn" in t for t in targets), targets
    assert len(seams.checked) == (0 if fails else len(_selfcheck.PROBLEMS))


def test_cupy_installed_but_unusable_warns_once_for_cuda_tensors(monkeypatch):
    # A CuPy for another CUDA, or without its NVRTC library: CuPy was asked for and does not work.
    why = "CuPy is not importable (OSError: libnvrtc.so.13: cannot open shared object file)"
    monkeypatch.setattr(_selfcheck, "_warned", set())
    monkeypatch.setattr(_cupy, "installed", lambda: True)
    monkeypatch.setattr(_cupy, "can_run_on", lambda *a: (False, why))
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    with pytest.warns(KernelCheckWarning, match=r"cannot run on cuda:0: CuPy is not importable.*libnvrtc.so.13.*"
                                                r"benchmark.py selfcheck") as record:
        assert _dispatch.choose_backend("cuda", 0, torch.float32, None, None) == "reference"
        assert _dispatch.choose_backend("cuda", 0, torch.bfloat16, None, None) == "reference"
    assert len(record) == 1
    with pytest.raises(RuntimeError, match="'cupy' was forced but cannot run: CuPy is not importable"):
        _dispatch.choose_backend("cuda", 0, torch.float32, "cupy", None)
    monkeypatch.setattr(_selfcheck, "_warned", set())
    monkeypatch.setattr(_cupy, "installed", lambda: False)  # an optional extra never installed: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelCheckWarning)
        assert _dispatch.choose_backend("cuda", 0, torch.float32, None, None) == "reference"


def test_check_cuda_kernel_without_the_seams_says_why_it_cannot_run():
    check = check_cuda_kernel("cpu", torch.float32, 3)
    assert check == (False, "unavailable", "input is on cpu, the CUDA kernel needs a CUDA tensor", 0.0)
    with pytest.raises(ValueError, match="unknown memory format 'nhcw'"):
        check_cuda_kernel("cpu", torch.float32, 3, memory_format="nhcw")


def _families(problems, dtype, k, stride, memory_format) -> set[str]:
    """Kernel families the plans pick for problems (B, C, G, H, W): path, nchw tile, nhwc patches a block,
    partly empty blocks."""
    from rednet.ops import _plan

    out = set()
    fmt = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
    for b, c, g, h, w in problems:
        p = (k - 1) // 2
        ho, wo = ((n + 2 * p - k) // stride + 1 for n in (h, w))
        x = torch.empty(b, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
        kernel = torch.empty(b, g * k * k, ho, wo, dtype=dtype).contiguous(memory_format=fmt).view(b, g, k, k, ho, wo)
        go = torch.empty(b, c, ho, wo, dtype=dtype).contiguous(memory_format=fmt)
        for plan in (_plan.plan_forward(x, kernel, stride, p, 1)[1],
                     _plan.plan_backward_input(go, x, kernel, stride, p, 1)[1],
                     _plan.plan_backward_kernel(go, x, kernel, stride, p, 1)[1]):
            kind, path = re.match(r"involution_(fwd|bwd_input|bwd_kernel)_(\w+)<", plan.name).groups()
            out.add(f"{kind} {path}")
            if path == "nchw":
                tw, th, planes = int(plan.args[10]), int(plan.args[11]), int(plan.args[14])
                out.add(f"{kind} nchw {tw}x{th}")
                if planes % (_plan.THREADS // (tw * th)):
                    out.add("nchw partly empty block")
            elif path == "nhwc":
                gb, tiles = int(plan.args[10]), int(plan.args[12])
                ppb = _plan.NHWC_SLOTS // (gb * dtype.itemsize)
                out.add(f"{kind} nhwc {ppb} patches a block")
                if tiles % ppb:
                    out.add("nhwc partly empty block")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "nhwc"])
def test_the_check_runs_every_kernel_family_rednet_selects(dtype, memory_format):
    """What the first-contact check runs covers what RedNet-50 runs, for every window it uses, plus
    partly empty blocks and (channels_last) groups whose kernel rows are not 32-bit words or fill
    half a block."""
    from rednet.analysis.shapes import involution_shapes

    shapes = involution_shapes("rednet50", 224)
    for k, stride in sorted({(s["K"], s["stride"]) for s in shapes}):
        used = [(1, s["C"], s["G"], s["H"], s["W"]) for s in shapes if (s["K"], s["stride"]) == (k, stride)]
        rednet = _families(used, dtype, k, stride, memory_format)
        checked = _families(_selfcheck.PROBLEMS, dtype, k, stride, memory_format)
        assert rednet <= checked, (k, stride, rednet - checked)
        extra = {"nchw partly empty block"} if memory_format == "nchw" else {"fwd nhwc_scalar"}
        assert extra <= checked, (k, stride, extra - checked)
        if memory_format == "nhwc" and stride == 1:
            assert "nhwc partly empty block" in checked


def test_the_bf16_bound_is_what_fp32_accumulation_guarantees_and_rejects_bf16_accumulation():
    """error_bound accepts a result accumulated in float32 and rounded once, and rejects one
    accumulated in bfloat16, which the previous tolerance, 1.6e-2 x (|ref| + max|ref|), let through."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 9, 9).bfloat16()
    w = torch.randn(2, 2, 7, 7, 9, 9).bfloat16()
    exact = involution_reference(x.double(), w.double(), 1, 3, 1)
    abs_sum = involution_reference(x.double().abs(), w.double().abs(), 1, 3, 1)
    bound = _selfcheck.error_bound(torch.bfloat16, 49, exact, abs_sum)

    def err(t):
        return (t.double() - exact).abs()

    fp32 = involution_reference(x.float(), w.float(), 1, 3, 1).bfloat16()
    assert (err(fp32) <= bound).all()
    # Accumulated in bfloat16: each partial sum over the taps rounded to bfloat16.
    cols = torch.nn.functional.unfold(x.float(), 7, padding=3).view(2, 2, 16, 49, 9, 9)  # (B, G, C/G, K*K, H, W)
    prods = (w.float().view(2, 2, 1, 49, 9, 9) * cols)
    acc = torch.zeros(2, 2, 16, 9, 9).bfloat16()
    for t in range(49):
        acc = (acc.float() + prods[:, :, :, t]).bfloat16()
    bf16_acc = acc.view(2, 32, 9, 9)
    assert not (err(bf16_acc) <= bound).all()
    assert (err(bf16_acc) <= 1.6e-2 * (exact.abs() + exact.abs().max())).all()  # the old tolerance: passed
