"""The ONNX Runtime custom op ``rednet.Involution``: its library (built at first use), registration
by one call, the op against eager PyTorch on ORT's thread pool, its errors, and the export of both
formulations with ``tools/export.py`` (``--check`` runs whichever was written)."""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import rednet
from rednet.layers import Involution
from rednet.ops import _cpu, export_fused, onnx_translation_table, ort_library_path

from ..helpers import live_eval_model, load_tool

_ONNX = ("onnx", "onnxscript", "onnxruntime")
pytestmark = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in _ONNX),
                                reason=f"needs {', '.join(_ONNX)}")


@pytest.fixture(scope="module")
def library():
    ok, why = _cpu.available()
    if not ok:
        pytest.skip(why)
    return ort_library_path()


def _session(path_or_bytes, library=None, threads=1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def _involution_graph(inv: Involution, bn: torch.nn.BatchNorm2d, h: int, w: int, relu: bool = True,
                      weights: dict | None = None) -> bytes:
    """One rednet.Involution node with the module's folded weights as initializers, X channels last."""
    from onnx import TensorProto, helper, numpy_helper

    (wr, br, ws, bs), scale, shift = inv._folded(bn)
    tensors = dict(wr=wr, br=br, ws=ws, bs=bs, scale=scale, shift=shift)
    tensors.update(weights or {})
    node = helper.make_node("Involution", ["X", *tensors], ["Y"], domain="ai.rednet", kernel_size=inv.kernel_size,
                            stride=inv.stride, groups=inv.groups, relu=int(relu))
    graph = helper.make_graph([node], "involution",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", h, w, inv.channels])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(t.numpy(), k) for k, t in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.rednet", 1)])
    model.ir_version = 9
    return model.SerializeToString()


def _module(c, k, s):
    inv, bn = Involution(c, k, s).eval(), torch.nn.BatchNorm2d(c).eval()
    for m in (*inv.modules(), bn):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return inv, bn


def test_library_is_built_once_and_exports_the_entry_point(library):
    assert ort_library_path() == library
    assert ctypes.CDLL(library).RegisterCustomOps is not None
    cached = os.path.realpath(library)  # a path through the checked file's open descriptor
    assert "involution_ort-" in cached and cached.endswith(".so")


@pytest.mark.parametrize("c,k,s,h,w", [(64, 7, 1, 15, 13), (128, 7, 2, 15, 9), (32, 3, 1, 20, 17), (512, 7, 1, 3, 3)])
def test_op_matches_eager_on_ort_thread_pool(library, c, k, s, h, w):
    inv, bn = _module(c, k, s)
    x = torch.randn(3, c, h, w)
    with torch.no_grad():
        ref = torch.relu(bn(inv(x))).permute(0, 2, 3, 1).numpy()
    graph = _involution_graph(inv, bn, h, w)
    feed = {"X": x.permute(0, 2, 3, 1).contiguous().numpy()}
    one = _session(graph, library, threads=1).run(None, feed)[0]
    two = _session(graph, library, threads=2).run(None, feed)[0]
    np.testing.assert_allclose(one, ref, rtol=1e-5, atol=1e-5)
    # Each output is summed by one thread in one order: the thread count changes nothing.
    assert np.array_equal(one, two)


def test_registration_is_one_call(library):
    inv, bn = _module(32, 3, 1)
    graph = _involution_graph(inv, bn, 6, 6)
    with pytest.raises(Exception, match="Involution"):  # unknown op without the library
        _session(graph)
    out = _session(graph, library).run(None, {"X": np.zeros((1, 6, 6, 32), np.float32)})[0]
    assert out.shape == (1, 6, 6, 32)


def test_op_rejects_weights_that_do_not_fit(library):
    inv, bn = _module(32, 3, 1)
    bad = {"ws": torch.zeros(16, 20)}  # N not a multiple of 16
    sess = _session(_involution_graph(inv, bn, 6, 6, weights=bad), library)
    with pytest.raises(Exception, match=r"rednet\.Involution: weights do not fit"):
        sess.run(None, {"X": np.zeros((1, 6, 6, 32), np.float32)})


