"""The CUDA involution kernels without a GPU: compiled by nvcc and NVRTC, run on the host.

- every kernel instantiation RedNet uses (all dtypes, both memory formats, three passes),
  plus generic window shapes, is compiled by nvcc and by NVRTC from the source CuPy compiles;
- the kernels run on the host: ``involution.cu`` is compiled by g++ with an emulation of
  blocks, threads (fibers), shared memory, ``__syncthreads``, warp shuffles, 128-bit vectors
  and the half conversions (``cuda_emu.h``), launched with the plans ``_plan`` computes and
  compared to the reference: every dtype on RedNet's windows in both memory formats and all
  three passes, generic windows up to K = 15, group widths of 3, 16 and 32 channels, 7x7 and
  14x14 maps, a misaligned tensor. A barrier some thread cannot reach, or an access outside
  the tensors, fails the test.

The real kernels on a GPU are tested in ``test_ops_gpu.py``.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from rednet.ops import _cupy, _memory_format, _plan, involution_reference

from . import cuda_emu

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
    # One front-end pass, SASS for A100 and H100 (ptxas for both, in parallel): what CuPy builds there.
    cmd = ["nvcc", "-c", "-std=c++17", "-Werror", "all-warnings", "-gencode", "arch=compute_80,code=[sm_80,sm_90]",
           "-t", "2", str(cu), "-o", str(tmp_path / "involution_all.o")]
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
# Host emulation of the kernels (tests/cuda_emu.h): every RedNet window in every reduced
# precision, and the generic paths (tiled and not) in double.

# (B, C, G, H, W) and what each shape exercises.
EMU_SHAPES = {
    "odd": (2, 6, 2, 11, 37),  # C/G = 3: the nhwc_scalar kernels; several partly filled 32x8 nchw tiles
    "g16": (2, 32, 2, 14, 13),  # C/G = 16 as in RedNet: the nhwc vector kernels; 16x8 (and 8x8) nchw tiles
    "7x7": (3, 48, 3, 7, 7),  # RedNet's last stage: 8x8 nchw tiles, 4 planes a block, the last block part empty
    "g32": (1, 64, 2, 9, 10),  # C/G = 32: 4 (bf16) to 16 (fp64) threads per item summing by shuffles
}
_F32, _BF16, _F16, _F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
_EMU_CASES = [  # (dtype, K, S, D, shape)
    *[(dt, *w, sh) for dt in (_F32, _BF16, _F16) for w in REDNET_WINDOWS for sh in ("g16", "7x7")],
    *[(_F64, *w, "odd") for w in [(3, 1, 1), (3, 2, 1), (5, 1, 2), (7, 2, 1), (1, 2, 1), (11, 2, 3), (15, 1, 3)]],
    (_F32, 5, 2, 2, "odd"), (_BF16, 3, 2, 1, "odd"), (_F16, 7, 1, 1, "odd"),  # scalar nhwc in reduced precision
    (_BF16, 7, 2, 1, "g32"), (_F64, 3, 1, 1, "g16"),
    (_F32, 11, 2, 3, "g16"),  # the largest window the nhwc vector kernels stage; nchw reads global memory
    (_F64, 15, 1, 3, "g16"),  # K > 11 with C/G = 16: nhwc_scalar
]
_EMU_MODULES = sorted({(dt, k, s, d) for dt, k, s, d, _ in _EMU_CASES}, key=str)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    names = [n for m in _EMU_MODULES for n in _plan.name_expressions(*m)]
    return cuda_emu.build(names, tmp_path_factory.mktemp("emu"), _cupy.SOURCE_PATH)


def test_emulated_half_conversions_match_torch(emulator):
    """The shim's fp16 stand-ins round as torch (and the device's cvt.rn.f16.f32) do."""
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = bits.isfinite()
    got = torch.tensor([emulator.lib.emu_half_to_float(i) for i in range(65536)])
    torch.testing.assert_close(got[finite], bits.float()[finite], rtol=0, atol=0)
    vals = torch.cat([torch.randn(2000) * 10.0 ** torch.randint(-9, 5, (2000,)), torch.tensor([65504.0, 65520.0])])
    got = torch.tensor([emulator.lib.emu_float_to_half(float(v)) for v in vals], dtype=torch.int32)
    assert torch.equal(got.to(torch.int16).view(torch.float16).float(), vals.half().float())


def _emulate(emulator, plan: _plan.Launch | None, out: torch.Tensor) -> None:
    if plan is None:
        return
    if "_nhwc_scalar<" in plan.name:
        plan = plan._replace(grid=min(plan.grid, 3))  # few blocks: exercise the grid-stride loops
    emulator.launch(plan, _plan.THREADS, tensors=(*plan.keep, out))  # and no access outside the tensors


def _emulated_involution(emulator, x, kernel, stride, padding, dilation, grad_out):
    y, plan = _plan.plan_forward(x, kernel, stride, padding, dilation)
    _emulate(emulator, plan, y)
    gx, plan = _plan.plan_backward_input(grad_out, x, kernel, stride, padding, dilation)
    _emulate(emulator, plan, gx)
    gw, plan = _plan.plan_backward_kernel(grad_out, x, kernel, stride, padding, dilation)
    _emulate(emulator, plan, gw)
    return y, gx, gw


def _reference_with_grads(x, kernel, stride, padding, dilation, grad_out):
    xr = x.detach().double().requires_grad_()
    kr = kernel.detach().double().requires_grad_()
    y = involution_reference(xr, kr, stride, padding, dilation)
    gx, gw = torch.autograd.grad(y, (xr, kr), grad_out.double())
    return y, gx, gw


@pytest.mark.parametrize("memory_format", _memory_format.MEMORY_FORMATS)
@pytest.mark.parametrize("dtype,k,s,d,shape", _EMU_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernels_host_emulation(emulator, memory_format, dtype, k, s, d, shape):
    # Odd sizes, several group widths (EMU_SHAPES), "same" padding.
    b, c, g, h, w = EMU_SHAPES[shape]
    if shape == "odd" and k >= 11:
        h = 9
    pad = d * (k - 1) // 2
    if (k, s, d) == (5, 1, 2):
        pad = 1  # a padding smaller than "same": output smaller than the input
    ho, wo = ((n + 2 * pad - d * (k - 1) - 1) // s + 1 for n in (h, w))
    fmt = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
    x = torch.randn(b, c, h, w).to(dtype).contiguous(memory_format=fmt)
    gen = torch.randn(b, g * k * k, ho, wo).to(dtype).contiguous(memory_format=fmt)  # as the span conv makes it
    kernel = gen.view(b, g, k, k, ho, wo)
    grad_out = torch.randn(b, c, ho, wo).to(dtype).contiguous(memory_format=fmt)
    assert _memory_format.memory_format_of(x) == memory_format

    y, gx, gw = _emulated_involution(emulator, x, kernel, s, pad, d, grad_out)
    ry, rgx, rgw = _reference_with_grads(x, kernel, s, pad, d, grad_out)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for got, ref in ((y, ry), (gx, rgx), (gw, rgw)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)


def test_plan_picks_tiles_and_paths():
    assert [_plan.nchw_tile(n) for n in (7, 8, 14, 16, 28, 56, 112)] == [(8, 8)] * 2 + [(16, 8)] * 2 + [(32, 8)] * 3
    x = torch.empty(2, 64, 9, 9, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    tpi = _plan.nhwc_threads_per_item
    assert tpi(64, 4, 7, torch.bfloat16, (x,)) == 2  # RedNet's C/G = 16: two 16-byte threads per item
    assert tpi(64, 4, 7, torch.float32, (x,)) == 4 and tpi(64, 2, 7, torch.float64, (x,)) == 16
    assert tpi(48, 16, 7, torch.bfloat16, (x,)) is None  # C/G = 3
    assert tpi(64, 4, 15, torch.bfloat16, (x,)) is None  # kernel rows too long for the shared-memory chunk
    assert tpi(96, 2, 7, torch.bfloat16, (x,)) is None  # 48 channels: 6 threads per item, not a power of two
    assert tpi(64, 4, 7, torch.bfloat16, (x.flatten()[1:],)) is None  # not 16-byte aligned
    # 8x8 pixel patches: two groups for bf16 at C/G = 16 when G is even, else one (8x16 pixels).
    assert [_plan.nhwc_groups_per_block(t, g) for t, g in ((2, 4), (2, 3), (4, 4), (8, 2))] == [2, 1, 1, 1]


def test_kernels_host_emulation_misaligned_nhwc(emulator):
    """A channels_last tensor 2 bytes off 16-byte alignment takes the scalar kernels, correctly."""
    b, c, g, h, w = EMU_SHAPES["g16"]
    k, pad = 7, 3
    buf = torch.randn(b * h * w * c + 1).to(torch.bfloat16)
    x = buf[1:].view(b, h, w, c).permute(0, 3, 1, 2)  # channels_last, data_ptr % 16 == 2
    kernel = torch.randn(b, g * k * k, h, w).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    kernel = kernel.view(b, g, k, k, h, w)
    grad_out = torch.randn(b, c, h, w).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert _plan.plan_forward(x, kernel, 1, pad, 1)[1].name.startswith("involution_fwd_nhwc_scalar<")
    y, gx, gw = _emulated_involution(emulator, x, kernel, 1, pad, 1, grad_out)
    for got, ref in zip((y, gx, gw), _reference_with_grads(x, kernel, 1, pad, 1, grad_out)):
        torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_emulator_reports_a_barrier_not_every_thread_reaches(tmp_path):
    """The shim's check that makes the emulation also prove the kernels' barriers uniform."""
    src = tmp_path / "diverge.cu"
    src.write_text("__global__ void diverge(int* out) {\n"
                   "  if (threadIdx.x < 128) __syncthreads();\n"
                   "  out[threadIdx.x] = 1;\n}\n")
    emu = cuda_emu.build(["diverge"], tmp_path, src)
    out = torch.zeros(_plan.THREADS, dtype=torch.int32)
    launch = _plan.Launch("diverge", None, 1, (np.uint64(out.data_ptr()),), (out,))
    with pytest.raises(RuntimeError, match="barrier is not reached by every thread"):
        emu.launch(launch, _plan.THREADS)
