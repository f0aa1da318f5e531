"""The kernels' machine code as the runtime builds it, and what each thread of it executes.

Used by ``tools/kernel_report.py`` (needs CuPy and CUDA's nvdisasm). ``compile_nvrtc`` builds a cubin the way
``rednet.ops._cupy.compile_binary`` does at run time (CuPy's ``compile_using_nvrtc`` with
the revision's ``COMPILE_OPTIONS``; CuPy adds ``-arch=sm_XX`` and
``--device-as-default-execution-space``), so registers, spills and instructions are those
of the binary a GPU loads, not of an nvcc build. ``disassemble`` reads the SASS
(``nvdisasm``) with the source line of each instruction, taken from a second build with
``-lineinfo`` whose code is checked to be the same instruction for instruction.

``Function.executed`` turns the static SASS into instructions executed per thread: every
instruction outside a loop counts once, one inside loops counts the product of their trip
counts, which the caller supplies per loop (``Loop`` says where it is and which source lines
it holds). Both sides of a branch count (a warp issues a branch body when any of its lanes
takes it), code after the final ``EXIT`` counts only when called.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Multiply-adds the accumulations are made of (a half-precision HFMA2 is a register move here).
FMA_OPS = ("FFMA", "DFMA")


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


# ----------------------------------------------------------------------------------------
# Building the binary as the runtime does.


def runtime_options(cupy_module_source: str) -> tuple[str, ...]:
    """``COMPILE_OPTIONS`` of a revision's ``rednet/ops/_cupy.py``, read without importing it.

    The module-level tuples of strings it is built from are evaluated in order; nothing else is.
    """
    env: dict[str, tuple] = {}
    for node in ast.parse(cupy_module_source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                value = _const_tuple(node.value, env)
            except ValueError:
                continue
            env[node.targets[0].id] = value
    if "COMPILE_OPTIONS" not in env:
        raise ValueError("no COMPILE_OPTIONS tuple of strings in _cupy.py")
    return env["COMPILE_OPTIONS"]


def _const_tuple(node: ast.AST, env: dict) -> tuple:
    if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) and isinstance(e.value, str)
                                           for e in node.elts):
        return tuple(e.value for e in node.elts)
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _const_tuple(node.left, env) + _const_tuple(node.right, env)
    raise ValueError("not a tuple of strings")


def compile_nvrtc(source: str, names: Sequence[str], options: Sequence[str], arch: str = "90",
                  extra: Sequence[str] = ()) -> tuple[bytes, dict[str, str]]:
    """(cubin, name expression -> lowered name): ``source`` compiled as ``_cupy.compile_binary`` does.

    CuPy chooses ``-arch`` per device (memoized per device, so it asks the CUDA runtime); its
    answer for an architecture its NVRTC supports, ``-arch=sm_<arch>`` and a cubin, is given
    here without a device. ``extra`` options are appended (``-lineinfo`` for the line map).
    """
    from cupy.cuda import compiler

    saved = compiler._get_arch_for_options_for_nvrtc
    compiler._get_arch_for_options_for_nvrtc = lambda arch=None: (f"-arch=sm_{arch}", "cubin")
    try:
        binary, mapping = compiler.compile_using_nvrtc(source, tuple(options) + tuple(extra), arch=arch,
                                                       filename="involution.cu", name_expressions=list(names))
    finally:
        compiler._get_arch_for_options_for_nvrtc = saved
    binary = bytes(binary)
    # CuPy's getCUBIN returns the image one byte short (it drops the last byte as if it were a
    # string's terminator; that byte is the top byte of the last program header's alignment,
    # zero). The driver does not mind; the disassemblers refuse the file, so restore it.
    phoff, phentsize, phnum = (int.from_bytes(binary[o:o + n], "little") for o, n in ((32, 8), (54, 2), (56, 2)))
    binary += b"\0" * max(0, phoff + phentsize * phnum - len(binary))
    return binary, {n: mapping[n] for n in names}


# ----------------------------------------------------------------------------------------
# Reading it.


def resources(cubin: Path) -> dict[str, dict[str, int]]:
    """Lowered name -> registers, stack (spill) bytes, static shared and local memory per thread."""
    out = subprocess.run([find_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    res: dict[str, dict[str, int]] = {}
    fn = None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn:
            res[fn] = dict(zip(("registers", "stack", "smem", "local"), map(int, m.groups())))
    return res


@dataclass
class Instr:
    addr: int
    pred: str  # '@P0', '@!P1', ... or ''
    op: str  # opcode with modifiers, e.g. 'LDG.E.128.CONSTANT'
    text: str
    line: int | None  # source line (of the innermost inlined function), None without line info
    target: int | None = None  # branch or call target

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    def width(self) -> int:
        """Bits moved by a memory instruction (32 unless its modifiers say otherwise)."""
        parts = self.op.split(".")
        for w, keys in ((8, ("U8", "S8")), (16, ("U16", "S16")), (64, ("64",)), (128, ("128",))):
            if any(k in parts for k in keys):
                return w
        return 32


@dataclass
class Loop:
    """A loop of the SASS: the instructions between a backward branch's target and the branch."""

    start: int  # index of the first instruction
    end: int  # index of the last (the backward branch)
    lines: frozenset = frozenset()  # source lines of its instructions (innermost inlined function)
    parent: Loop | None = None
    children: list = field(default_factory=list)

    def __hash__(self):
        return hash((self.start, self.end))

    def contains(self, i: int) -> bool:
        return self.start <= i <= self.end


