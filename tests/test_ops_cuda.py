"""The CUDA involution kernels: compiled in CI without a GPU, executed on GPU runners.

Without a GPU (CI):
- every kernel instantiation RedNet uses (all dtypes, both layouts, three passes), plus
  generic window shapes, is compiled by nvcc and by NVRTC from the source CuPy compiles;
- the kernels' index arithmetic runs on the host: ``involution.cu`` is compiled by g++ with
  a thin emulation of blocks, threads, shared memory and ``__syncthreads`` (one OS thread
  per CUDA thread), launched with the plans ``_cupy`` computes, and compared to the reference;
- the custom op's schema, fake functions, autograd and torch.compile tracing are checked
  through its CPU implementation.

With a GPU (``gpu`` marker): the real kernels against the reference.
"""
from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from rednet.ops import _cupy, can_use_cuda_kernel, involution, involution_reference, select_backend

REDNET_WINDOWS = [(3, 1, 1), (7, 1, 1), (7, 2, 1)]  # (K, stride, dilation): stem and blocks
GENERIC_WINDOWS = [(1, 2, 1), (5, 2, 2), (11, 2, 3), (15, 1, 3)]  # last two: windows too big for smem tiles
ALL_DTYPES = list(_cupy.TYPE_NAMES)


def _instantiation_names(dtypes, windows) -> list[str]:
    return [n for dt in dtypes for w in windows for n in _cupy.name_expressions(dt, *w)]


