"""The CUDA involution kernels without a GPU: compiled by nvcc and NVRTC, run on the host.

- every kernel instantiation RedNet uses (all dtypes, both memory formats, three passes),
  plus generic window shapes, is compiled by nvcc and by NVRTC from the source CuPy compiles;
- the kernels run on the host: ``involution.cu`` is compiled by g++ with an emulation of
  blocks, threads (fibers), shared memory, ``__syncthreads``, warp shuffles, asynchronous
  copies, 128-bit vectors and the half conversions (``cuda_emu.h``), launched with the plans
  ``_plan`` computes and compared to the reference: every dtype on RedNet's windows in both
  memory formats and all three passes, generic windows up to K = 15, group widths of 3, 16 and
  32 channels, 7x7 and 14x14 maps, a misaligned tensor, and every tile and path family the
  plans pick (asserted). The emulation is strict: a barrier some thread cannot reach, an access
  outside the tensors, a global or shared vector access not aligned to its size, reading shared
  memory a block has not written (it is poisoned with NaN before every block) or an
  asynchronous copy before its wait fails the test; a subset also runs under random thread
  orders.

The real kernels on a GPU are tested in ``test_ops_gpu.py``.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from rednet.analysis import cuda_emu
from rednet.ops import _cupy, _memory_format, _plan, _selfcheck, involution_reference

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


@pytest.mark.parametrize("arch", ["75", "90"])
def test_nvrtc_compiles_every_instantiation(arch):
    """The run-time path: NVRTC, the shipped source, the runtime's options (``_cupy.COMPILE_OPTIONS``
    and what CuPy adds), name expressions; no device needed. sm_75 has no cp.async and no packed
    conversions: the source's fallbacks for it compile too."""
    nvrtc = _nvrtc()
    # Every dtype once and RedNet's K=7 stride-2 window; nvcc above compiles the whole set.
    names = _instantiation_names(ALL_DTYPES, [(3, 1, 1)]) + _instantiation_names([torch.float32], [(7, 2, 1)])
    prog = nvrtc.createProgram(_cupy.source(), "involution.cu", [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, [*_cupy.COMPILE_OPTIONS, f"-arch=sm_{arch}",
                                        "--device-as-default-execution-space"])
        except Exception as e:  # noqa: BLE001  (any compile failure: fail with NVRTC's log)
            pytest.fail(f"{e}\n{nvrtc.getProgramLog(prog)[-4000:]}")
        assert all(nvrtc.getLoweredName(prog, n) for n in names)
        assert len(nvrtc.getCUBIN(prog)) > 0
    finally:
        nvrtc.destroyProgram(prog)


# ----------------------------------------------------------------------------------------
# Host emulation of the kernels (rednet/analysis/cuda_emu.h): every RedNet window in every reduced
# precision, and the generic paths (tiled and not) in double.

# (B, C, G, H, W) and what each shape exercises.
EMU_SHAPES = {
    "odd": (2, 6, 2, 11, 37),  # C/G = 3: the nhwc_scalar kernels; several partly filled 32x8 nchw tiles
    "g16": (2, 32, 2, 14, 13),  # C/G = 16, G = 2 (the stem's): nhwc vector blocks of 2 patches (bf16);
    #                             16x8 nchw tiles; at stride 2 a 7x7 map, the block's second patch empty
    "g4": (1, 64, 4, 11, 19),  # C/G = 16, G = 4: nhwc vector blocks of 4 (bf16), 2 (fp32), 1 (fp64)
    #                            groups, partly covered patches, stride phases of unequal sizes
    "7x7": (3, 48, 3, 7, 7),  # RedNet's last stage: 8x8 nchw tiles, 4 planes a block, the last block part
    #                           empty; odd G: bf16/fp16 nhwc rows not 32-bit words (scalar), fp32 vector
    "g32": (1, 64, 2, 9, 10),  # C/G = 32: the nhwc_scalar kernels, 32 channels a thread
}
_F32, _BF16, _F16, _F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
_EMU_CASES = [  # (dtype, K, S, D, shape)
    *[(dt, *w, sh) for dt in (_F32, _BF16, _F16) for w in REDNET_WINDOWS for sh in ("g16", "7x7")],
    *[(dt, *w, "g4") for dt in (_BF16, _F32) for w in REDNET_WINDOWS],
    (_F16, 7, 2, 1, "g4"), (_F64, 7, 2, 1, "g4"), (_F64, 3, 1, 1, "g4"),
    (_BF16, 5, 2, 2, "g4"),  # even dilation at stride 2: one parity class has no taps at all
    *[(_F64, *w, "odd") for w in [(3, 1, 1), (3, 2, 1), (5, 1, 2), (7, 2, 1), (1, 2, 1), (11, 2, 3), (15, 1, 3)]],
    (_F32, 5, 2, 2, "odd"), (_BF16, 3, 2, 1, "odd"), (_F16, 7, 1, 1, "odd"),  # scalar nhwc in reduced precision
    (_BF16, 7, 2, 1, "g32"), (_F64, 3, 1, 1, "g16"), (_F32, 5, 1, 2, "g16"),
    (_F32, 11, 1, 1, "g16"),  # the largest window of the nhwc vector kernels
    (_F32, 11, 2, 3, "g16"),  # too large for their shared memory: nhwc_scalar; nchw reads global memory
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


def _case(memory_format, dtype, k, s, d, shape):
    """Inputs of an emulation case: odd sizes, several group widths (EMU_SHAPES), "same" padding."""
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
    grad_out = torch.randn(b, c, ho, wo).to(dtype).contiguous(memory_format=fmt)
    assert _memory_format.memory_format_of(x) == memory_format
    return x, gen.view(b, g, k, k, ho, wo), grad_out, pad


def _assert_within_bound(got_all, x, kernel, grad_out, s, pad, d):
    """Every element within what fp32 (fp64) accumulation guarantees (_selfcheck.error_bound)."""
    refs = _reference_with_grads(x, kernel, s, pad, d, grad_out)
    abs_sums = _reference_with_grads(x.abs(), kernel.abs(), s, pad, d, grad_out.abs())
    n = max(kernel.shape[2] ** 2, x.shape[1] // kernel.shape[1])
    for name, got, ref, abs_sum in zip(("y", "grad_x", "grad_w"), got_all, refs, abs_sums):
        assert got.dtype == x.dtype
        err = (got.double() - ref).abs()
        bound = _selfcheck.error_bound(x.dtype, n, ref, abs_sum)
        assert (err <= bound).all(), f"{name}: {int((~(err <= bound)).sum())} elements outside the bound"


@pytest.mark.parametrize("memory_format", _memory_format.MEMORY_FORMATS)
@pytest.mark.parametrize("dtype,k,s,d,shape", _EMU_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernels_host_emulation(emulator, memory_format, dtype, k, s, d, shape):
    x, kernel, grad_out, pad = _case(memory_format, dtype, k, s, d, shape)
    fmt = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
    assert _memory_format.memory_format_of(x) == memory_format
    y, gx, gw = _emulated_involution(emulator, x, kernel, s, pad, d, grad_out)
    _assert_within_bound((y, gx, gw), x, kernel, grad_out, s, pad, d)
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)


# Cases also run under random thread orders (several seeds): every nhwc vector pass and parity
# class, and the nchw 8x8 tiles with a partly empty block.
_RANDOM_ORDER_CASES = [(_BF16, 7, 2, 1, "g4"), (_F32, 7, 1, 1, "g4"), (_BF16, 3, 1, 1, "g16"), (_F32, 7, 2, 1, "7x7")]


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("dtype,k,s,d,shape", _RANDOM_ORDER_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernels_host_emulation_random_thread_orders(emulator, dtype, k, s, d, shape, seed):
    emulator.set_order("random", seed)
    try:
        for fmt in _memory_format.MEMORY_FORMATS:
            x, kernel, grad_out, pad = _case(fmt, dtype, k, s, d, shape)
            _assert_within_bound(_emulated_involution(emulator, x, kernel, s, pad, d, grad_out), x, kernel,
                                 grad_out, s, pad, d)
    finally:
        emulator.set_order("reverse-odd")


def _paths(memory_format, dtype, k, s, d, shape) -> set[str]:
    """What the plans pick for an emulation case: path, NCHW tile, NHWC patches per block."""
    x, kernel, grad_out, pad = _case(memory_format, dtype, k, s, d, shape)
    out = set()
    for plan in (_plan.plan_forward(x, kernel, s, pad, d)[1],
                 _plan.plan_backward_input(grad_out, x, kernel, s, pad, d)[1],
                 _plan.plan_backward_kernel(grad_out, x, kernel, s, pad, d)[1]):
        kind, path = re.match(r"involution_(fwd|bwd_input|bwd_kernel)_(\w+)<", plan.name).groups()
        out.add(path)
        if path == "nchw":
            tw, th = (int(a) for a in plan.args[10:12])
            planes = int(plan.args[14])
            out.add(f"nchw {tw}x{th}")
            if planes % (_plan.THREADS // (tw * th)):
                out.add("nchw partly empty block")
        elif path == "nhwc":
            gb, tiles = int(plan.args[10]), int(plan.args[12])
            ppb = _plan.NHWC_SLOTS // (gb * dtype.itemsize)
            out.add(f"nhwc {ppb} patches a block")
            if tiles % ppb:
                out.add("nhwc partly empty block")
            if kind == "bwd_input" and s == 2:
                out.add("nhwc stride-2 grad_input")
    return out


def test_emulation_cases_cover_every_tile_and_path():
    """The cases above run every kernel family the plans choose, on purpose (not by luck of the shapes)."""
    seen = set().union(*(_paths(fmt, *case) for case in _EMU_CASES for fmt in _memory_format.MEMORY_FORMATS))
    assert {"nchw", "nhwc", "nhwc_scalar", "nchw 32x8", "nchw 16x8", "nchw 8x8", "nchw partly empty block",
            "nhwc 1 patches a block", "nhwc 2 patches a block", "nhwc partly empty block",
            "nhwc stride-2 grad_input"} <= seen, seen
    seen_random = set().union(*(_paths(fmt, *case) for case in _RANDOM_ORDER_CASES
                                for fmt in _memory_format.MEMORY_FORMATS))
    assert {"nhwc", "nhwc stride-2 grad_input", "nchw 8x8", "nhwc 2 patches a block"} <= seen_random


def test_plan_picks_tiles_and_paths():
    assert [_plan.nchw_tile(n) for n in (7, 8, 14, 16, 28, 56, 112)] == [(8, 8)] * 2 + [(16, 8)] * 2 + [(32, 8)] * 3
    x = torch.empty(2, 64, 9, 9, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    tpi = _plan.nhwc_threads_per_item
    assert tpi(64, 4, 7, torch.bfloat16, (x,)) == 2  # RedNet's C/G = 16: two 16-byte slices per group
    assert tpi(64, 4, 7, torch.float32, (x,)) == 4 and tpi(32, 2, 7, torch.float64, (x,)) == 8
    assert tpi(48, 16, 7, torch.bfloat16, (x,)) is None  # C/G = 3
    assert tpi(64, 2, 7, torch.bfloat16, (x,)) is None  # C/G = 32: compiled for 16 only
    assert tpi(64, 4, 13, torch.bfloat16, (x,)) is None  # beyond NHWC_MAX_K
    assert tpi(64, 4, 7, torch.bfloat16, (x.flatten()[1:],)) is None  # not 16-byte aligned
    # Groups per block: 8 slots of 16 bytes, whole groups, a power of two dividing G.
    assert [_plan.nhwc_groups_per_block(t, g) for t, g in ((2, 4), (2, 2), (2, 3), (4, 4), (8, 2))] == [4, 2, 1, 2, 1]
    # Shared memory: the 8 slots' odd-sized windows (16 bytes a pixel) and 512 * K*K bytes of kernel rows.
    assert _plan.nhwc_shared_bytes("fwd", 7, 1, 1) == 8 * (14 * 14 + 1) * 16 + 512 * 49
    assert _plan.nhwc_shared_bytes("bwd_input", 7, 2, 1) == 8 * (8 * 8 + 1) * 16
    # bf16 with an odd G: a block's kernel rows are not 32-bit words, the scalar kernels run.
    x3 = torch.randn(1, 48, 7, 7).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    k3 = torch.randn(1, 3 * 9, 7, 7).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert "_nhwc_scalar<" in _plan.plan_forward(x3, k3.view(1, 3, 3, 3, 7, 7), 1, 1, 1)[1].name
    assert "_nhwc<" in _plan.plan_forward(x3.float(), k3.float().view(1, 3, 3, 3, 7, 7), 1, 1, 1)[1].name


def test_nhwc_plan_declines_what_a_device_cannot_hold(monkeypatch):
    """A device with less shared memory than a block needs gets the scalar kernels, not a failed launch."""
    x = torch.randn(1, 32, 14, 14).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    k = torch.randn(1, 2 * 49, 7, 7).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    k = k.view(1, 2, 7, 7, 7, 7)
    assert _plan.plan_forward(x, k, 2, 3, 1)[1].smem == _plan.nhwc_shared_bytes("fwd", 7, 2, 1) > 64 * 1024
    monkeypatch.setattr(_plan, "max_shared_bytes", lambda device: 64 * 1024)  # sm_75
    assert "_nhwc_scalar<" in _plan.plan_forward(x, k, 2, 3, 1)[1].name
    assert "_nhwc<" in _plan.plan_forward(x, k.new_empty(1, 2, 7, 7, 14, 14), 1, 3, 1)[1].name  # 51 KB fits


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
    _assert_within_bound((y, gx, gw), x, kernel, grad_out, 1, pad, 1)


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


def _launch_raw(emu, name, grid, args, keep, smem=0):
    emu.launch(_plan.Launch(name, None, grid, tuple(np.uint64(a.data_ptr()) for a in args), keep, smem),
               _plan.THREADS)


def test_emulator_poisons_shared_memory_and_carries_out_async_copies_at_the_wait(tmp_path):
    """What makes a missing stage or wait visible: every block starts with NaN-poisoned shared
    memory (static and dynamic), and an asynchronous copy lands only when its thread waits."""
    src = tmp_path / "stale.cu"
    src.write_text("""
__global__ void stale(const uint4* src, unsigned* out) {
  __shared__ unsigned s[256];
  REDNET_DYNAMIC_SHARED(d);
  const unsigned t = threadIdx.x, o = blockIdx.x * 768;
  if (blockIdx.x == 0) s[t] = 7u;  // only the first block writes
  copy16_async(d + t, src + t, true);
  __syncthreads();
  out[o + t] = s[t];
  out[o + 256 + t] = d[t].x;  // before the wait
  async_wait();
  out[o + 512 + t] = d[t].x;
}
""")
    emu = cuda_emu.build(["stale"], tmp_path, src)
    data = torch.arange(4 * 256, dtype=torch.int32)
    out = torch.zeros(2 * 768, dtype=torch.int32)
    _launch_raw(emu, "stale", 2, (data, out), (data, out), smem=256 * 16)
    poison = -1  # 0xffffffff
    first, second = out.view(2, 3, 256)
    assert (first[0] == 7).all() and (second[0] == poison).all()  # block 1 did not write: poison, not block 0's
    assert (first[1] == poison).all() and (second[1] == poison).all()  # copies not yet waited for
    assert torch.equal(first[2], data.view(256, 4)[:, 0]) and torch.equal(second[2], first[2])


def test_emulator_rejects_misaligned_vector_accesses(tmp_path):
    src = tmp_path / "misaligned.cu"
    src.write_text("""
__global__ void global_load(const char* p, unsigned* out) {
  REDNET_TRACE_LOAD(p + 4, 16);
  out[threadIdx.x] = 1u;
}
__global__ void shared_load(const char* p, unsigned* out) {
  REDNET_DYNAMIC_SHARED(d);
  REDNET_TRACE_SHARED(reinterpret_cast<const char*>(d) + 8, 16);
  out[threadIdx.x] = 1u;
}
""")
    emu = cuda_emu.build(["global_load", "shared_load"], tmp_path, src)
    buf, out = torch.zeros(64, dtype=torch.int32), torch.zeros(_plan.THREADS, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="global load of 16 bytes at an address not aligned"):
        _launch_raw(emu, "global_load", 1, (buf, out), (buf, out))
    with pytest.raises(RuntimeError, match="load of 16 bytes in shared memory, misaligned"):
        _launch_raw(emu, "shared_load", 1, (buf, out), (buf, out), smem=64)


def test_emulator_random_orders_interleave_threads_as_neither_fixed_order_does(tmp_path):
    """A race decided by which thread writes last: the two fixed orders give two outcomes, random
    orders many (so a race that only some interleaving exposes gets its chance)."""
    src = tmp_path / "race.cu"
    src.write_text("""
__global__ void race(unsigned* out) {
  __shared__ unsigned last;
  last = threadIdx.x;
  __syncthreads();
  out[blockIdx.x * 256 + threadIdx.x] = last;
}
""")
    emu = cuda_emu.build(["race"], tmp_path, src)
    out = torch.zeros(2 * _plan.THREADS, dtype=torch.int32)
    _launch_raw(emu, "race", 2, (out,), (out,))
    assert out.view(2, -1)[:, 0].tolist() == [255, 0]  # block 0 in order, block 1 reversed
    winners = set()
    for seed in range(1, 6):
        emu.set_order("random", seed)
        _launch_raw(emu, "race", 2, (out,), (out,))
        winners |= set(out.view(2, -1)[:, 0].tolist())
    assert len(winners) >= 5
