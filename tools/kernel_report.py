#!/usr/bin/env python
"""Static evidence for the CUDA involution kernels, without a GPU.

    python tools/kernel_report.py --side before=<rev> --side after=worktree --out benchmarks/results/<date>-static

For each side (the kernel source and launch plans of a git revision, or of the working tree):

- per kernel instantiation RedNet uses (fp32, bf16, fp16 x its three windows x both memory
  formats x three passes), compiled by nvcc for sm_90: registers, spills, static shared
  memory, resident blocks per SM those allow, and the global loads and stores in the SASS
  (``cuobjdump -sass``) by width;
- per RedNet-50 involution shape (bf16, batch 64, 224 px) and pass: the floor (each tensor
  the pass reads or writes moved once, docs/reference.md) against the bytes the kernel's
  access pattern fetches. The pattern is counted on the host emulation of the same source
  (tests/cuda_emu.h) running the exact launch plans of that revision on evenly spaced sample
  blocks (batch 1; every count scales with the batch): the distinct 32-byte sectors each block
  touches, i.e. L2 -> SM traffic if L1 keeps a block's own reuse (an estimate: DRAM traffic is
  lower when L2 keeps the reuse between blocks, higher when L1 evicts), the thread-level load
  instructions per output element, and the share of each fetched sector the requests use.

Nothing here is a timing; the report says so.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the emulator lives with the tests that prove it

from rednet.analysis.shapes import involution_shapes  # noqa: E402
from rednet.ops import involution_output_size  # noqa: E402
from tests import cuda_emu  # noqa: E402

REDNET_WINDOWS = [(3, 1, 1), (7, 1, 1), (7, 2, 1)]  # (K, stride, dilation)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("fwd", "bwd_input", "bwd_kernel")
BATCH = 64  # the floor and the estimates are reported for this batch; the emulation runs batch 1
# sm_90: registers and shared memory per SM, resident threads and blocks, shared memory the
# system reserves per block.
SM90 = {"regs": 65536, "smem": 228 * 1024, "threads": 2048, "blocks": 32, "reserved_smem": 1024}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# The two sides: a revision's kernel source and launch plans.


def _worktree_rev() -> str:
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "rednet/ops"], capture_output=True, text=True).stdout
    return f"worktree at {head}" + (" with changes in rednet/ops" if dirty.strip() else "")


class Side:
    def __init__(self, label: str, rev: str | None, workdir: Path):
        self.label, self.rev = label, rev or _worktree_rev()
        ops = ROOT / "rednet" / "ops"
        if rev is None:
            self.source, plan_path = ops / "involution.cu", ops / "_plan.py"
        else:
            d = workdir / label
            d.mkdir()
            self.source, plan_path = d / "involution.cu", d / "_plan.py"
            for name, path in (("involution.cu", self.source), ("_plan.py", plan_path)):
                text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:rednet/ops/{name}"], check=True,
                                      capture_output=True, text=True).stdout
                path.write_text(text)
        # Named inside rednet.ops so that its relative imports (_memory_format) resolve there.
        spec = importlib.util.spec_from_file_location(f"rednet.ops._kernel_report_plan_{label}", plan_path)
        self.plan: ModuleType = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.plan)

    def names(self, dtypes) -> list[str]:
        return [n for dt in dtypes for w in REDNET_WINDOWS for n in self.plan.name_expressions(dt, *w)]


# ----------------------------------------------------------------------------------------
# Compiler evidence.


def find_tool(name: str) -> str:
    """``name`` on PATH, beside the real nvcc, or the copy Triton ships (CUDA's binary utilities)."""
    found = shutil.which(name)
    if found:
        return found
    for d in (Path("/usr/local/cuda/bin"), Path(shutil.which("nvcc") or "/nonexistent").resolve().parent):
        if (d / name).exists():
            return str(d / name)
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        p = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if p.exists():
            return str(p)
    raise FileNotFoundError(f"{name} not found (PATH, beside nvcc, or in Triton's package)")


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> name expression, e.g. ``involution_fwd_nchw<float, 3, 1, 1>``."""
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return {m: d.split("(")[0].removeprefix("void ").strip() for m, d in zip(names, out.splitlines())}


_SASS_MEM = re.compile(r"\b(LDG|STG|LDS|STS|LDGSTS|SHFL|BAR)(\.[A-Z0-9_.]+)?")


def _width(suffix: str) -> int:
    parts = suffix.split(".")
    for w, keys in ((8, ("U8", "S8")), (16, ("U16", "S16")), (64, ("64",)), (128, ("128",))):
        if any(k in parts for k in keys):
            return w
    return 32


def compile_sm90(side: Side, names: list[str], workdir: Path) -> dict[str, dict]:
    """Registers, spills, shared memory and SASS memory instructions per name expression."""
    d = workdir / f"sass-{side.label}"
    d.mkdir()
    table = ",\n".join(f"  (void*)&{n}" for n in names)
    cu = d / "all.cu"
    cu.write_text(side.source.read_text() + f'\nextern "C" void* const rednet_instantiations[] = {{\n{table}\n}};\n')
    cubin = d / "all.cubin"
    res = subprocess.run(["nvcc", "-cubin", "-std=c++17", "-arch=sm_90", "--resource-usage", str(cu), "-o",
                          str(cubin)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-4000:])
    info: dict[str, dict] = {}
    fn = None
    for line in (res.stdout + res.stderr).splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            fn = info.setdefault(m.group(1), {})
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and fn is not None:
            fn.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and fn is not None:
            smem = re.search(r"(\d+) bytes smem", line)
            fn.update(registers=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
    sass = subprocess.run([find_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    fn = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = info.setdefault(m.group(1), {})
            fn["sass"] = {}
            continue
        if fn is None or "/*" not in line:
            continue
        ins = line.split("*/", 1)[1].split(";")[0]
        m = _SASS_MEM.search(ins)
        if m:
            op = m.group(1)
            key = op if op in ("SHFL", "BAR") else f"{op}.{_width(m.group(2) or '')}"
            fn["sass"][key] = fn["sass"].get(key, 0) + 1
    by_name = demangle(list(info))
    out = {}
    for mangled, v in info.items():
        v["blocks_per_sm"] = blocks_per_sm(v.get("registers", 0), v.get("smem", 0), side.plan.THREADS)
        out[by_name[mangled]] = v
    return {n: out[n] for n in names}


def blocks_per_sm(registers: int, smem: int, threads: int) -> int:
    """Resident blocks on an sm_90 SM as registers (allocated per warp in units of 256),
    shared memory and the thread and block limits allow."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = (SM90["regs"] // per_warp) // warps if per_warp else SM90["blocks"]
    by_smem = SM90["smem"] // (smem + SM90["reserved_smem"])
    return min(by_regs, by_smem, SM90["threads"] // threads, SM90["blocks"])


# ----------------------------------------------------------------------------------------
# Access pattern on the host emulation.


def _inputs(s: dict, fmt: str, dtype: torch.dtype):
    k, st = s["K"], s["stride"]
    pad = (k - 1) // 2
    ho, wo = (involution_output_size(n, k, st, pad, 1) for n in (s["H"], s["W"]))
    mf = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
    x = torch.randn(1, s["C"], s["H"], s["W"]).to(dtype).contiguous(memory_format=mf)
    gen = torch.randn(1, s["G"] * k * k, ho, wo).to(dtype).contiguous(memory_format=mf)
    go = torch.randn(1, s["C"], ho, wo).to(dtype).contiguous(memory_format=mf)
    return x, gen.view(1, s["G"], k, k, ho, wo), go, st, pad


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


def _floor_bytes(s: dict, pas: str, elem: int) -> dict[str, int]:
    """Bytes of each tensor the pass must read or write once, at batch BATCH."""
    k, st = s["K"], s["stride"]
    pad = (k - 1) // 2
    ho, wo = (involution_output_size(n, k, st, pad, 1) for n in (s["H"], s["W"]))
    x = BATCH * s["C"] * s["H"] * s["W"] * elem
    y = BATCH * s["C"] * ho * wo * elem
    w = BATCH * s["G"] * k * k * ho * wo * elem
    return {"fwd": x + w + y, "bwd_input": y + w + x, "bwd_kernel": y + x + w, "bwd": y + x + w + x + w}[pas]


def trace_side(side: Side, emu: cuda_emu.Emulator, samples: int) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    for s in involution_shapes("rednet50", 224):
        for fmt in ("nchw", "nhwc"):
            torch.manual_seed(0)
            x, kernel, go, st, pad = _inputs(s, fmt, dtype)
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
                rows.append(_row(s, fmt, pas, total, dtype.itemsize))
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


def _row(s: dict, fmt: str, pas: str, t: dict, elem: int) -> dict:
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


def _sass_str(sass: dict, op: str) -> str:
    parts = [f"{sass[k]}x{k.split('.')[1]}" for k in sorted(sass, key=lambda k: int(k.split(".")[1]) if "."
                                                                in k else 0) if k.startswith(op + ".")]
    return " ".join(parts) or "-"


def _resource_summary(report: dict, labels: list[str]) -> list[str]:
    """Per kernel family and side: register range, worst spill, fewest blocks/SM, load widths."""
    out = ["| kernel | side | registers | spill B (max) | blocks/SM (min) | LDG widths (bits) |",
           "|---|---|---|---|---|---|"]
    fams: dict = {}
    for side in labels:
        for name, v in report["resources"][side].items():
            kind, path, _, _ = _kernel_key(name)
            fams.setdefault((kind, path), {}).setdefault(side, []).append(v)
    for (kind, path), sides in sorted(fams.items()):
        for side in labels:
            vs = sides.get(side)
            if not vs:
                continue
            regs = [v["registers"] for v in vs]
            widths = sorted({int(k.split(".")[1]) for v in vs for k in v.get("sass", {}) if k.startswith("LDG.")})
            out.append(f"| {kind}_{path} | {side} | {min(regs)}-{max(regs)} | "
                       f"{max(v.get('spill_stores', 0) + v.get('spill_loads', 0) for v in vs)} | "
                       f"{min(v['blocks_per_sm'] for v in vs)} | {', '.join(map(str, widths))} |")
    return out


def markdown(report: dict) -> str:
    labels = list(report["sides"])
    acc = {lb: {(r["shape"], r["layout"], r["pass"]): r for r in report["access"][lb]} for lb in labels}
    keys = list(acc[labels[-1]])

    def cols(name):
        return " | ".join(f"{name} {lb}" for lb in labels)
    out = [f"# Static kernel evidence, {report['date']}", "",
           "No GPU was used. Kernel sources: " + ", ".join(f"{k} = `{v['rev']}`" for k, v in report["sides"].items())
           + f". Command: `{report['command']}`.", "",
           "Nothing below is a timing. Registers, spills and shared memory are ptxas's (nvcc "
           f"{report['nvcc']}, sm_90); SASS counts are static instruction counts in each kernel's "
           "code (a loop the compiler unrolled appears once per copy, a loop it kept appears once); "
           "blocks/SM is what registers, shared memory and the 2048-thread limit allow on an H100 SM "
           "(256-thread blocks). Byte counts are estimates from the host emulation (see below).", ""]
    out += ["## Summary", "", f"RedNet-50, bf16, batch {BATCH}, 224 px: each involution shape times its count "
            "in the network; est. is the L2 -> SM estimate defined below.", "",
            f"| layout | pass | floor MB | {cols('est. MB')} |", "|" + "---|" * (3 + len(labels))]
    for fmt in ("nchw", "nhwc"):
        for pas in PASSES:
            sel = [k for k in keys if k[1] == fmt and k[2] == pas]
            fl = sum(acc[labels[-1]][k]["floor_mb"] * acc[labels[-1]][k]["count"] for k in sel)
            ests = [sum(acc[lb][k]["est_mb"] * acc[lb][k]["count"] for k in sel if k in acc[lb]) for lb in labels]
            out.append(f"| {fmt} | {pas} | {fl:.0f} | " + " | ".join(f"{e:.0f}" for e in ests) + " |")
    if keys:
        bwd = sum(acc[labels[-1]][k]["floor_mb"] * acc[labels[-1]][k]["count"] for k in keys if k[2] != "fwd") / 2
        both = sum(_floor_bytes(sh, "bwd", 2) / 1e6 * sh["count"] for sh in involution_shapes("rednet50", 224))
        out += ["", f"Backward floor with both gradients from one kernel: {both:.0f} MB per layout; as two kernels "
                f"(bwd_input + bwd_kernel): {bwd:.0f} MB, the difference being grad_y read twice "
                f"({100 * (bwd - both) / both:.0f}% of the fused floor)."]
    out += ["", "Kernel families over the RedNet instantiations (fp32, bf16, fp16 x three windows):", ""]
    out += _resource_summary(report, labels)
    out += ["", "## Kernel resources (sm_90)", "",
            "| kernel | dtype | K,S,D | side | regs | spill B | smem B | blocks/SM | LDG (count x bits) | "
            "STG | LDS | STS | SHFL | BAR |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(_kernel_key(name), labels.index(side), side, v) for side, res in report["resources"].items()
            for name, v in res.items()]
    for (kind, path, t, win), _, side, v in sorted(rows, key=lambda r: (r[0], r[1])):
        sass = v.get("sass", {})
        out.append(f"| {kind}_{path} | {t} | {win} | {side} | {v.get('registers')} | "
                   f"{v.get('spill_stores', 0) + v.get('spill_loads', 0)} | {v.get('smem')} | {v['blocks_per_sm']} | "
                   f"{_sass_str(sass, 'LDG')} | {_sass_str(sass, 'STG')} | {_sass_str(sass, 'LDS')} | "
                   f"{_sass_str(sass, 'STS')} | {sass.get('SHFL', 0)} | {sass.get('BAR', 0)} |")
    out += ["", f"## Bytes per pass: floor vs the access pattern (bf16, batch {BATCH}, 224 px, RedNet-50)", "",
            "floor: each tensor the pass touches moved once (fwd: x, kernel, y; bwd_input: grad_y, kernel, "
            "grad_x; bwd_kernel: grad_y, x, grad_kernel). est.: distinct 32-byte sectors each block touches, "
            "summed over blocks (L2 -> SM bytes when L1 keeps a block's own reuse and nothing else; estimated "
            "from sampled blocks on the host emulation; below the floor where a pass never reads the kernel "
            "taps that fall in the padding). loads/elem: thread-level global load instructions per output "
            "element. sector use: of the sectors a warp-level load request touches, the share of bytes it "
            "uses (1.0: fully used; lanes reading the same bytes count once). threads storing: the share of "
            "launched threads that write any output (the rest only stage data or idle past the map's edge).", ""]
    out += [f"| shape | stage | layout | pass | floor MB | {cols('est. MB')} | {cols('x floor')} | "
            f"{cols('loads/elem')} | {cols('sector use')} | {cols('threads storing')} |",
            "|" + "---|" * (5 + 5 * len(labels))]

    def f(lb, key, field, fmt):
        v = acc[lb].get(key, {}).get(field)
        return "-" if v is None else format(v, fmt)
    for key in keys:
        r = acc[labels[-1]][key]
        out.append(f"| {r['shape']} | {r['name']} | {r['layout']} | {r['pass']} | {r['floor_mb']:.1f} | "
                   + " | ".join(" | ".join(f(lb, key, field, fmt) for lb in labels)
                                for field, fmt in (("est_mb", ".1f"), ("x_floor", ".2f"), ("loads_per_elem", ".2f"),
                                                   ("load_sector_use", ".2f"), ("storing_threads", ".2f"))) + " |")
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", action="append", metavar="LABEL=REV",
                   help="kernels to report: a git revision, or 'worktree' (default: after=worktree); repeat to "
                        "compare, e.g. --side before=<rev> --side after=worktree")
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md (default: print the markdown)")
    p.add_argument("--samples", type=int, default=24, help="blocks emulated per launch (evenly spaced)")
    p.add_argument("--no-access", action="store_true", help="compiler evidence only (skip the emulation)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    report = {"date": dt.date.today().isoformat(), "command": "python tools/kernel_report.py "
              + " ".join(argv if argv is not None else sys.argv[1:]),
              "nvcc": re.search(r"release ([\d.]+)", nvcc).group(1), "batch": BATCH, "sides": {}, "resources": {},
              "access": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        specs = [a.split("=", 1) for a in args.side or ["after=worktree"]]
        sides = [Side(label, None if rev == "worktree" else rev, work) for label, rev in specs]
        for side in sides:
            report["sides"][side.label] = {"rev": side.rev}
            log(f"{side.label}: compiling for sm_90")
            report["resources"][side.label] = compile_sm90(side, side.names(DTYPES.values()), work)
            report["access"][side.label] = []
            if not args.no_access:
                log(f"{side.label}: emulating the RedNet-50 shapes")
                d = work / f"emu-{side.label}"
                d.mkdir()
                emu = cuda_emu.build(side.names([torch.bfloat16]), d, side.source, opt="-O1")
                report["access"][side.label] = trace_side(side, emu, args.samples)
    md = markdown(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(md)
        log(f"wrote {args.out.with_suffix('.md')} and .json")
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