@pytest.mark.parametrize("name", ["rednet26"])
def test_exported_custom_graph_matches_eager(library, name, tmp_path):
    import onnx

    model = live_eval_model(name)
    path = tmp_path / f"{name}.onnx"
    with export_fused():
        torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), path, dynamo=True, external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False,
                          custom_translation_table=onnx_translation_table())
    nodes = onnx.load(path).graph.node
    n_inv = sum(isinstance(m, Involution) for m in model.modules())
    assert sum(n.domain == "ai.rednet" and n.op_type == "Involution" for n in nodes) == n_inv
    assert not any(n.op_type in ("ReduceSum", "BatchNormalization") for n in nodes)  # no tap formulation, BN folded
    sess = _session(str(path), library, threads=2)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert np.isfinite(ref).all() and ref.std() > 0.1
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


def test_export_fused_is_off_outside_the_block():
    model = live_eval_model("rednet26")
    ep = torch.export.export(model, (torch.randn(2, 3, 32, 32),))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.rednet.involution_fused.default not in targets


@pytest.fixture(scope="module")
def export_tool():
    return load_tool("export")


@pytest.mark.parametrize("involution", ["standard", "custom"])
def test_tool_exports_either_formulation_and_checks_it(export_tool, library, involution, tmp_path, capsys):
    model = live_eval_model("rednet26")
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / f"r26-{involution}.onnx"
    rc = export_tool.main(["--model", "rednet26", "--output", str(out), "--img-size", "64", "--pretrained",
                           str(weights), "--involution", involution, "--check", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    n_inv = sum(isinstance(m, Involution) for m in model.modules())
    assert result["involution"] == involution and result["max_abs_diff"] < 1e-4
    assert result["custom_nodes"] == (n_inv if involution == "custom" else 0)
    assert "check passed" in captured.err
    if involution == "custom":  # the file needs the library: --check registered it
        with pytest.raises(Exception, match="Involution"):
            _session(str(out))


def test_tool_exports_fused_program(export_tool, tmp_path, capsys):
    out = tmp_path / "r26.pt2"
    rc = export_tool.main(["--model", "rednet26", "--format", "export", "--output", str(out), "--img-size", "32",
                           "--involution", "custom", "--check", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out)["custom_nodes"] == sum(isinstance(m, Involution)
                                                           for m in rednet.create_model("rednet26").modules())


def test_call_overhead_measures_both_graphs(library):
    bench = load_tool("benchmark")
    o = bench.race.ort_call_overhead(threads=1, calls=20)
    assert o["calls"] == 20 and o["identity_us"] > 0 and o["involution_us"] > 0
    assert o["overhead_us"] == pytest.approx(o["involution_us"] - o["identity_us"])


def test_library_needs_nothing_from_python_or_torch(library):
    """What a deployment must provide: the C/C++ runtime and libgomp (ELF DT_NEEDED entries)."""
    import shutil
    import subprocess

    if shutil.which("readelf") is None:
        pytest.skip("no readelf")
    dynamic = subprocess.run(["readelf", "-d", os.path.realpath(library)], capture_output=True, text=True,
                             check=True).stdout
    needed = {line.split("[")[1].split("]")[0] for line in dynamic.splitlines() if "(NEEDED)" in line}
    runtime = {"libstdc++.so.6", "libm.so.6", "libgcc_s.so.1", "libc.so.6", "libgomp.so.1", "ld-linux-x86-64.so.2"}
    assert needed <= runtime, needed


def test_ort_folds_the_transposes_into_its_reorders(library, tmp_path):
    """Around each rednet.Involution, ORT's NCHWc layout pass absorbs the Transposes the export adds."""
    import onnx

    model = live_eval_model("rednet26")
    path, optimized = tmp_path / "r26.onnx", tmp_path / "r26-opt.onnx"
    with export_fused():
        torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), path, dynamo=True, external_data=False,
                          verbose=False, custom_translation_table=onnx_translation_table())
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3  # the "hardware-specific optimizations" warning
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [(n.domain, n.op_type) for n in onnx.load(optimized).graph.node]
    if not any(domain == "com.microsoft.nchwc" for domain, _ in ops):
        pytest.skip("ONNX Runtime chose no NCHWc kernels on this CPU")
    assert ops.count(("ai.rednet", "Involution")) == 9 and ("", "Transpose") not in ops


def test_tool_check_without_a_compiler_is_one_error_line(tmp_path):
    """--check of a custom graph needs the library; without a compiler that is exit 2 and one line."""
    import os
    import subprocess
    import sys

    from ..helpers import ROOT

    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), REDNET_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "r26.onnx"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), "--model", "rednet26", "--img-size",
                          "32", "--involution", "custom", "--output", str(out), "--check"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no C++ compiler" in errors[0] and "Traceback" not in res.stderr
    assert out.is_file()  # the export itself needs no compiler
