#!/usr/bin/env python
"""Static evidence for the CUDA involution kernels, without a GPU.

    python tools/kernel_report.py --side before=<rev> --side after=worktree --output benchmarks/results/<date>-static

For each side (the kernel source, compile options and launch plans of a git revision, or of
the working tree):

- per kernel instantiation RedNet uses (fp32, bf16, fp16 x its three windows x both memory
  formats x three passes), compiled for sm_90 the way the runtime compiles it (NVRTC through
  CuPy with ``_cupy.COMPILE_OPTIONS``, rednet/analysis/sass.py): registers, spills (stack bytes and
  local-memory instructions), shared memory, resident blocks per SM, the global and shared
  memory instructions in the SASS by width, and the instructions each thread executes (the
  SASS with every loop counted its trip count, rednet/analysis/sass.py);
- per RedNet-50 involution shape (batch 64, 224 px) and pass: the launches the revision's plan
  makes, and from them two lower bounds on time for an H100 SXM and an H200 SXM: the memory
  floor (each tensor the pass reads or writes moved once, at the datasheet bandwidth) and the
  issue bound (warp instructions executed / (SMs x 4 per cycle x boost clock));
- per shape and pass (bf16): the bytes the kernel's access pattern fetches, counted on the
  host emulation of the same source (rednet/analysis/cuda_emu.h) running the exact launch plans of that
  revision on evenly spaced sample blocks (batch 1; every count scales with the batch): the
  distinct 32-byte sectors each block touches, i.e. L2 -> SM traffic if L1 keeps a block's own
  reuse, the thread-level load instructions per output element, and the share of each fetched
  sector the requests use.

Nothing here is a timing; the report says what each number assumes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

from rednet.analysis import cuda_emu, sass
from rednet.analysis.shapes import involution_shapes
from rednet.engine import run_command
from rednet.ops import involution_output_size
from rednet.tools._options import add_option

ROOT = Path(__file__).resolve().parents[1]  # the checkout, whose git history gives the sides

REDNET_WINDOWS = [(3, 1, 1), (7, 1, 1), (7, 2, 1)]  # (K, stride, dilation)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("fwd", "bwd_input", "bwd_kernel")
TYPE_SIZES = {"float": 4, "bf16_t": 2, "half_t": 2, "double": 8}
FORMATS = ("nchw", "nhwc")
BATCH = 64  # every estimate is for this batch; the emulation runs batch 1 and scales
ARCH = "90"
# sm_90: registers and shared memory per SM, resident threads and blocks, shared memory the
# system reserves per block, warp instructions issued per cycle (4 schedulers).
SM90 = {"regs": 65536, "smem": 228 * 1024, "threads": 2048, "blocks": 32, "reserved_smem": 1024, "issue": 4}
# Datasheet figures (NVIDIA H100 and H200 Tensor Core GPU datasheets; SM count from the Hopper
# architecture whitepaper): both SXM parts have 132 SMs and 67 TFLOPS FP32 = 132 SMs x 128
# lanes x 2 FLOP x clock, i.e. a 1.98 GHz boost clock; HBM 3.35 TB/s (H100, HBM3) and 4.8 TB/s
# (H200, HBM3e).
GPUS = {"H100": {"name": "H100 SXM", "sms": 132, "ghz": 1.98, "tbps": 3.35},
        "H200": {"name": "H200 SXM", "sms": 132, "ghz": 1.98, "tbps": 4.8}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# The two sides: a revision's kernel source, compile options and launch plans.


def _worktree_rev() -> str:
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "rednet/ops"], capture_output=True, text=True).stdout
    return f"worktree at {head}" + (" with changes in rednet/ops" if dirty.strip() else "")


class Side:
    def __init__(self, label: str, rev: str | None, workdir: Path):
        self.label, self.rev = label, rev or _worktree_rev()
        ops = ROOT / "rednet" / "ops"
        files = ("involution.cu", "_plan.py", "_cupy.py")
        if rev is None:
            paths = {n: ops / n for n in files}
        else:
            d = workdir / label
            d.mkdir()
            paths = {n: d / n for n in files}
            for name, path in paths.items():
                text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:rednet/ops/{name}"], check=True,
                                      capture_output=True, text=True).stdout
                path.write_text(text)
        self.source = paths["involution.cu"]
        self.options = sass.runtime_options(paths["_cupy.py"].read_text())
        # Named inside rednet.ops so that its relative imports (_memory_format) resolve there.
        spec = importlib.util.spec_from_file_location(f"rednet.ops._kernel_report_plan_{label}", paths["_plan.py"])
        self.plan: ModuleType = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.plan)

    def names(self, dtypes) -> list[str]:
        return [n for dt in dtypes for w in REDNET_WINDOWS for n in self.plan.name_expressions(dt, *w)]


# ----------------------------------------------------------------------------------------
# Compiler evidence: the binary the runtime builds.


def compile_side(side: Side, names: list[str], workdir: Path) -> dict[str, dict]:
    """Per name expression: resources, SASS (with source lines) and its static instruction counts."""
    src = side.source.read_text()
    binary, lowered = sass.compile_nvrtc(src, names, side.options, ARCH)
    lined, lowered2 = sass.compile_nvrtc(src, names, side.options, ARCH, extra=("-lineinfo",))
    d = workdir / f"sass-{side.label}"
    d.mkdir()
    (d / "exact.cubin").write_bytes(binary)
    (d / "lines.cubin").write_bytes(lined)
    res = sass.resources(d / "exact.cubin")
    exact, with_lines = sass.disassemble(d / "exact.cubin"), sass.disassemble(d / "lines.cubin")
    out = {}
    for name in names:
        fn, fl = exact[lowered[name]], with_lines[lowered2[name]]
        if not sass.same_code(fn, fl):
            raise RuntimeError(f"{name}: the -lineinfo build's code differs; cannot attribute lines")
        for a, b in zip(fn.instrs, fl.instrs):
            a.line = b.line
        for lp in fn.loops:
            lp.lines = frozenset(x.line for x in fn.loop_instrs(lp) if x.line is not None)
        r = res[lowered[name]]
        counts: dict[str, int] = {}
        for ins in fn.instrs[:fn.main_end]:
            if ins.base in ("LDG", "STG", "LDS", "STS", "LDGSTS"):
                key = f"{ins.base}.{ins.width()}"
            elif ins.base in ("SHFL", "BAR", "LDL", "STL"):
                key = ins.base
            else:
                continue
            counts[key] = counts.get(key, 0) + 1
        out[name] = {**r, "sass": counts, "static_instructions": sum(1 for x in fn.instrs[:fn.main_end]
                                                                     if x.base != "NOP"),
                     "fn": fn}
    return out


def blocks_per_sm(registers: int, smem: int, threads: int) -> int:
    """Resident blocks on an sm_90 SM as registers (allocated per warp in units of 256),
    shared memory and the thread and block limits allow."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = (SM90["regs"] // per_warp) // warps if per_warp else SM90["blocks"]
    by_smem = SM90["smem"] // (smem + SM90["reserved_smem"])
    return min(by_regs, by_smem, SM90["threads"] // threads, SM90["blocks"])


# ----------------------------------------------------------------------------------------
# Instructions executed: the trip count of each SASS loop.
#
# A loop is recognised by the source of its instructions that no inner loop holds (the SASS
# keeps the loop's own instructions together; nvdisasm -g names their lines), and its trip
# count per thread comes from the launch. A loop no rule recognises is an error, not a guess.


def _log2(n: int) -> int:
    return max(0, int(math.log2(n)))


class TripRules:
    """Trip counts for the loops of one kernel launched for one shape."""

    def __init__(self, side: Side, name: str, fn: sass.Function, launch, shape: dict, dtype: torch.dtype):
        self.side, self.name, self.fn, self.launch = side, name, fn, launch
        self.lines = side.source.read_text().splitlines()
        c, g, k = shape["C"], shape["G"], shape["K"]
        self.cg, self.g, self.kk, self.size = c // g, g, k * k, dtype.itemsize
        self.params = dict(zip(_param_names(side, name), (int(a) for a in launch.args)))
        self.params["slots"] = getattr(side.plan, "NHWC_SLOTS", 0)

    def text(self, instrs) -> str:
        return "\n".join(sorted({self.lines[x.line - 1] for x in instrs if x.line}))

    def __call__(self, loop: sass.Loop) -> float:
        own = self.fn.exclusive(loop)
        body = self.fn.loop_instrs(loop)
        text = self.text(own)
        ops = self.fn.ops(own)
        p = self.params
        if ops.get("BAR"):  # the NCHW channel loop: one barrier per channel of the group
            return self.cg
        if "for (int m = tpi >> 1" in text:  # the xor-shuffle sum over an item's threads
            return _log2(p["tpi"])
        # NHWC vector kernels (issue 18): move_rows, a warp per patch row of each of the block's
        # patches, 4 lanes per pixel along its 32-bit words.
        if "for (int p = 0; p < s.ppb" in text:
            return p["slots"] // (p["gb"] * self.size)
        if "for (int e = part; e < nw; e += 4)" in text:
            return -(-(p["gb"] * self.kk * self.size // 4) // 4)
        if "const bool row_ok = (unsigned)(a0 + Win::off(ER, u))" in text:  # grad_input's tap rows (fp32, fp64)
            return int(re.search(r", (\d+), \d+, \d+>", self.name).group(1))  # K
        # Before issue 18.
        if "for (int px = threadIdx.x / 32" in text:  # kernel_rows: a warp per pixel of the patch
            return self._rows_trips(body)
        if "for (int e = lane" in text:  # kernel_rows, lanes along a pixel's row: unrolled, runs only for
            return 0  # >= 4 units a lane, which these rows never have (_rows_skip checks)
        raise ValueError(f"{self.name}: no trip-count rule for the SASS loop at instructions "
                         f"{loop.start}-{loop.end}, source:\n{text}")


    # The pre-issue-18 NHWC kernels copy a block's kernel rows a warp per pixel (kernel_rows),
    # lanes along the row in 32-bit words when it is aligned, else 16-bit values; ptxas unrolls
    # the lane loop: a prologue for (units % 4), then blocks of 16, 8 and 4 behind a branch
    # taken when fewer than 4 units are left.
    def _rows(self) -> tuple[bool, int]:
        p = self.params
        n = p["gb"] * self.kk
        words = (n * self.size) % 4 == 0 and (self.g * self.kk * self.size) % 4 == 0
        units = n * self.size // (4 if words else 2)
        return words, -(-units // 32)  # units a lane copies, the worst lane of the warp

    def _rows_trips(self, body) -> float:
        words, _ = self._rows()
        widths = {x.width() for x in body if x.base in ("LDG", "STG")}
        if not (32 in widths if words else 16 in widths):  # the other path's loop
            return 0
        npx = self.side.plan.THREADS // (self.params["tpi"] * self.params["gb"])
        return -(-npx // (self.side.plan.THREADS // 32))

    def skipped(self) -> list[tuple[int, int]]:
        """Code the launch skips: kernel_rows' unrolled blocks when a lane copies fewer than 4 units."""
        out = []
        _, per_lane = self._rows() if "tpi" in self.params else (None, 0)
        for loop in self.fn.loops:
            if "for (int px = threadIdx.x / 32" not in self.text(self.fn.exclusive(loop)) or per_lane >= 4:
                continue
            body = list(range(loop.start, loop.end + 1))
            first_copy = next(i for i in body if self.fn.instrs[i].base in ("STS", "STG"))
            sync = next(i for i in body if i > first_copy and self.fn.instrs[i].base == "BSYNC")
            at = next(i for i in body if i > sync and self.fn.instrs[i].base == "BRA")
            guard = self.fn.instrs[at]
            if not (at - sync <= 3 and guard.pred and guard.target is not None and at < guard.target <= loop.end):
                raise ValueError(f"{self.name}: kernel_rows copy loop is not laid out as expected")
            out.append((at + 1, guard.target - 1))
        return out


def _param_names(side: Side, name: str) -> list[str]:
    """Parameter names of a kernel, read from its definition in the side's source."""
    kernel = name.split("<")[0]
    src = side.source.read_text()
    m = re.search(rf"\b{kernel}\(\s*(.*?)\)\s*\{{", src, re.S)
    if not m:
        raise ValueError(f"{kernel} not found in {side.source}")
    return [re.split(r"[\s*&]+", a.strip())[-1] for a in m.group(1).split(",")]


# ----------------------------------------------------------------------------------------
# Launches per RedNet-50 shape at batch BATCH, and the time bounds.


def _tensors(s: dict, fmt: str, dtype: torch.dtype, batch: int, fill: bool):
    k, st = s["K"], s["stride"]
    pad = (k - 1) // 2
    ho, wo = (involution_output_size(n, k, st, pad, 1) for n in (s["H"], s["W"]))
    mf = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
    make = (lambda *sh: torch.randn(*sh).to(dtype)) if fill else (lambda *sh: torch.empty(*sh, dtype=dtype))
    x = make(batch, s["C"], s["H"], s["W"]).contiguous(memory_format=mf)
    gen = make(batch, s["G"] * k * k, ho, wo).contiguous(memory_format=mf)
    go = make(batch, s["C"], ho, wo).contiguous(memory_format=mf)
    return x, gen.view(batch, s["G"], k, k, ho, wo), go, st, pad


def _plans(plan: ModuleType, pas: str, x, kernel, go, st, pad) -> list[tuple]:
    """[(launch, output)] of one pass: whatever launches the revision's plan makes for it."""
    if pas == "fwd":
        out, launch = plan.plan_forward(x, kernel, st, pad, 1)
    elif pas == "bwd_input":
        out, launch = plan.plan_backward_input(go, x, kernel, st, pad, 1)
    else:
        out, launch = plan.plan_backward_kernel(go, x, kernel, st, pad, 1)
    launches = launch if isinstance(launch, (list, tuple)) and not hasattr(launch, "name") else [launch]
    return [(lc, out) for lc in launches if lc is not None]


def _floor_bytes(s: dict, pas: str, elem: int) -> int:
    """Bytes of each tensor the pass must read or write once, at batch BATCH."""
    k, st = s["K"], s["stride"]
    pad = (k - 1) // 2
    ho, wo = (involution_output_size(n, k, st, pad, 1) for n in (s["H"], s["W"]))
    x = BATCH * s["C"] * s["H"] * s["W"] * elem
    y = BATCH * s["C"] * ho * wo * elem
    w = BATCH * s["G"] * k * k * ho * wo * elem
    return {"fwd": x + w + y, "bwd_input": y + w + x, "bwd_kernel": y + x + w, "bwd": y + x + w + x + w}[pas]


def _macs(s: dict) -> int:
    """Multiply-adds of one pass at batch BATCH: every output element times K*K taps (padding taps included)."""
    k, st = s["K"], s["stride"]
    pad = (k - 1) // 2
    ho, wo = (involution_output_size(n, k, st, pad, 1) for n in (s["H"], s["W"]))
    return BATCH * s["C"] * ho * wo * k * k


def issue_side(side: Side, kernels: dict[str, dict]) -> list[dict]:
    """Per RedNet-50 shape, layout, pass and dtype: the launches' instructions and the two bounds."""
    rows = []
    for dname, dtype in DTYPES.items():
        for s in involution_shapes("rednet50", 224):
            for fmt in FORMATS:
                x, kernel, go, st, pad = _tensors(s, fmt, dtype, BATCH, fill=False)
                for pas in PASSES:
                    launches = []
                    for launch, _ in _plans(side.plan, pas, x, kernel, go, st, pad):
                        k = kernels[launch.name]
                        rules = TripRules(side, launch.name, k["fn"], launch, s, dtype)
                        counts = k["fn"].executed(rules, rules.skipped())
                        threads = launch.grid * side.plan.THREADS
                        smem = k["smem"] + int(getattr(launch, "smem", 0) or 0)
                        launches.append({"kernel": launch.name, "grid": launch.grid, "threads": threads,
                                         "smem": smem, "blocks_per_sm": blocks_per_sm(k["registers"], smem,
                                                                                      side.plan.THREADS),
                                         **{f"per_thread_{key}": v for key, v in counts.items()}})
                    rows.append(_issue_row(s, dname, dtype, fmt, pas, launches))
    return rows


def _issue_row(s: dict, dname: str, dtype: torch.dtype, fmt: str, pas: str, launches: list[dict]) -> dict:
    warp_instr = sum(lc["per_thread_instructions"] * lc["threads"] / 32 for lc in launches)
    smem_wavefronts = sum(lc["per_thread_smem_wavefronts"] * lc["threads"] / 32 for lc in launches)
    fma = sum(lc["per_thread_fma"] * lc["threads"] for lc in launches)
    floor = _floor_bytes(s, pas, dtype.itemsize)
    row = {"shape": f"{s['C']}x{s['H']}x{s['W']} K{s['K']} s{s['stride']} G{s['G']}", "name": s["name"],
           "count": s["count"], "dtype": dname, "layout": fmt, "pass": pas, "launches": launches,
           "warp_instructions": warp_instr, "macs": _macs(s), "fma_issued": fma, "floor_bytes": floor,
           "smem_wavefronts": smem_wavefronts}
    for gpu, hw in GPUS.items():
        clk = hw["sms"] * hw["ghz"] * 1e3  # SM-cycles per microsecond, all SMs
        row[f"issue_us_{gpu}"] = warp_instr / (SM90["issue"] * clk)
        row[f"smem_us_{gpu}"] = smem_wavefronts / clk
        row[f"floor_us_{gpu}"] = floor / (hw["tbps"] * 1e6)
    return row


# ----------------------------------------------------------------------------------------
# Access pattern on the host emulation.


def trace_side(side: Side, emu: cuda_emu.Emulator, samples: int) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    for s in involution_shapes("rednet50", 224):
        for fmt in FORMATS:
            torch.manual_seed(0)
            x, kernel, go, st, pad = _tensors(s, fmt, dtype, 1, fill=True)
            for pas in PASSES:
                total: dict = {}
                for launch, out in _plans(side.plan, pas, x, kernel, go, st, pad):
                    n = min(samples, launch.grid)
                    blocks = sorted({round(i * (launch.grid - 1) / max(1, n - 1)) for i in range(n)})
                    stats = emu.trace(launch, side.plan.THREADS, (*launch.keep, out), blocks)
                    scale = launch.grid / len(blocks) * BATCH  # sampled blocks -> whole grid -> batch
                    _accumulate(total, stats, scale)
                    total.setdefault("kernels", []).append(launch.name)
                    total["out_elems"] = out.numel() * BATCH
                rows.append(_access_row(s, fmt, pas, total, dtype.itemsize))
                log(f"  {side.label} {s['name']:<12} {fmt} {pas:<10} {rows[-1]['est_mb']:9.1f} MB "
                    f"(floor {rows[-1]['floor_mb']:.1f})")
    return rows


def _accumulate(total: dict, stats: dict, scale: float) -> None:
    for key in ("threads", "storing_threads"):
        total[key] = total.get(key, 0.0) + stats[key] * scale
    for kind in ("load", "store"):
        t = total.setdefault(kind, {"requests": 0.0, "sectors": 0.0, "used": 0.0, "accesses": 0.0,
                                    "block_sectors": [0.0] * 4, "by_width": {}})
        st = stats[kind]
        t["requests"] += st["requests"] * scale
        t["sectors"] += st["sectors"] * scale
        t["used"] += st["used_bytes"] * scale
        for b, c in st["accesses_by_bytes"].items():
            t["accesses"] += c * scale
            if c:
                t["by_width"][b * 8] = t["by_width"].get(b * 8, 0.0) + c * scale
        t["block_sectors"] = [a + b * scale for a, b in zip(t["block_sectors"], st["block_sectors"])]


def _access_row(s: dict, fmt: str, pas: str, t: dict, elem: int) -> dict:
    est = 32 * (sum(t["load"]["block_sectors"]) + sum(t["store"]["block_sectors"]))
    floor = _floor_bytes(s, pas, elem)
    return {
        "shape": f"{s['C']}x{s['H']}x{s['W']} K{s['K']} s{s['stride']} G{s['G']}", "name": s["name"],
        "count": s["count"], "layout": fmt, "pass": pas, "kernels": t["kernels"],
        "floor_mb": floor / 1e6, "est_mb": est / 1e6, "x_floor": est / floor,
        "est_mb_by_arg": [32 * (a + b) / 1e6 for a, b in zip(t["load"]["block_sectors"], t["store"]["block_sectors"])],
        "loads_per_elem": t["load"]["accesses"] / t["out_elems"],
        "load_widths": {str(k): v / t["out_elems"] for k, v in sorted(t["load"]["by_width"].items())},
        "load_sector_use": t["load"]["used"] / (32 * t["load"]["sectors"]) if t["load"]["sectors"] else None,
        "store_sector_use": t["store"]["used"] / (32 * t["store"]["sectors"]) if t["store"]["sectors"] else None,
        "load_requests_per_elem": t["load"]["requests"] / t["out_elems"],
        "storing_threads": t["storing_threads"] / t["threads"],
    }


# ----------------------------------------------------------------------------------------
# Report.


def _kernel_key(name: str) -> tuple:
    """(kind, path, dtype, window) of a name expression, e.g. ('fwd', 'nhwc', 'bf16_t', '7,2,1')."""
    m = re.match(r"involution_(fwd|bwd_input|bwd_kernel)_(\w+)<(\w+), (\d+), (\d+), (\d+)>", name)
    return m.group(1), m.group(2), m.group(3), f"{m.group(4)},{m.group(5)},{m.group(6)}"


def _sass_str(counts: dict, op: str) -> str:
    parts = [f"{counts[k]}x{k.split('.')[1]}" for k in sorted(counts, key=lambda k: int(k.split(".")[1]) if "."
                                                                in k else 0) if k.startswith(op + ".")]
    return " ".join(parts) or "-"


def _step(rows: list[dict], dname: str, fmt: str, passes=PASSES) -> dict:
    sel = [r for r in rows if r["dtype"] == dname and r["layout"] == fmt and r["pass"] in passes]
    out = {k: sum(r[k] * r["count"] for r in sel) for k in ("warp_instructions", "macs", "fma_issued",
                                                           "floor_bytes", "smem_wavefronts")}
    for gpu in GPUS:
        for k in ("issue_us", "smem_us", "floor_us"):
            out[f"{k}_{gpu}"] = sum(r[f"{k}_{gpu}"] * r["count"] for r in sel)
    return out


def _per_kernel(report: dict, label: str) -> dict[str, dict]:
    """Per kernel name: the dynamic counts of its first RedNet-50 launch (C/G = 16 everywhere)."""
    out: dict[str, dict] = {}
    for r in report["issue"][label]:
        for lc in r["launches"]:
            if lc["kernel"] not in out:
                out[lc["kernel"]] = {**lc, "macs_per_thread": r["macs"] / sum(x["threads"] for x in r["launches"])}
    return out


def markdown(report: dict) -> str:
    labels = list(report["sides"])
    acc = {lb: {(r["shape"], r["layout"], r["pass"]): r for r in report["access"][lb]} for lb in labels}
    iss = {lb: {(r["dtype"], r["shape"], r["layout"], r["pass"]): r for r in report["issue"][lb]} for lb in labels}
    h100, h200 = GPUS["H100"], GPUS["H200"]

    def cols(name):
        return " | ".join(f"{name} {lb}" for lb in labels)
    out = [f"# Static kernel evidence, {report['date']}", "",
           "No GPU was used. Kernel sources: " + ", ".join(f"{k} = `{v['rev']}` (NVRTC options "
                                                          f"`{' '.join(v['options'])}`)"
                                                          for k, v in report["sides"].items())
           + f". Command: `{report['command']}`.", "",
           f"Nothing below is a timing. Every kernel is compiled as the runtime compiles it: NVRTC {report['nvrtc']} "
           f"through CuPy {report['cupy']} with the revision's `_cupy.COMPILE_OPTIONS`, to which CuPy adds "
           f"`-arch=sm_{ARCH} --device-as-default-execution-space` (rednet/analysis/sass.py). Registers, spills and "
           "instructions are read from that cubin (`cuobjdump -res-usage`, `nvdisasm`).", ""]

    out += ["## Summary: RedNet-50 training step, involution kernels only", "",
            f"Batch {BATCH}, 224 px: forward + grad_input + grad_kernel of every involution layer (each shape times "
            "its count in the network). Two lower bounds on the time, per GPU:", "",
            f"- **floor**: each tensor each pass reads or writes moved once, at the datasheet bandwidth "
            f"({h100['name']} {h100['tbps']} TB/s, {h200['name']} {h200['tbps']} TB/s);",
            "- **issue**: the warp instructions the launches execute (SASS instructions executed per thread x "
            f"threads launched / 32) at 4 per cycle per SM, {h100['sms']} SMs at {h100['ghz']} GHz on both GPUs "
            "(so the issue bound is the same for both; how it is counted and what it leaves out: see the end).", "",
            f"| dtype | layout | floor ms {h100['name']} | floor ms {h200['name']} | {cols('issue ms')} | "
            f"{cols('issue/floor (H100)')} | {cols('instr/MAC')} |", "|" + "---|" * (4 + 3 * len(labels))]
    for dname in DTYPES:
        for fmt in FORMATS:
            steps = {lb: _step(report["issue"][lb], dname, fmt) for lb in labels}
            last = steps[labels[-1]]
            out.append(f"| {dname} | {fmt} | {last['floor_us_H100'] / 1e3:.2f} | {last['floor_us_H200'] / 1e3:.2f} | "
                       + " | ".join(f"{steps[lb]['issue_us_H100'] / 1e3:.2f}" for lb in labels) + " | "
                       + " | ".join(f"{steps[lb]['issue_us_H100'] / steps[lb]['floor_us_H100']:.2f}"
                                    for lb in labels) + " | "
                       + " | ".join(f"{32 * steps[lb]['warp_instructions'] / steps[lb]['macs']:.2f}"
                                    for lb in labels) + " |")
    out += ["", "instr/MAC: thread instructions executed per multiply-add the pass needs (every output element "
            "times K*K taps); a tap of one kernel value on 16 bytes of bf16 channels is 8 multiply-adds.", ""]

    out += ["Per pass (bf16, the sum over the network's shapes):", "",
            f"| layout | pass | floor us H100 | floor us H200 | {cols('issue us')} | {cols('smem us')} | "
            f"{cols('est. MB')} | floor MB |", "|" + "---|" * (5 + 3 * len(labels))]
    for fmt in FORMATS:
        for pas in PASSES:
            steps = {lb: _step(report["issue"][lb], "bf16", fmt, (pas,)) for lb in labels}
            last = steps[labels[-1]]
            ests = [sum(r["est_mb"] * r["count"] for r in report["access"][lb]
                        if r["layout"] == fmt and r["pass"] == pas) for lb in labels]
            out.append(f"| {fmt} | {pas} | {last['floor_us_H100']:.0f} | {last['floor_us_H200']:.0f} | "
                       + " | ".join(f"{steps[lb]['issue_us_H100']:.0f}" for lb in labels) + " | "
                       + " | ".join(f"{steps[lb]['smem_us_H100']:.0f}" for lb in labels) + " | "
                       + " | ".join(f"{e:.0f}" if e else "-" for e in ests) + f" | {last['floor_bytes'] / 1e6:.0f} |")
    both = sum(_floor_bytes(sh, "bwd", 2) / 1e6 * sh["count"] for sh in involution_shapes("rednet50", 224))
    two = sum(_floor_bytes(sh, p, 2) / 1e6 * sh["count"] for sh in involution_shapes("rednet50", 224)
              for p in ("bwd_input", "bwd_kernel"))
    out += ["", f"Backward floor with both gradients from one kernel: {both:.0f} MB per layout; as two kernels "
            f"(bwd_input + bwd_kernel): {two:.0f} MB, the difference being grad_y read twice "
            f"({100 * (two - both) / both:.0f}% of the fused floor)."]
    out += ["", "smem us: the shared-memory pipe's bound, another lower bound not added to the issue bound: each "
            "warp-level LDS, STS or LDGSTS takes max(1, bits/32) cycles of the SM's 128-byte-per-cycle pipe "
            "(no bank conflicts assumed). est. MB: the L2 -> SM estimate of the access pattern (below)."]

    out += ["", "## Kernels (sm_90, as NVRTC builds them)", "",
            "Static: registers, stack bytes (spills; `local` counts the local-memory instructions), static shared "
            "memory, SASS instruction count, global and shared memory instructions by width. Dynamic, per thread, "
            "for the first RedNet-50 launch of the kernel (C/G = 16): instructions executed, of them multiply-adds "
            "(FFMA/DFMA), instructions per multiply-add of the pass (idle lanes included), per tap (one kernel value "
            "on 16 bytes of channels: 8 multiply-adds in bf16/fp16, 4 in fp32, whatever the layout), and blocks/SM "
            "with the launch's dynamic shared memory. Kernels RedNet-50 does not launch have no dynamic columns.", "",
            "| kernel | dtype | K,S,D | side | regs | stack B | local | smem B | SASS | instr/thread | FMA/thread | "
            "instr/MAC | instr/tap | blocks/SM | LDG (count x bits) | STG | LDS | STS | LDGSTS | SHFL | BAR |",
            "|" + "---|" * 21]
    rows = [(_kernel_key(name), labels.index(side), side, name, v) for side, res in report["resources"].items()
            for name, v in res.items()]
    dyn = {lb: _per_kernel(report, lb) for lb in labels}
    for (kind, path, t, win), _, side, name, v in sorted(rows, key=lambda r: (r[0], r[1])):
        counts = v.get("sass", {})
        d = dyn[side].get(name)
        dyn_cols = ("-", "-", "-", "-", str(blocks_per_sm(v["registers"], v["smem"], 256)))
        if d:
            per_mac = d["per_thread_instructions"] / d["macs_per_thread"]
            dyn_cols = (f"{d['per_thread_instructions']:.0f}", f"{d['per_thread_fma']:.0f}", f"{per_mac:.2f}",
                        f"{per_mac * 16 / TYPE_SIZES[t]:.0f}", str(d["blocks_per_sm"]))
        out.append(f"| {kind}_{path} | {t} | {win} | {side} | {v['registers']} | {v['stack']} | "
                   f"{counts.get('LDL', 0) + counts.get('STL', 0)} | {v['smem']} | {v['static_instructions']} | "
                   + " | ".join(dyn_cols) + " | "
                   f"{_sass_str(counts, 'LDG')} | {_sass_str(counts, 'STG')} | {_sass_str(counts, 'LDS')} | "
                   f"{_sass_str(counts, 'STS')} | {_sass_str(counts, 'LDGSTS')} | {counts.get('SHFL', 0)} | "
                   f"{counts.get('BAR', 0)} |")

    out += ["", f"## Per shape and pass (bf16, batch {BATCH}, 224 px, RedNet-50)", "",
            "issue us: the issue bound of the pass's launches (H100 = H200). floor us: the memory floor on each GPU. "
            "est. MB: distinct 32-byte sectors each block touches, summed over blocks (L2 -> SM bytes when L1 keeps a "
            "block's own reuse and nothing else; estimated from sampled blocks on the host emulation; below the floor "
            "where a pass never reads the kernel taps that fall in the padding). loads/elem: thread-level global load "
            "instructions per output element. sector use: of the sectors a warp-level load request touches, the "
            "share of bytes it uses (lanes reading the same bytes count once).", "",
            f"| shape | stage | layout | pass | floor us H100 | floor us H200 | {cols('issue us')} | "
            f"{cols('instr/MAC')} | {cols('x floor (bytes)')} | {cols('loads/elem')} | {cols('sector use')} |",
            "|" + "---|" * (6 + 5 * len(labels))]
    keys = [k for k in iss[labels[-1]] if k[0] == "bf16"]

    def f(table, lb, key, field, fmt, scale=1.0):
        v = table[lb].get(key, {}).get(field)
        return "-" if v is None else format(v * scale, fmt)
    for key in keys:
        r = iss[labels[-1]][key]
        akey = key[1:]
        out.append(f"| {r['shape']} | {r['name']} | {r['layout']} | {r['pass']} | {r['floor_us_H100']:.1f} | "
                   f"{r['floor_us_H200']:.1f} | "
                   + " | ".join(f(iss, lb, key, "issue_us_H100", ".1f") for lb in labels) + " | "
                   + " | ".join(f"{32 * iss[lb][key]['warp_instructions'] / iss[lb][key]['macs']:.2f}"
                                if key in iss[lb] else "-" for lb in labels) + " | "
                   + " | ".join(f(acc, lb, akey, "x_floor", ".2f") for lb in labels) + " | "
                   + " | ".join(f(acc, lb, akey, "loads_per_elem", ".2f") for lb in labels) + " | "
                   + " | ".join(f(acc, lb, akey, "load_sector_use", ".2f") for lb in labels) + " |")
    out += ["", METHOD]
    return "\n".join(out) + "\n"


METHOD = """## How the issue bound is counted, and what it leaves out

Instructions executed per thread come from the SASS of the binary (rednet/analysis/sass.py): each
instruction outside a loop counts once; one inside loops counts the product of their trip
counts, each taken from the launch (the NCHW channel loop: C/G; the shuffle sum: log2 of the
threads per item; copy loops: their iterations, the worst lane of a warp). The -lineinfo build,
checked to be the same code, names each loop's source, so that a loop no rule knows is an error,
not a guess. A conditional branch around code counts that code (a warp issues it if any lane
takes it); of an if-else, only the side that executes more counts, since the kernels' if-else
conditions are launch parameters, the same for every lane (ptxas versioned the pre-issue-18
NHWC grad_kernel on its threads per item, and the copy of its kernel rows on 32- or 16-bit
units). The unrolled blocks of a copy loop that a lane with fewer than 4 units never enters are
not counted. Threads outside the map and warps whose threads all exit early are charged the full
path.

Time = warp instructions / (SMs x 4 x clock): every scheduler issuing every cycle. The figures:
an H100 SXM and an H200 SXM both have 132 SMs (NVIDIA Hopper architecture whitepaper) of 4
schedulers and 128 FP32 lanes, and 67 TFLOPS FP32 (NVIDIA H100 and H200 datasheets), i.e. a
boost clock of 67e12 / (132 x 128 x 2) = 1.98 GHz; HBM bandwidth 3.35 TB/s (H100, HBM3) and
4.8 TB/s (H200, HBM3e) for the floors. The bound is the best case and leaves out, in order of
likely size:

- stalls: memory latency not hidden (occupancy, loads in flight), barriers, shared-memory bank
  conflicts, dependent-issue latency; a kernel whose warps wait is slower than both bounds;
- pipe throughput: sm_90 issues one warp instruction per scheduler per cycle, but some pipes
  are narrower (integer ALU ops such as LOP3, SHF, IADD3, PRMT run at half rate, 16 lanes per
  scheduler; MUFU, conversions and shuffles slower still), so an ALU-heavy mix is slower than
  its instruction count says; `smem us` bounds the shared-memory pipe separately;
- the clock: 1.98 GHz is the boost clock the datasheet's FP32 rate implies; under a sustained
  700 W load the clock can sit lower (every issue bound scales with 1/clock);
- overlap: the floor and the issue bound are separate lower bounds; the time is at least their
  maximum, and nearer their sum when a kernel does not overlap memory and compute;
- warps that exit early (outside the map) are charged the full path: an overestimate where
  tiles overhang the map (the 7x7, 14x14 and 28x28 maps); an if-else whose condition differs
  between the lanes of a warp runs both sides: an underestimate (no kernel here has one in its
  taps);
- launch overhead (a few us per launch, 48 launches a step) is not counted.

The issue bound itself is uncertain by about +-15% (the clock; early exits; branch sides); the
time a GPU measures can be well above it for the stall and pipe reasons.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", action="append", metavar="LABEL=REV",
                   help="kernels to report: a git revision, or 'worktree' (default: after=worktree); repeat to "
                        "compare, e.g. --side before=<rev> --side after=worktree")
    add_option(p, "--output", old=("--out",), type=Path, metavar="OUT",
               help="write OUT.json and OUT.md (default: print the markdown)")
    p.add_argument("--samples", type=int, default=24, help="blocks emulated per launch (evenly spaced)")
    p.add_argument("--no-access", action="store_true", help="compiler evidence only (skip the emulation)")
    return p


_KEPT = ("kernel", "grid", "threads", "smem", "blocks_per_sm", "per_thread_instructions", "per_thread_fma",
         "per_thread_smem_wavefronts", "per_thread_local")


def _json_ready(report: dict) -> dict:
    out = dict(report)
    out["issue"] = {lb: [{**r, "launches": [{k: lc[k] for k in _KEPT} for lc in r["launches"]]} for r in rows]
                    for lb, rows in report["issue"].items()}
    out["resources"] = {lb: {n: {k: v for k, v in r.items() if k != "fn"} for n, r in res.items()}
                        for lb, res in report["resources"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _report(args, argv))


def _report(args: argparse.Namespace, argv: list[str] | None) -> int:
    import cupy  # the runtime's compile path; CuPy is required here
    from cupy.cuda import compiler
    report = {"date": dt.date.today().isoformat(), "command": "python tools/kernel_report.py "
              + " ".join(argv if argv is not None else sys.argv[1:]),
              "nvrtc": ".".join(map(str, compiler._get_nvrtc_version())), "cupy": cupy.__version__, "arch": ARCH,
              "batch": BATCH, "gpus": GPUS, "sides": {}, "resources": {}, "issue": {}, "access": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        specs = [a.split("=", 1) for a in args.side or ["after=worktree"]]
        sides = [Side(label, None if rev == "worktree" else rev, work) for label, rev in specs]
        for side in sides:
            report["sides"][side.label] = {"rev": side.rev, "options": list(side.options)}
            log(f"{side.label}: compiling with NVRTC for sm_{ARCH}")
            kernels = compile_side(side, side.names(DTYPES.values()), work)
            report["resources"][side.label] = kernels
            log(f"{side.label}: counting instructions per launch")
            report["issue"][side.label] = issue_side(side, kernels)
            report["access"][side.label] = []
            if not args.no_access:
                log(f"{side.label}: emulating the RedNet-50 shapes")
                d = work / f"emu-{side.label}"
                d.mkdir()
                emu = cuda_emu.build(side.names([torch.bfloat16]), d, side.source, opt="-O1")
                report["access"][side.label] = trace_side(side, emu, args.samples)
        md = markdown(report)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.with_suffix(".json").write_text(json.dumps(_json_ready(report), indent=1) + "\n")
            args.output.with_suffix(".md").write_text(md)
            log(f"wrote {args.output.with_suffix('.md')} and .json")
        else:
            print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