# ----------------------------------------------------------------------------------------
# Compilation without a GPU.


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_nvcc_compiles_every_instantiation(tmp_path):
    names = _instantiation_names(ALL_DTYPES, REDNET_WINDOWS) + _instantiation_names([torch.float32], GENERIC_WINDOWS)
    # Taking each kernel's address instantiates it, as NVRTC's name expressions do at run time.
    src = _cupy.source() + '\nextern "C" void* const rednet_instantiations[] = {\n' + ",\n".join(f"  (void*)&{n}" for n in names) + "\n};\n"
    cu = tmp_path / "involution_all.cu"
    cu.write_text(src)
    cmd = ["nvcc", "-c", "-std=c++17", "-Werror", "all-warnings", "-gencode", "arch=compute_80,code=sm_80",
           str(cu), "-o", str(tmp_path / "involution_all.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # CuPy or its NVRTC library missing
        pytest.skip(f"NVRTC not available: {e}")
    return nvrtc


def test_nvrtc_compiles_every_instantiation():
    """The run-time path: NVRTC, the shipped source and options, name expressions; no device needed."""
    nvrtc = _nvrtc()
    # Every dtype once and RedNet's K=7 stride-2 window; nvcc above compiles the whole set.
    names = _instantiation_names(ALL_DTYPES, [(3, 1, 1)]) + _instantiation_names([torch.float32], [(7, 2, 1)])
    prog = nvrtc.createProgram(_cupy.source(), "involution.cu", [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, ["-arch=sm_90", *_cupy.NVRTC_OPTIONS])
        except Exception as e:
            pytest.fail(f"{e}\n{nvrtc.getProgramLog(prog)[-4000:]}")
        assert all(nvrtc.getLoweredName(prog, n) for n in names)
        assert len(nvrtc.getCUBIN(prog)) > 0
    finally:
        nvrtc.destroyProgram(prog)


# ----------------------------------------------------------------------------------------
# Host emulation of the kernels.

_SHIM = r"""
#include <barrier>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static  /* one block runs at a time, so a static is its shared memory */
struct emu_dim3 { unsigned x, y, z; };
static thread_local emu_dim3 threadIdx, blockIdx;
static emu_dim3 gridDim;
static std::barrier<>* emu_bar;
inline void __syncthreads() { emu_bar->arrive_and_wait(); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
#define REDNET_HOST_EMULATION
#include "SOURCE"
static void emu_launch(unsigned grid, const std::function<void()>& body) {
  gridDim = {grid, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> bar(THREADS);
    emu_bar = &bar;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < THREADS; ++t)
      ts.emplace_back([&, t] { threadIdx = {t, 0, 0}; blockIdx = {b, 0, 0}; body(); });
    for (auto& th : ts) th.join();
  }
}
"""
_EMU_TYPES = {torch.float64: "double", torch.float32: "float", torch.bfloat16: "bf16_t"}
_EMU_CASES = [  # (dtype, K, S, D): every path of the kernels, tiled and not
    (torch.float64, 3, 1, 1), (torch.float64, 3, 2, 1), (torch.float64, 5, 1, 2), (torch.float64, 7, 2, 1),
    (torch.float64, 1, 2, 1), (torch.float64, 11, 2, 3), (torch.float64, 15, 1, 3),
    (torch.float32, 7, 1, 1), (torch.bfloat16, 3, 2, 1),
]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    names = [n for dt, k, s, d in _EMU_CASES for n in _cupy.name_expressions(dt, k, s, d)]
    lines = [_SHIM.replace("SOURCE", str(_cupy.SOURCE_PATH))]
    for i, n in enumerate(names):
        t = _EMU_TYPES[next(dt for dt, name in _cupy.TYPE_NAMES.items() if name == n.split("<")[1].split(",")[0])]
        tail = "int tw, int nt" if "_nchw<" in n else "long long n"
        call = "tw, nt" if "_nchw<" in n else "n"
        lines.append(
            f'extern "C" void emu_{i}(unsigned grid, const void* a, const void* b, void* o, int C, int H, int W, int G, '
            f"int Ho, int Wo, int pad, {tail}) {{ emu_launch(grid, [=] {{ {n}((const {t}*)a, (const {t}*)b, ({t}*)o, "
            f"C, H, W, G, Ho, Wo, pad, {call}); }}); }}"
        )
    d = tmp_path_factory.mktemp("emu")
    (d / "emu.cpp").write_text("\n".join(lines))
    res = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", str(d / "emu.cpp"),
                          "-o", str(d / "emu.so")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    lib = ctypes.CDLL(str(d / "emu.so"))
    return {n: getattr(lib, f"emu_{i}") for i, n in enumerate(names)}


def _emulate(emulator, plan: _cupy.Launch | None) -> None:
    if plan is None:
        return
    grid = plan.grid if "_nchw<" in plan.name else min(plan.grid, 3)  # few blocks: exercise grid-stride loops
    conv = {np.uint64: ctypes.c_void_p, np.int32: ctypes.c_int, np.int64: ctypes.c_longlong}
    args = [conv[type(a)](int(a)) for a in plan.args]
    emulator[plan.name](ctypes.c_uint(grid), *args)


def _emulated_involution(emulator, x, kernel, stride, padding, dilation, grad_out):
    y, plan = _cupy.plan_forward(x, kernel, stride, padding, dilation)
    _emulate(emulator, plan)
    gx, plan = _cupy.plan_backward_input(grad_out, x, kernel, stride, padding, dilation)
    _emulate(emulator, plan)
    gw, plan = _cupy.plan_backward_kernel(grad_out, x, kernel, stride, padding, dilation)
    _emulate(emulator, plan)
    return y, gx, gw


def _reference_with_grads(x, kernel, stride, padding, dilation, grad_out):
    xr = x.detach().double().requires_grad_()
    kr = kernel.detach().double().requires_grad_()
    y = involution_reference(xr, kr, stride, padding, dilation)
    gx, gw = torch.autograd.grad(y, (xr, kr), grad_out.double())
    return y, gx, gw


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype,k,s,d", _EMU_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernels_host_emulation(emulator, layout, dtype, k, s, d):
    # Odd sizes larger than a 32x8 tile, C/G = 3 channels per group, "same" padding.
    b, c, g, h, w = 2, 6, 2, 11 if k < 11 else 9, 37
    pad = d * (k - 1) // 2
    if (k, s, d) == (5, 1, 2):
        pad = 1  # a padding smaller than "same": output smaller than the input
    ho, wo = ((n + 2 * pad - d * (k - 1) - 1) // s + 1 for n in (h, w))
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(b, c, h, w).to(dtype).contiguous(memory_format=fmt)
    gen = torch.randn(b, g * k * k, ho, wo).to(dtype).contiguous(memory_format=fmt)  # as the span conv makes it
    kernel = gen.view(b, g, k, k, ho, wo)
    grad_out = torch.randn(b, c, ho, wo).to(dtype).contiguous(memory_format=fmt)
    assert _cupy.layout_of(x) == layout

    y, gx, gw = _emulated_involution(emulator, x, kernel, s, pad, d, grad_out)
    ry, rgx, rgw = _reference_with_grads(x, kernel, s, pad, d, grad_out)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for got, ref in ((y, ry), (gx, rgx), (gw, rgw)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)


# ----------------------------------------------------------------------------------------
# The custom op through its CPU implementation, and the dispatch.


def _op_inputs(layout: str, dtype=torch.float64):
    x = torch.randn(2, 4, 5, 7, dtype=dtype)
    k = torch.randn(2, 2, 3, 3, 3, 4, dtype=dtype)  # stride 2, padding 1
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
        k = torch.randn(2, 18, 3, 4, dtype=dtype).contiguous(memory_format=torch.channels_last).view(2, 2, 3, 3, 3, 4)
    return x.requires_grad_(), k.requires_grad_()


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_custom_op_opcheck_cpu(layout):
    from rednet.ops import _custom_op  # noqa: F401

    x, k = _op_inputs(layout)
    torch.library.opcheck(torch.ops.rednet.involution.default, (x, k, 2, 1, 1))
    go = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.rednet.involution_backward_input.default, (go, x.detach(), k.detach(), 2, 1, 1))
    torch.library.opcheck(torch.ops.rednet.involution_backward_kernel.default, (go, x.detach(), k.detach(), 2, 1, 1))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_custom_op_grads_and_fake_strides_cpu(layout):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rednet.ops import _custom_op  # noqa: F401

    x, k = _op_inputs(layout)
    y = torch.ops.rednet.involution(x, k, 2, 1, 1)
    torch.testing.assert_close(y, involution_reference(x, k, 2, 1, 1))
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.rednet.involution(a, b, 2, 1, 1), (x, k), fast_mode=True)
    mode = FakeTensorMode()
    fx, fk = mode.from_tensor(x.detach()), mode.from_tensor(k.detach())
    with mode:
        fy = torch.ops.rednet.involution(fx, fk, 2, 1, 1)
        fgw = torch.ops.rednet.involution_backward_kernel(fy, fx, fk, 2, 1, 1)
    assert fy.shape == y.shape and fy.stride() == y.stride()
    gw = torch.ops.rednet.involution_backward_kernel(y.detach(), x.detach(), k.detach(), 2, 1, 1)
    assert fgw.shape == k.shape and fgw.stride() == gw.stride()


def test_custom_op_compiles_fullgraph_cpu():
    from rednet.ops import _custom_op  # noqa: F401

    x, k = _op_inputs("nchw")

    def loss(a, b):
        return torch.ops.rednet.involution(a, b, 2, 1, 1).square().sum()

    out = torch.compile(loss, fullgraph=True, backend="aot_eager")(x, k)
    gx, gk = torch.autograd.grad(out, (x, k))
    ref = loss(x, k)
    rgx, rgk = torch.autograd.grad(ref, (x, k))
    torch.testing.assert_close((out, gx, gk), (ref, rgx, rgk))


def test_dispatch_reasons_and_forcing(monkeypatch, caplog):
    x, k = torch.randn(1, 16, 8, 8), torch.randn(1, 1, 3, 3, 8, 8)
    ok, why = can_use_cuda_kernel(x)
    assert not ok and "CUDA tensor" in why
    ok, why = _cupy.can_run_on("cuda", 0, torch.int32)
    assert not ok and "int32" in why
    if not torch.cuda.is_available():
        ok, why = _cupy.can_run_on("cuda", 0, torch.float32)
        assert not ok and why
    with caplog.at_level(logging.DEBUG, logger="rednet.ops"):  # CPU tensors go to the native kernel: no float16
        assert select_backend(x.half()) == "reference"
    assert "declined" in caplog.text and "float16" in caplog.text
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "cupy")
    with pytest.raises(RuntimeError, match="forced but cannot run"):
        involution(x, k)
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "reference")
    assert select_backend(x) == "reference"


