"""The ONNX Runtime custom op ``rednet.Involution`` (domain ``ai.rednet``): its library, built at first use.

    import onnxruntime as ort, rednet
    so = ort.SessionOptions()
    so.register_custom_ops_library(rednet.ops.ort_library_path())
    session = ort.InferenceSession("rednet50.onnx", so)

The op is the fused inference pass (``_fused``) on a channels-last input: kernel generation,
aggregation and the BatchNorm + ReLU after it, with the weights as ``pack_fused_weights``
lays them out; ``tools/export.py --involution custom`` writes graphs that use it, between
Transpose nodes. ``csrc/involution_ort.cpp`` holds the registration and the op, compiled as
one translation unit after ``csrc/involution_cpu.cpp``, whose fused pass it calls on ORT's
intra-op thread pool (``KernelContext_ParallelFor``), never on OpenMP threads of its own.

The library is built by the system compiler exactly as the native kernel is, and cached
beside it (``_native_build``: the same flags, including ``-march=native``, the same per-user
cache entries, checked before they are loaded). ``ort_library_path`` keeps the checked file
open for the life of the process and names it through that open file, so what ONNX Runtime
loads is what was checked; the path is valid in this process only (copy the file from it to
deploy the library elsewhere). It declares the few ORT C API entries it calls itself, so no ORT
headers are needed, and it works with ONNX Runtime 1.17 or later. Once built, the file is
self-contained (the C++ runtime and libgomp, nothing from Python or PyTorch): a deployment
copies it with the model and registers it from any ORT binding (C, C++, C#, Java, Python),
on a CPU with the instruction set of the machine that built it.
"""
from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import torch

from . import _cpu, _fused, _native_build  # noqa: F401  (_fused registers rednet::involution_fused)

__all__ = ["DOMAIN", "OP_TYPE", "OPSET", "SOURCE_PATH", "onnx_translation_table", "ort_library_path"]

SOURCE_PATH = Path(__file__).parent / "csrc" / "involution_ort.cpp"
DOMAIN = "ai.rednet"
OP_TYPE = "Involution"
OPSET = 1
INPUTS = ("X", "reduce_weight", "reduce_bias", "span_weight", "span_bias", "scale", "shift")  # as in the C++ op

_lock = threading.Lock()
_path: list[str] = []


def library() -> _native_build.NativeLibrary:
    """The op library: the native kernel's source, then the ORT op's, as one translation unit."""
    source = _cpu.SOURCE_PATH.read_bytes() + b"\n" + SOURCE_PATH.read_bytes()
    return _native_build.NativeLibrary("involution_ort", source, _cpu.CXX_FLAGS)


def ort_library_path() -> str:
    """The path of the ONNX Runtime op library, built on the first call (a few seconds, then cached on disk).

    Pass it to ``onnxruntime.SessionOptions.register_custom_ops_library`` before creating a
    session for a graph with ``rednet.Involution`` nodes. The path is valid in this process.

    Raises:
        OSError: no C++ compiler, or the build failed (with the compiler's message).
    """
    with _lock:
        if not _path:
            try:
                _path.append(_native_build.hold(library()))
            except subprocess.SubprocessError as e:  # a compiler that hangs past its timeout
                raise OSError(f"building the ONNX Runtime op library failed: {e}") from e
        return _path[0]


def onnx_translation_table() -> dict:
    """``torch.onnx.export(..., custom_translation_table=...)`` for graphs exported inside ``export_fused()``.

    Each ``rednet::involution_fused`` node becomes Transpose (to channels last), ``rednet.Involution``
    and Transpose back; ORT fuses the transposes with the layout changes around its convolutions.
    Needs onnxscript (the exporter's own dependency).
    """
    import onnx
    import onnxscript
    from onnxscript import opset18 as op

    # The op's signature for the exporter (not registered with onnx: ORT knows the op from the library).
    schema = onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, OPSET, "RedNet's fused inference involution (rednet.ops.ort_library_path())",
        inputs=[onnx.defs.OpSchema.FormalParameter(name, "T") for name in INPUTS],
        outputs=[onnx.defs.OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32 only")],
        attributes=[onnx.defs.OpSchema.Attribute(name, onnx.defs.OpSchema.AttrType.INT, "")
                    for name in ("kernel_size", "stride", "groups", "relu")],
    )
    involution = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, OPSET), OP_TYPE, schema)

    def involution_fused(x, reduce_weight, reduce_bias, span_weight, span_bias, scale, shift, kernel_size: int,
                         stride: int, groups: int, relu: bool):
        y = involution(op.Transpose(x, perm=[0, 2, 3, 1]), reduce_weight, reduce_bias, span_weight, span_bias, scale,
                       shift, kernel_size=kernel_size, stride=stride, groups=groups, relu=int(relu))
        return op.Transpose(y, perm=[0, 3, 1, 2])

    return {torch.ops.rednet.involution_fused.default: involution_fused}