@dataclass
class Function:
    name: str  # lowered (mangled) name
    instrs: list[Instr]
    loops: list[Loop] = field(default_factory=list)
    main_end: int = 0  # index of the final self-branch after the last EXIT; later code runs only when called
    calls: dict[int, list[int]] = field(default_factory=dict)  # subroutine start index -> calling indices

    def ops(self, instrs: Iterable[Instr] | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for ins in self.instrs if instrs is None else instrs:
            out[ins.base] = out.get(ins.base, 0) + 1
        return out

    def loop_instrs(self, loop: Loop) -> list[Instr]:
        return self.instrs[loop.start:loop.end + 1]

    def exclusive(self, loop: Loop) -> list[Instr]:
        """The loop's instructions that no loop nested in it holds."""
        inner = [(c.start, c.end) for c in loop.children]
        return [ins for i, ins in enumerate(self.instrs[loop.start:loop.end + 1], loop.start)
                if not any(s <= i <= e for s, e in inner)]

    def frequencies(self, trips: Callable[[Loop], float], skipped: Sequence[tuple[int, int]] = ()) -> list[float]:
        """Times each instruction runs per thread, given each loop's trip count and the index ranges
        [first, last] of code that branches skip for this launch."""
        per_loop: dict[int, float] = {}  # asked only of loops that hold live code
        freq = [0.0] * len(self.instrs)
        live = [True] * self.main_end
        for a, b in skipped:
            for i in range(a, min(b + 1, self.main_end)):
                live[i] = False
        for i in range(self.main_end):
            if not live[i]:
                continue
            f = 1.0
            for loop in self.loops:
                if loop.start <= i <= loop.end:
                    if id(loop) not in per_loop:
                        per_loop[id(loop)] = trips(loop)
                    f *= per_loop[id(loop)]
            freq[i] = f
        for start, sites in self.calls.items():  # a subroutine runs once per executed call
            n = sum(freq[s] for s in sites)
            i = start
            while i < len(self.instrs):
                freq[i] = n
                if self.instrs[i].base == "RET":
                    break
                i += 1
        return freq

    def diamonds(self) -> list[tuple[int, int, int]]:
        """If-else blocks: (i, t, m) for a conditional forward branch at i to t whose fall-through
        side [i+1, t-1] ends in an unconditional branch to m > t (the taken side is [t, m-1]) or in
        an unconditional EXIT (the taken side runs to the end of the code, m = main_end)."""
        out = []
        for i, x in enumerate(self.instrs[:self.main_end]):
            if x.base != "BRA" or not x.pred or x.target is None or x.target <= i + 1:
                continue
            t = x.target
            last = self.instrs[t - 1]
            if last.base == "BRA" and not last.pred and last.target is not None and last.target > t:
                out.append((i, t, last.target))
            elif last.base == "EXIT" and not last.pred:
                out.append((i, t, self.main_end))
        return out

    def one_side(self, trips: Callable[[Loop], float],
                 skipped: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
        """``skipped`` plus the smaller side of every if-else (outermost first), by the instructions
        each side executes with these trip counts: when the condition is the same across a warp,
        as for the kernels' parameter tests, one side runs."""
        skipped = list(skipped)
        freq = self.frequencies(trips, skipped)
        for i, t, m in sorted(self.diamonds(), key=lambda d: d[0] - d[2]):
            if freq[i] == 0:  # inside code already skipped
                continue
            a, b = sum(freq[i + 1:t]), sum(freq[t:m])
            lo, hi = (t, m - 1) if a >= b else (i + 1, t - 1)
            skipped.append((lo, hi))
            for j in range(lo, hi + 1):
                freq[j] = 0.0
        return skipped

    def executed(self, trips: Callable[[Loop], float], skipped: Sequence[tuple[int, int]] = ()) -> dict[str, float]:
        """Instructions executed per thread, in total and by kind: multiply-adds, the memory
        operations (bytes moved per thread), shared-memory wavefronts (a warp's access takes
        bits/32 cycles of the 128-byte-per-cycle shared-memory pipe, at least one, without bank
        conflicts), barriers, shuffles and local-memory accesses."""
        freq = self.frequencies(trips, self.one_side(trips, skipped))
        out = {"instructions": 0.0, "fma": 0.0, "ldg_bytes": 0.0, "stg_bytes": 0.0, "lds_bytes": 0.0,
               "sts_bytes": 0.0, "ldgsts_bytes": 0.0, "ldg": 0.0, "lds": 0.0, "smem_wavefronts": 0.0, "bar": 0.0,
               "shfl": 0.0, "local": 0.0}
        for ins, f in zip(self.instrs, freq):
            if not f or ins.base == "NOP":
                continue
            out["instructions"] += f
            b = ins.base
            if b in FMA_OPS:
                out["fma"] += f
            elif b in ("LDG", "STG", "LDS", "STS", "LDGSTS"):
                out[f"{b.lower()}_bytes"] += f * ins.width() / 8
                if b in ("LDG", "LDS"):
                    out[b.lower()] += f
                if b in ("LDS", "STS", "LDGSTS"):
                    out["smem_wavefronts"] += f * max(1, ins.width() // 32)
            elif b == "BAR":
                out["bar"] += f
            elif b == "SHFL":
                out["shfl"] += f
            elif b in ("LDL", "STL"):
                out["local"] += f
        return out


_LINE = re.compile(r'//## File ".*", line (\d+)')
_INS = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def disassemble(cubin: Path) -> dict[str, Function]:
    """Lowered name -> its SASS, with loops and subroutines found (line numbers when the cubin has them)."""
    out = subprocess.run([find_tool("nvdisasm"), "-c", "-g", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    funcs: dict[str, Function] = {}
    fn: Function | None = None
    labels: dict[str, int] = {}
    pending: list[str] = []
    refs: list[tuple[Instr, str]] = []
    line = None

    def finish():
        for ins, label in refs:
            ins.target = labels[label]
        _structure(fn)

    for text in out.splitlines():
        m = re.match(r"^//-+ \.text\.(\S+)\s", text)  # a function's section
        if m:
            if fn is not None:
                finish()
            fn = funcs.setdefault(m.group(1), Function(m.group(1), []))
            labels, pending, refs, line = {}, [], [], None
            continue
        if fn is None:
            continue
        m = _LINE.search(text)
        if m:
            line = int(m.group(1))
            continue
        m = _LABEL.match(text)
        if m:
            pending.append(m.group(1))
            continue
        m = _INS.match(text)
        if m:
            body = m.group(2).strip()
            pred = ""
            if body.startswith("@"):
                pred, body = body.split(None, 1)
            op = body.split(None, 1)[0]
            ins = Instr(int(m.group(1), 16), pred, op, body, line)
            for label in pending:
                labels[label] = len(fn.instrs)
            pending = []
            t = _TARGET.search(body)
            if t and op.split(".")[0] in ("BRA", "CALL", "BSSY", "BREAK", "SSY", "PBK"):
                refs.append((ins, t.group(1)))
            fn.instrs.append(ins)
    if fn is not None:
        finish()
    return funcs


def _structure(fn: Function) -> None:
    """Find the end of the main code, the subroutines and the loops (nested by interval)."""
    ins = fn.instrs
    fn.main_end = len(ins)
    for i, x in enumerate(ins):
        if x.base == "BRA" and x.target == i and not x.pred:  # the self-branch that ends the kernel's code
            fn.main_end = i
            break
    for i, x in enumerate(ins[:fn.main_end]):
        if x.base == "CALL" and x.target is not None:
            fn.calls.setdefault(x.target, []).append(i)
    ends: dict[int, int] = {}
    for i, x in enumerate(ins[:fn.main_end]):
        if x.base == "BRA" and x.target is not None and x.target <= i:
            ends[x.target] = max(ends.get(x.target, i), i)
    loops = sorted((Loop(s, e) for s, e in ends.items()), key=lambda lp: (lp.start, -lp.end))
    for lp in loops:
        lp.lines = frozenset(x.line for x in ins[lp.start:lp.end + 1] if x.line is not None)
        for outer in reversed(loops):
            if outer is lp or not (outer.start <= lp.start and lp.end <= outer.end):
                continue
            if lp.parent is None or (outer.end - outer.start) < (lp.parent.end - lp.parent.start):
                lp.parent = outer
        if lp.parent is not None:
            lp.parent.children.append(lp)
    for a in loops:
        for b in loops:
            if a.start < b.start <= a.end < b.end:
                raise ValueError(f"{fn.name}: loops overlap without nesting ({a.start}-{a.end}, {b.start}-{b.end})")
    fn.loops = loops


def same_code(a: Function, b: Function) -> bool:
    """Whether two disassemblies are the same instructions (line information aside)."""
    return [(x.pred, x.text) for x in a.instrs] == [(x.pred, x.text) for x in b.instrs]
