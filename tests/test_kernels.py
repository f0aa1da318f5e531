"""The CUDA involution kernels without a GPU: compiled by nvcc and NVRTC, run on the host.

- every kernel instantiation RedNet uses (all dtypes, both memory formats, three passes),
  plus generic window shapes, is compiled by nvcc and by NVRTC from the source CuPy compiles;
- the kernels' index arithmetic runs on the host: ``involution.cu`` is compiled by g++ with
  a thin emulation of blocks, threads, shared memory and ``__syncthreads`` (one OS thread
  per CUDA thread), launched with the plans ``_plan`` computes, and compared to the reference.

The real kernels on a GPU are tested in ``test_ops_gpu.py``.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch

from rednet.ops import _cupy, _plan, involution_reference

REDNET_WINDOWS = [(3, 1, 1), (7, 1, 1), (7, 2, 1)]  # (K, stride, dilation): stem and blocks
GENERIC_WINDOWS = [(1, 2, 1), (5, 2, 2), (11, 2, 3), (15, 1, 3)]  # last two: windows too big for smem tiles
ALL_DTYPES = list(_plan.TYPE_NAMES)


def _instantiation_names(dtypes, windows) -> list[str]:
    return [n for dt in dtypes for w in windows for n in _plan.name_expressions(dt, *w)]


# ----------------------------------------------------------------------------------------
# Compilation without a GPU.


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_nvcc_compiles_every_instantiation(tmp_path):
    names = _instantiation_names(ALL_DTYPES, REDNET_WINDOWS) + _instantiation_names([torch.float32], GENERIC_WINDOWS)
    # Taking each kernel's address instantiates it, as NVRTC's name expressions do at run time.
    addresses = ",\n".join(f"  (void*)&{n}" for n in names)
    src = _cupy.source() + '\nextern "C" void* const rednet_instantiations[] = {\n' + addresses + "\n};\n"
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
    except Exception as e:  # noqa: BLE001  (CuPy or its NVRTC library missing, however it fails: skip)
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
        except Exception as e:  # noqa: BLE001  (any compile failure: fail with NVRTC's log)
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
    names = [n for dt, k, s, d in _EMU_CASES for n in _plan.name_expressions(dt, k, s, d)]
    lines = [_SHIM.replace("SOURCE", str(_cupy.SOURCE_PATH))]
    for i, n in enumerate(names):
        t = _EMU_TYPES[next(dt for dt, name in _plan.TYPE_NAMES.items() if name == n.split("<")[1].split(",")[0])]
        tail = "int tw, int nt" if "_nchw<" in n else "long long n"
        call = "tw, nt" if "_nchw<" in n else "n"
        lines.append(
            f'extern "C" void emu_{i}(unsigned grid, const void* a, const void* b, void* o, '
            f"int C, int H, int W, int G, int Ho, int Wo, int pad, {tail}) {{ emu_launch(grid, [=] {{ "
            f"{n}((const {t}*)a, (const {t}*)b, ({t}*)o, C, H, W, G, Ho, Wo, pad, {call}); }}); }}"
        )
    d = tmp_path_factory.mktemp("emu")
    (d / "emu.cpp").write_text("\n".join(lines))
    res = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", str(d / "emu.cpp"),
                          "-o", str(d / "emu.so")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    lib = ctypes.CDLL(str(d / "emu.so"))
    return {n: getattr(lib, f"emu_{i}") for i, n in enumerate(names)}


def _emulate(emulator, plan: _plan.Launch | None) -> None:
    if plan is None:
        return
    grid = plan.grid if "_nchw<" in plan.name else min(plan.grid, 3)  # few blocks: exercise grid-stride loops
    conv = {np.uint64: ctypes.c_void_p, np.int32: ctypes.c_int, np.int64: ctypes.c_longlong}
    args = [conv[type(a)](int(a)) for a in plan.args]
    emulator[plan.name](ctypes.c_uint(grid), *args)


def _emulated_involution(emulator, x, kernel, stride, padding, dilation, grad_out):
    y, plan = _plan.plan_forward(x, kernel, stride, padding, dilation)
    _emulate(emulator, plan)
    gx, plan = _plan.plan_backward_input(grad_out, x, kernel, stride, padding, dilation)
    _emulate(emulator, plan)
    gw, plan = _plan.plan_backward_kernel(grad_out, x, kernel, stride, padding, dilation)
    _emulate(emulator, plan)
    return y, gx, gw


def _reference_with_grads(x, kernel, stride, padding, dilation, grad_out):
    xr = x.detach().double().requires_grad_()
    kr = kernel.detach().double().requires_grad_()
    y = involution_reference(xr, kr, stride, padding, dilation)
    gx, gw = torch.autograd.grad(y, (xr, kr), grad_out.double())
    return y, gx, gw


@pytest.mark.parametrize("memory_format", _plan.MEMORY_FORMATS)
@pytest.mark.parametrize("dtype,k,s,d", _EMU_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernels_host_emulation(emulator, memory_format, dtype, k, s, d):
    # Odd sizes larger than a 32x8 tile, C/G = 3 channels per group, "same" padding.
    b, c, g, h, w = 2, 6, 2, 11 if k < 11 else 9, 37
    pad = d * (k - 1) // 2
    if (k, s, d) == (5, 1, 2):
        pad = 1  # a padding smaller than "same": output smaller than the input
    ho, wo = ((n + 2 * pad - d * (k - 1) - 1) // s + 1 for n in (h, w))
    fmt = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
    x = torch.randn(b, c, h, w).to(dtype).contiguous(memory_format=fmt)
    gen = torch.randn(b, g * k * k, ho, wo).to(dtype).contiguous(memory_format=fmt)  # as the span conv makes it
    kernel = gen.view(b, g, k, k, ho, wo)
    grad_out = torch.randn(b, c, ho, wo).to(dtype).contiguous(memory_format=fmt)
    assert _plan.memory_format_of(x) == memory_format

    y, gx, gw = _emulated_involution(emulator, x, kernel, s, pad, d, grad_out)
    ry, rgx, rgw = _reference_with_grads(x, kernel, s, pad, d, grad_out)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for got, ref in ((y, ry), (gx, rgx), (gw, rgw)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
