"""The native CPU involution (``rednet.ops._cpu``): against the reference, through the custom
op and the front door, in RedNet-26, and its build: disk cache, concurrent builders, and the
fallback when there is no compiler."""
from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

from rednet.ops import (
    _cache_files,
    _cpu,
    _native_build,
    can_use_native_kernel,
    involution,
    involution_output_size,
    involution_reference,
)

from ..helpers import OP_SHAPES, ROOT


@pytest.fixture
def built():
    """Skip where the native kernel cannot be built (no compiler); builds it on first use."""
    ok, why = _cpu.available()
    if not ok:
        pytest.skip(why)


native = pytest.mark.usefixtures("built")

# The operator shapes of tests/ops/test_ops.py (odd sizes, stride 2, dilation 2, K = 1..7, G = 1
# and G = C), and groups of 16 and 32 channels (the vectorised channels_last path).
SHAPES = [
    *OP_SHAPES[:5],
    (2, 32, 2, 13, 11, 3, 1, 1),
    (2, 64, 4, 15, 17, 7, 1, 1),
    (1, 64, 4, 15, 17, 7, 2, 1),
    (2, 32, 1, 12, 9, 7, 2, 2),
    (1, 48, 3, 9, 20, 5, 1, 1),
    (2, 32, 2, 3, 3, 7, 1, 1),
    (1, 16, 1, 21, 23, 7, 3, 1),
    (2, 16, 1, 5, 7, 1, 2, 1),
]
LAYOUTS = ("nchw", "nhwc")


def _inputs(b, c, g, h, w, k, s, d, layout, dtype=torch.float64, pad=None):
    p = d * (k - 1) // 2 if pad is None else pad
    ho, wo = involution_output_size(h, k, s, p, d), involution_output_size(w, k, s, p, d)
    x = torch.randn(b, c, h, w, dtype=dtype)
    kernel = torch.randn(b, g * k * k, ho, wo, dtype=dtype)  # as the span convolution produces it
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
        kernel = kernel.contiguous(memory_format=torch.channels_last)
    return x, kernel.view(b, g, k, k, ho, wo), p


def _reference_passes(x, kernel, go, s, p, d):
    """(y, grad_x, grad_kernel) of the reference, in float64."""
    x64 = x.detach().double().requires_grad_(True)
    k64 = kernel.detach().double().requires_grad_(True)
    y = involution_reference(x64, k64, s, p, d)
    gx, gk = torch.autograd.grad(y, (x64, k64), go.double())
    return y.detach(), gx, gk


def _native_passes(x, kernel, go, s, p, d):
    return (_cpu.forward(x, kernel, s, p, d), _cpu.backward_input(go, x, kernel, s, p, d),
            _cpu.backward_kernel(go, x, kernel, s, p, d))


@native
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_three_passes_match_reference(shape, layout):
    s, d = shape[6], shape[7]
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        x, kernel, p = _inputs(*shape, layout, dtype=dtype)
        go = torch.randn(x.shape[0], x.shape[1], *kernel.shape[-2:], dtype=dtype)
        got = _native_passes(x, kernel, go, s, p, d)
        for out, ref in zip(got, _reference_passes(x, kernel, go, s, p, d)):
            assert out.dtype == dtype
            torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)


@native
@pytest.mark.parametrize("layout", LAYOUTS)
def test_explicit_padding(layout):
    for pad in (0, 4):
        x, kernel, p = _inputs(2, 32, 2, 8, 9, 3, 2, 1, layout, pad=pad)
        go = torch.randn(x.shape[0], x.shape[1], *kernel.shape[-2:], dtype=x.dtype)
        for out, ref in zip(_native_passes(x, kernel, go, 2, p, 1), _reference_passes(x, kernel, go, 2, p, 1)):
            torch.testing.assert_close(out, ref)


@native
def test_non_contiguous_inputs():
    # Each (2, 32, 9, 16), neither contiguous nor channels_last: copied to the nearer layout.
    x = torch.randn(2, 32, 9, 32, dtype=torch.float64)[..., ::2]  # strided width -> NCHW
    xt = torch.randn(2, 9, 32, 16, dtype=torch.float64).permute(0, 2, 1, 3)  # channels in the middle -> NCHW
    xcl = torch.randn(2, 9, 32, 32, dtype=torch.float64).permute(0, 3, 1, 2)[..., ::2]  # channels innermost -> NHWC
    kernel = torch.randn(2, 9, 16, 2, 3, 3, dtype=torch.float64).permute(0, 3, 4, 5, 1, 2)  # (2, 2, 3, 3, 9, 16)
    go = torch.randn(2, 32, 9, 32, dtype=torch.float64)[..., ::2]
    for xi in (x, xt, xcl):
        assert not xi.is_contiguous() and not xi.is_contiguous(memory_format=torch.channels_last)
        for out, ref in zip(_native_passes(xi, kernel, go, 1, 1, 1), _reference_passes(xi, kernel, go, 1, 1, 1)):
            torch.testing.assert_close(out, ref)


