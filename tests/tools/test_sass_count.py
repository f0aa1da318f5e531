"""rednet.analysis.sass, the compiler evidence of tools/kernel_report.py: the static report's binary is the
runtime's, and its instruction count.

- the options the report compiles with are ``_cupy.COMPILE_OPTIONS``, read from the source
  of any revision, and the cubin it builds is byte for byte what ``_cupy.compile_binary``
  builds (the binary a GPU loads);
- instructions executed per thread: a loop counts its trip count times, an if-else on a
  launch parameter counts the side that runs, a branch around code counts the code.

Needs CuPy's NVRTC and CUDA's cuobjdump/nvdisasm (Triton ships them); skipped without.
"""
from __future__ import annotations

import pytest
import torch

from rednet.analysis import sass
from rednet.ops import _cupy, _plan


@pytest.fixture(scope="module")
def nvrtc():
    try:
        from cupy.cuda import compiler

        compiler._get_nvrtc_version()
        sass.find_tool("nvdisasm"), sass.find_tool("cuobjdump")
    except Exception as e:  # noqa: BLE001  (CuPy, NVRTC or the binary utilities missing: skip)
        pytest.skip(f"NVRTC or CUDA's binary utilities not available: {type(e).__name__}: {e}")


def test_the_report_compiles_with_the_runtime_options_and_gets_the_runtime_binary(nvrtc, monkeypatch, tmp_path):
    assert sass.runtime_options(_cupy.SOURCE_PATH.with_name("_cupy.py").read_text()) == _cupy.COMPILE_OPTIONS
    from cupy.cuda import compiler

    monkeypatch.setenv("REDNET_CACHE_DIR", str(tmp_path))
    if not torch.cuda.is_available():  # CuPy's per-device -arch lookup, answered as for an sm_90 device
        monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=sm_{arch}",
                                                                                            "cubin"))
    names = _plan.name_expressions(torch.float32, 3, 1, 1)
    runtime = _cupy.compile_binary(names, "90")
    binary, lowered = sass.compile_nvrtc(_cupy.source(), names, _cupy.COMPILE_OPTIONS, "90")
    assert lowered == runtime.names
    assert binary.startswith(runtime.binary) and not binary[len(runtime.binary):].strip(b"\0")
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(binary)
    res = sass.resources(cubin)
    assert set(res) == set(lowered.values()) and all(r["registers"] > 0 for r in res.values())


SOURCE = """
extern "C" __global__ void count_me(float* y, const float* x, int n, int flag) {
  float a = x[threadIdx.x];
  #pragma unroll 1
  for (int i = 0; i < n; ++i) a = a * x[i + 1] + 2.0f;  // one multiply-add an iteration
  if (flag) {
    #pragma unroll
    for (int i = 0; i < 6; ++i) { a = a * x[i + 64] + 3.0f; y[i + 128] = a; }  // the larger side
  } else {
    a = a * x[2] + 5.0f;
    y[256] = a;
  }
  y[threadIdx.x] = a;
}
"""


def test_executed_counts_loops_by_trip_count_and_the_larger_side_of_an_if_else(nvrtc, tmp_path):
    binary, lowered = sass.compile_nvrtc(SOURCE, ["count_me"], _cupy.COMPILE_OPTIONS, "90", extra=("-lineinfo",))
    (tmp_path / "k.cubin").write_bytes(binary)
    fn = sass.disassemble(tmp_path / "k.cubin")[lowered["count_me"]]
    (loop,) = [lp for lp in fn.loops]
    assert 5 in {x.line for x in fn.loop_instrs(loop)}  # the source line of the loop
    one, three = (fn.executed(lambda lp, n=n: n) for n in (1, 3))
    assert three["fma"] - one["fma"] == 2  # one multiply-add an iteration
    assert one["fma"] == 1 + 6  # the loop once, the flag's side (6), not the other (1)
    body = sum(1 for x in fn.loop_instrs(loop))
    assert three["instructions"] - one["instructions"] == 2 * body
    assert fn.executed(lambda lp: 0)["fma"] == 6
