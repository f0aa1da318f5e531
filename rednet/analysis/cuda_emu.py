"""Build and drive the host emulation of ``involution.cu`` (``cuda_emu.h``, next to this file).

The kernel source is compiled by g++ with the shim in front of it; each kernel instantiation
(a name expression of ``_plan``) gets a wrapper called cuLaunchKernel-style (an array of
pointers to the arguments), so any launch plan runs as ``_cupy.launch`` would run it on a GPU.
Used by ``tests/ops/test_kernels.py`` to prove the kernels and by ``tools/kernel_report.py`` to
count the global accesses of the same code. Building needs g++; importing needs nothing beyond torch.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

SHIM = Path(__file__).with_name("cuda_emu.h")
_CTYPES = {np.uint64: ctypes.c_uint64, np.int32: ctypes.c_int32, np.int64: ctypes.c_int64}


class Stats(ctypes.Structure):
    """Mirror of ``emu::Stats``: index 0 loads, 1 stores."""

    _fields_ = [
        ("requests", ctypes.c_ulonglong * 2),
        ("sectors", ctypes.c_ulonglong * 2),
        ("used_bytes", ctypes.c_ulonglong * 2),
        ("accesses", (ctypes.c_ulonglong * 5) * 2),
        ("block_sectors", (ctypes.c_ulonglong * 4) * 2),
        ("threads", ctypes.c_ulonglong),
        ("storing_threads", ctypes.c_ulonglong),
    ]

    def as_dict(self) -> dict:
        out = {"threads": self.threads, "storing_threads": self.storing_threads}
        for st, kind in enumerate(("load", "store")):
            out[kind] = {
                "requests": self.requests[st],
                "sectors": self.sectors[st],
                "used_bytes": self.used_bytes[st],
                "accesses_by_bytes": {b: self.accesses[st][i] for i, b in enumerate((1, 2, 4, 8, 16))},
                "block_sectors": list(self.block_sectors[st]),  # by argument: 0, 1, 2 (tensors), other
            }
        return out


class Emulator:
    """The compiled emulation of a list of kernel instantiations."""

    def __init__(self, lib: ctypes.CDLL, names: list[str]):
        self.lib = lib
        self.index = {n: i for i, n in enumerate(names)}
        lib.emu_run.restype = ctypes.c_int
        lib.emu_error.restype = ctypes.c_char_p
        lib.emu_half_to_float.restype = ctypes.c_float
        lib.emu_half_to_float.argtypes = [ctypes.c_ushort]
        lib.emu_float_to_half.restype = ctypes.c_ushort
        lib.emu_float_to_half.argtypes = [ctypes.c_float]
        lib.emu_set_order.argtypes = [ctypes.c_int, ctypes.c_ulonglong]

    def set_order(self, mode: str, seed: int = 1) -> None:
        """Thread schedule of later launches: 'reverse-odd' (odd blocks run their threads in reverse)
        or 'random' (a new random order of the block's threads at every round between barriers)."""
        self.lib.emu_set_order({"reverse-odd": 0, "random": 1}[mode], seed)

    def launch(self, plan, threads: int, blocks: list[int] | None = None,
               tensors: tuple[torch.Tensor, ...] | None = None) -> None:
        """Run ``plan`` (a ``_plan.Launch``) on all its blocks, or only on ``blocks``; with
        ``tensors`` (its three pointer arguments), any access outside them is an error."""
        if plan is None:
            return
        if tensors is not None:
            self.lib.emu_bounds(*_ranges(tensors))
            try:
                self.launch(plan, threads, blocks)
            finally:
                self.lib.emu_bounds(None, ctypes.c_size_t(0), None, ctypes.c_size_t(0), None, ctypes.c_size_t(0))
            return
        vals = [_CTYPES[type(a)](int(a)) for a in plan.args]
        args = (ctypes.c_void_p * len(vals))(*(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals))
        sel = None if blocks is None else (ctypes.c_uint * len(blocks))(*blocks)
        smem = int(getattr(plan, "smem", 0) or 0)
        rc = self.lib.emu_run(self.index[plan.name], ctypes.c_uint(plan.grid), ctypes.c_uint(threads), sel,
                              ctypes.c_uint(0 if blocks is None else len(blocks)), ctypes.c_uint(smem), args)
        if rc != 0:
            raise RuntimeError(f"{plan.name}: {self.lib.emu_error().decode()}")

    def trace(self, plan, threads: int, tensors: tuple[torch.Tensor, ...], blocks: list[int] | None = None) -> dict:
        """Run ``plan`` and count its global accesses; ``tensors`` are its three pointer arguments."""
        self.lib.emu_trace_begin(*_ranges(tensors))
        stats = Stats()
        try:
            self.launch(plan, threads, blocks)
        finally:
            self.lib.emu_trace_end(ctypes.byref(stats))
        return stats.as_dict()


def _ranges(tensors: tuple[torch.Tensor, ...]) -> list:
    """(start, bytes) of each tensor's memory from its data pointer to the end of its storage."""
    out = []
    for t in tensors:
        start = t.data_ptr()
        end = t.untyped_storage().data_ptr() + t.untyped_storage().nbytes()
        out += [ctypes.c_void_p(start), ctypes.c_size_t(end - start)]
    return out


def build(names: list[str], workdir: Path, source: Path, opt: str = "-O1") -> Emulator:
    """Compile ``source`` (an ``involution.cu``) with the shim and a wrapper per name expression."""
    if shutil.which("g++") is None:
        raise FileNotFoundError("g++ not found")
    lines = [f'#include "{SHIM}"', "#define REDNET_HOST_EMULATION", f'#include "{source}"']
    lines += [f"static void emu_k{i}(void** a) {{ emu_call(&{n}, a); }}" for i, n in enumerate(names)]
    lines.append("static void (*const emu_kernels[])(void**) = {" + ", ".join(f"emu_k{i}" for i in range(len(names)))
                 + "};")
    lines.append('extern "C" int emu_run(int k, unsigned grid, unsigned threads, const unsigned* blocks, '
                 "unsigned nblocks, unsigned smem, void** args) { return emu_launch_blocks(emu_kernels[k], grid, "
                 "threads, blocks, nblocks, smem, args); }")
    cpp, so = workdir / "emu.cpp", workdir / "emu.so"
    cpp.write_text("\n".join(lines) + "\n")
    cmd = ["g++", "-std=c++20", opt, "-shared", "-fPIC", "-w", str(cpp), "-o", str(so)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"g++ failed:\n{res.stderr[-4000:]}")
    return Emulator(ctypes.CDLL(str(so)), names)