@native
def test_bfloat16_accumulates_in_float32():
    x, kernel, p = _inputs(2, 64, 4, 11, 13, 7, 2, 1, "nhwc", dtype=torch.float32)
    go = torch.randn(2, 64, *kernel.shape[-2:])
    xb, kb, gb = x.bfloat16(), kernel.bfloat16(), go.bfloat16()
    refs = _reference_passes(xb.float(), kb.float(), gb.float(), 2, p, 1)  # same inputs, exact sums
    for layout_x, layout_k in ((xb, kb), (xb.contiguous(), kb.contiguous())):
        for out, ref in zip(_native_passes(layout_x, layout_k, gb, 2, p, 1), refs):
            assert out.dtype == torch.bfloat16
            # Only the final rounding to bfloat16 differs: 2^-8 relative, per element.
            torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=1e-4)


# Grad-input's register-blocked windows (dilation 1; K = 3, 5, 7 at stride 1, K = 3, 7 at
# stride 2): widths 21 and 37 give each a block at the left edge, one inside the row and a
# cut-short block at the right edge, in blocks of 8 pixels (float, bfloat16) and 4 (double);
# padding 0 and K shift which output columns feed a block.
FIXED_WINDOWS = [(k, s, w, p) for k, s, w in ((3, 1, 21), (5, 1, 21), (7, 1, 21), (3, 2, 37), (7, 2, 37))
                 for p in sorted({(k - 1) // 2, 0, k})]


@native
@pytest.mark.parametrize("k,s,w,p", FIXED_WINDOWS, ids=str)
def test_grad_input_fixed_windows(k, s, w, p):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2**-8)):
        x, kernel, _ = _inputs(2, 32, 2, k, w, k, s, 1, "nhwc", dtype=dtype, pad=p)
        go = torch.randn(2, 32, *kernel.shape[-2:], dtype=dtype).contiguous(memory_format=torch.channels_last)
        got = _cpu.backward_input(go, x, kernel, s, p, 1)
        ref = _reference_passes(x.double(), kernel.double(), go.double(), s, p, 1)[1]  # exact sums of these inputs
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * 100 if dtype == torch.bfloat16 else tol)
        # NCHW runs the same blocks on transposed tiles: the same sums in the same order.
        nchw = _cpu.backward_input(go.contiguous(), x.contiguous(), kernel.contiguous(), s, p, 1)
        assert torch.equal(nchw, got)


@native
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_and_gradgradcheck_through_front_door(layout):
    # A tiny shape checked in full, and a 16-channel group (the vectorised path) by random projections.
    for shape, fast in (((1, 4, 2, 5, 6, 3, 2, 1), False), ((1, 16, 1, 4, 5, 3, 1, 1), True)):
        x, kernel, p = _inputs(*shape, layout)
        x.requires_grad_(True)
        kernel = kernel.detach().requires_grad_(True)
        s, d = shape[6], shape[7]

        def fn(a, b):
            return involution(a, b, s, p, d, backend="native")

        assert torch.autograd.gradcheck(fn, (x, kernel), fast_mode=fast)
        assert torch.autograd.gradgradcheck(fn, (x, kernel), fast_mode=fast)


@native
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    from rednet.ops import _custom_op  # noqa: F401

    # The small shape takes the scalar loops, the 32-channel one the vectorised channels_last path.
    shape = (2, 4, 2, 5, 7, 3, 2, 1) if layout == "nchw" else (2, 32, 2, 6, 5, 3, 1, 1)
    x, kernel, p = _inputs(*shape, layout)
    s = shape[6]
    go = torch.randn(x.shape[0], x.shape[1], *kernel.shape[-2:], dtype=x.dtype)
    ops = torch.ops.rednet
    torch.library.opcheck(ops.involution.default, (x.requires_grad_(), kernel.requires_grad_(), s, p, 1))
    torch.library.opcheck(ops.involution_backward_input.default, (go, x.detach(), kernel.detach(), s, p, 1))
    torch.library.opcheck(ops.involution_backward_kernel.default, (go, x.detach(), kernel.detach(), s, p, 1))


@native
def test_front_door_picks_native_on_cpu(monkeypatch):
    x, kernel, _ = _inputs(1, 16, 1, 6, 6, 3, 1, 1, "nhwc", dtype=torch.float32)
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    assert can_use_native_kernel(x) == (True, "ok")
    calls = []
    real = _cpu.forward
    monkeypatch.setattr(_cpu, "forward", lambda *a: calls.append(1) or real(*a))
    involution(x, kernel)
    assert calls == [1]
    ok, why = can_use_native_kernel(x.half())
    assert not ok and "float16" in why
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "native")
    with pytest.raises(RuntimeError, match="'native' was forced but cannot run: .*float16"):
        involution(x.half(), kernel.half())


