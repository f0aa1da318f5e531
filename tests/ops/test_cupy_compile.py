"""The kernels compiled through CuPy's own compile path, as ``_cupy`` calls it, without a GPU.

``tests/ops/test_kernels.py`` compiles the source with NVRTC directly. These tests call
``_cupy.compile_binary``, the function the run-time path uses: CuPy's
``compile_using_nvrtc`` with its option assembly (``-arch``,
``--device-as-default-execution-space``), the project's options (``-ftz=true`` as
``cupy.RawModule`` adds it) and name expressions, so a CuPy upgrade that changes or breaks
that path fails here. The one device query on it (the memoized per-device ``-arch`` option)
is answered as CuPy answers for an architecture its NVRTC supports. Skipped, with the
reason, where CuPy or its NVRTC library is missing.
"""
from __future__ import annotations

import pytest
import torch

from rednet.ops import _cupy, _kernel_cache, _plan


@pytest.fixture
def compiler(monkeypatch, tmp_path):
    try:
        from cupy.cuda import compiler

        compiler._get_nvrtc_version()
    except Exception as e:  # noqa: BLE001  (CuPy or its NVRTC library missing, however it fails: skip)
        pytest.skip(f"CuPy's NVRTC is not available: {type(e).__name__}: {e}")
    monkeypatch.setenv("REDNET_CACHE_DIR", str(tmp_path))
    if not torch.cuda.is_available():
        # Memoized per device, so it asks the CUDA runtime for the current device, which
        # fails without one. What it returns for an architecture NVRTC supports:
        def arch_option(arch=None):
            return f"-arch=sm_{arch}", "cubin"

        monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", arch_option)
    seen = []
    real = compiler._NVRTCProgram.compile

    def spy(self, options=(), log_stream=None):
        seen.append(tuple(options))
        return real(self, options, log_stream)

    monkeypatch.setattr(compiler._NVRTCProgram, "compile", spy)
    compiler.seen_options = seen
    return compiler


def test_cupy_compiles_a_module_with_the_run_time_options_and_the_cache_keeps_it(compiler):
    # One module (every kind and memory format of one dtype and window): test_kernels.py
    # compiles every instantiation with NVRTC directly; this is about CuPy's path to it.
    names = _plan.name_expressions(torch.bfloat16, 3, 1, 1)
    entry, key, cached = _cupy._binary(names, "90")
    assert not cached
    assert set(entry.names) == set(names)
    assert all(lowered.startswith("_Z") for lowered in entry.names.values())  # mangled C++ names
    assert entry.binary.startswith(b"\x7fELF")  # a cubin, not PTX
    (options,) = compiler.seen_options
    for opt in ("--std=c++17", "-ftz=true", "-arch=sm_90", "--device-as-default-execution-space"):
        assert opt in options, options
    assert not any(o.startswith("-I") for o in options)  # no header lookup: the source includes nothing
    again, key2, cached2 = _cupy._binary(names, "90")  # what any later process of this machine does
    assert cached2 and key2 == key and again == entry and len(compiler.seen_options) == 1
    assert (_kernel_cache.cache_dir() / f"{key}.bin").is_file()
    versions = _cupy.versions()
    assert versions["cupy"] and versions["nvrtc"].count(".") == 1


def test_a_compile_error_carries_nvrtcs_log(compiler, monkeypatch):
    monkeypatch.setattr(_cupy, "source", lambda: _cupy.SOURCE_PATH.read_text() + "\nthis is not C++;\n")
    with pytest.raises(Exception, match="error") as info:  # CuPy's CompileException: what the check reports
        _cupy.compile_binary(_plan.name_expressions(torch.float32, 3, 1, 1), "90")
    assert "this is not C++" in str(info.value) or "identifier" in str(info.value)