def test_front_door_autocast_casts_to_autocast_dtype():
    x, k = torch.randn(1, 16, 8, 8), torch.randn(1, 1, 3, 3, 8, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = involution(x, k)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), involution_reference(x.bfloat16(), k, 1, 1, 1).float())


def test_front_door_on_meta_tensors():
    y = involution(torch.empty(1, 16, 8, 8, device="meta"), torch.empty(1, 1, 3, 3, 4, 4, device="meta"), stride=2)
    assert y.shape == (1, 16, 4, 4) and y.device.type == "meta"


def test_importing_the_cuda_backend_needs_no_cupy():
    import importlib
    import sys

    code = "import sys, rednet, rednet.ops._cupy, rednet.ops._custom_op; assert 'cupy' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    assert importlib.util.find_spec("rednet.ops._cupy") is not None


# ----------------------------------------------------------------------------------------
# GPU: the real kernels.

cuda = pytest.mark.gpu


def _cuda_ok():
    ok, why = _cupy.can_run_on("cuda", None, torch.float32)
    if not ok:
        pytest.skip(why)


def _rand_case(b, c, g, h, w, k, s, d, pad=None, dtype=torch.float64, layout="nchw", device="cuda"):
    pad = d * (k - 1) // 2 if pad is None else pad
    ho, wo = ((n + 2 * pad - d * (k - 1) - 1) // s + 1 for n in (h, w))
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(b, c, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
    kernel = torch.randn(b, g * k * k, ho, wo, device=device, dtype=dtype).contiguous(memory_format=fmt)
    return x, kernel.view(b, g, k, k, ho, wo), pad


GPU_SHAPES = [  # (B, C, G, H, W, K, S, D, pad)
    (1, 16, 1, 7, 9, 3, 1, 1, None),
    (2, 32, 2, 57, 31, 7, 1, 1, None),
    (3, 48, 3, 29, 45, 7, 2, 1, None),
    (2, 64, 4, 33, 17, 5, 1, 2, None),
    (1, 24, 8, 19, 23, 3, 2, 2, 0),
    (2, 12, 4, 13, 11, 11, 2, 3, None),   # no smem tile (forward, grad_kernel)
    (1, 8, 2, 9, 40, 15, 1, 3, None),     # no smem tile (grad_input)
    (64, 32, 2, 14, 14, 7, 1, 1, None),   # large batch
    (2, 16, 16, 5, 5, 1, 2, 1, 0),        # K = 1, one channel per group
]


@cuda
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_float64_matches_reference(shape, layout):
    _cuda_ok()
    b, c, g, h, w, k, s, d, pad = shape
    x, kernel, pad = _rand_case(b, c, g, h, w, k, s, d, pad, layout=layout)
    grad_out = torch.randn(b, c, kernel.shape[-2], kernel.shape[-1], device="cuda", dtype=torch.float64)
    x.requires_grad_()
    kernel.requires_grad_()
    y = involution(x, kernel, s, pad, d, backend="cupy")
    gx, gw = torch.autograd.grad(y, (x, kernel), grad_out)
    ry = involution(x, kernel, s, pad, d, backend="reference")
    rgx, rgw = torch.autograd.grad(ry, (x, kernel), grad_out)
    torch.testing.assert_close((y, gx, gw), (ry, rgx, rgw), rtol=1e-10, atol=1e-10)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)


@cuda
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,s", [(3, 1), (7, 1), (7, 2)])
def test_gpu_low_precision_within_dtype_tolerance(dtype, layout, k, s):
    _cuda_ok()
    x, kernel, pad = _rand_case(4, 64, 4, 28, 28, k, s, 1, dtype=dtype, layout=layout)
    x.requires_grad_()
    kernel.requires_grad_()
    grad_out = torch.randn(4, 64, *kernel.shape[-2:], device="cuda", dtype=dtype)
    y = involution(x, kernel, s, pad, 1, backend="cupy")
    gx, gw = torch.autograd.grad(y, (x, kernel), grad_out)
    assert y.dtype == gx.dtype == gw.dtype == dtype
    xr, kr = x.detach().float().requires_grad_(), kernel.detach().float().requires_grad_()
    ry = involution_reference(xr, kr, s, pad, 1)
    rgx, rgw = torch.autograd.grad(ry, (xr, kr), grad_out.float())
    # fp32 accumulation: the only error is the inputs' and the final rounding, relative to the sum's scale.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for got, ref in ((y, ry), (gx, rgx), (gw, rgw)):
        torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@cuda
def test_gpu_non_contiguous_inputs():
    _cuda_ok()
    x_full, kernel, pad = _rand_case(2, 64, 2, 20, 20, 3, 1, 1)
    x = x_full[:, ::2]  # (2, 32, 20, 20), channel stride 2: neither layout
    k_t = torch.randn(2, 2, 3, 3, 20, 20, device="cuda", dtype=torch.float64).transpose(-1, -2)
    for xx in (x, x_full.transpose(2, 3)[:, :32], x_full.contiguous(memory_format=torch.channels_last)[:, 16:48]):
        for kk in (k_t, k_t.contiguous()):
            torch.testing.assert_close(involution(xx, kk, backend="cupy"), involution_reference(xx, kk, 1, 1, 1))


@cuda
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gpu_opcheck(layout):
    _cuda_ok()
    from rednet.ops import _custom_op  # noqa: F401

    x, kernel, pad = _rand_case(2, 32, 2, 13, 15, 7, 2, 1, layout=layout)
    torch.library.opcheck(torch.ops.rednet.involution.default, (x.requires_grad_(), kernel.requires_grad_(), 2, pad, 1))
    xf, kf, _ = _rand_case(2, 32, 2, 13, 15, 3, 1, 1, dtype=torch.float32, layout=layout)
    torch.library.opcheck(torch.ops.rednet.involution.default, (xf.requires_grad_(), kf.requires_grad_(), 1, 1, 1))


@cuda
def test_gpu_no_host_sync_current_stream_and_device():
    _cuda_ok()
    x, kernel, pad = _rand_case(2, 32, 2, 28, 28, 7, 1, 1, dtype=torch.float32)
    x.requires_grad_()
    ref = involution_reference(x.detach(), kernel, 1, pad, 1)
    involution(x, kernel, backend="cupy")  # compile outside the checked region
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            y = involution(x, kernel, backend="cupy")
            y.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, ref)
    if torch.cuda.device_count() > 1:
        x1, k1 = x.detach().to("cuda:1"), kernel.to("cuda:1")
        torch.testing.assert_close(involution(x1, k1, backend="cupy").cpu(), ref.cpu())


@cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_rednet50_forward_backward_matches_reference(monkeypatch, channels_last):
    _cuda_ok()
    import rednet

    torch.manual_seed(0)
    model = rednet.create_model("rednet50").cuda().double()
    for m in model.modules():  # non-zero last BN so every involution gets a gradient
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    img = torch.randn(2, 3, 96, 96, device="cuda", dtype=torch.float64)
    target = torch.tensor([3, 7], device="cuda")
    if channels_last:
        model, img = model.to(memory_format=torch.channels_last), img.contiguous(memory_format=torch.channels_last)
    results = []
    for backend in ("cupy", "reference"):
        monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", backend)
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(img), target)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g0, g1, rtol=1e-8, atol=1e-10)


@cuda
def test_gpu_autocast_reaches_kernel_in_low_precision(monkeypatch):
    _cuda_ok()
    from rednet.layers import Involution

    layer = Involution(64, 7, 2).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(2, 64, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    seen = []
    real = _cupy.plan_forward
    monkeypatch.setattr(_cupy, "plan_forward", lambda *a: seen.append((a[0].dtype, a[1].dtype)) or real(*a))
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "cupy")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)] and y.dtype == torch.bfloat16
    assert layer.conv2.conv.weight.grad is not None


@cuda
def test_gpu_torch_compile_rednet_fullgraph(monkeypatch):
    _cuda_ok()
    import rednet

    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "cupy")
    model = rednet.create_model("rednet26").cuda()
    img = torch.randn(2, 3, 64, 64, device="cuda")

    def step(m, x):
        out = m(x)
        out.square().mean().backward()
        return out

    torch.backends.cudnn.allow_tf32 = False  # compare like with like: inductor may pick other conv algorithms
    try:
        eager = step(model, img).detach()
        g_eager = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        launches = []
        real = _cupy.launch
        monkeypatch.setattr(_cupy, "launch", lambda plan, dev: launches.append(plan.name) or real(plan, dev))
        compiled = torch.compile(model, fullgraph=True)
        out = step(compiled, img).detach()
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert any("fwd" in n for n in launches) and any("bwd_input" in n for n in launches)  # the kernel ran inside
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close([p.grad for p in model.parameters()], g_eager, rtol=1e-2, atol=1e-3)