@native
def test_one_openmp_runtime_pytorchs():
    # In a fresh interpreter: other packages of a test session (scikit-learn bundles its own
    # libgomp) may map a runtime of their own; the native kernel must not add one.
    code = (
        "import os, torch\n"
        "from rednet.ops import _cpu, involution\n"
        "x, k = torch.randn(1, 16, 9, 9), torch.randn(1, 1, 3, 3, 9, 9)\n"
        "involution(x, k, backend='native')\n"
        "print('\\n'.join(os.path.realpath(p) for p in _cpu.openmp_runtimes()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    runtimes = out.stdout.split()
    assert len(runtimes) == 1, runtimes
    if "OpenMP" in torch.__config__.parallel_info():
        torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
        assert os.path.dirname(runtimes[0]) == torch_lib


@native
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_rednet26_forward_backward_matches_reference(monkeypatch, channels_last):
    from rednet.models import create_model

    torch.manual_seed(0)
    model = create_model("rednet26")
    for m in model.modules():  # non-zero last BN so every involution gets a gradient
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    img = torch.randn(2, 3, 64, 64)
    target = torch.tensor([3, 7])
    if channels_last:
        model, img = model.to(memory_format=torch.channels_last), img.contiguous(memory_format=torch.channels_last)
    model.train()
    results = []
    for backend in ("native", "reference"):
        monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", backend)
        model.zero_grad()
        out = model(img)
        torch.nn.functional.cross_entropy(out, target).backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (o0, g0), (o1, g1) = results
    torch.testing.assert_close(o0, o1, rtol=1e-4, atol=1e-4)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------
# The build: fallback, disk cache, concurrent builders.


@pytest.fixture
def fresh_build_state():
    """Forget the loaded library (or failure) before and after: the next use loads it again."""
    _cpu._reset()
    yield
    _cpu._reset()


@pytest.mark.parametrize("cxx,why", [("/nonexistent/c++", "not found"), ("false", "failed")])
def test_without_a_working_compiler_falls_back_to_reference(fresh_build_state, monkeypatch, caplog, tmp_path, cxx,
                                                            why):
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("REDNET_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    x, kernel, _ = _inputs(1, 16, 1, 6, 6, 3, 1, 1, "nhwc", dtype=torch.float32)
    with caplog.at_level(logging.DEBUG, logger="rednet.ops"):
        y = involution(x, kernel)  # no exception: the reference runs
        involution(x, kernel)
    torch.testing.assert_close(y, involution_reference(x, kernel, 1, 1, 1))
    ok, reason = can_use_native_kernel(x)
    assert not ok and why in reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and why in warnings[0].getMessage()  # once per process, not per call
    assert "native CPU kernel declined" in caplog.text
    # The custom op's CPU implementation falls back to unfold.
    from rednet.ops import _custom_op  # noqa: F401

    torch.testing.assert_close(torch.ops.rednet.involution(x, kernel, 1, 1, 1), y)
    assert list(tmp_path.glob("*.so")) == []


def _in_child(target, *args) -> int:
    """Run ``target(*args)`` in a forked process (torch is already imported: no start-up cost); its exit code."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    proc.join(timeout=300)
    return proc.exitcode


def _load_without_compiling(cache: str) -> None:
    os.environ["REDNET_CACHE_DIR"] = cache
    _cpu._reset()

    def no_build(*a):
        raise AssertionError("compiled again")

    _native_build._build = no_build
    os._exit(0 if _cpu.available() == (True, "ok") else 1)


@native
def test_second_process_loads_the_cached_library_without_compiling():
    assert _in_child(_load_without_compiling, str(_cache_files.cache_root())) == 0


def test_cache_key_follows_the_source_and_compiler(monkeypatch, tmp_path):
    if not _cpu.available()[0]:
        pytest.skip(_cpu.available()[1])
    monkeypatch.setenv("REDNET_CACHE_DIR", str(tmp_path))
    lib = _cpu.library()
    cxx = _native_build.compiler()
    path = _native_build.library_path(lib, cxx)
    assert path.parent == tmp_path and path == _native_build.library_path(lib, cxx)
    assert _native_build.library_path(lib._replace(source=lib.source + b"\n// changed\n"), cxx) != path
    monkeypatch.setattr(_native_build, "describe_compiler", lambda cxx: "another compiler or CPU")
    assert _native_build.library_path(lib, cxx) != path


def _build_into(cache: str) -> None:
    os.environ["REDNET_CACHE_DIR"] = cache
    _cpu._reset()
    os._exit(0 if _cpu.available() == (True, "ok") else 1)


@native
def test_concurrent_builders_share_one_library(tmp_path):
    # Like DDP ranks on one machine: all start building at once; one compiles, the others wait and load.
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_into, args=(str(tmp_path),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    files = sorted(f.name for f in tmp_path.iterdir())
    assert len([f for f in files if f.endswith(".so")]) == 1, files
    assert not [f for f in files if f.startswith(".")], files  # no temporary files left behind
