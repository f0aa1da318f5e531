"""Deployment: the export formulation of the operator, torch.export, ONNX, TorchScript, tools/export.py."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import rednet
from rednet.layers import Involution
from rednet.ops import involution, involution_export, involution_output_size, involution_reference

from ..helpers import OP_SHAPES, live_eval_model, load_tool, read_only_dir

# torch.onnx.export(dynamo=True) needs onnx and onnxscript; the round trips need onnxruntime.
_ONNX = ("onnx", "onnxscript", "onnxruntime")
needs_onnx = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in _ONNX),
                                reason=f"needs {', '.join(_ONNX)}")

# The operator shapes of tests/ops/test_ops.py, and a stride-2 K=7 window over a 16-channel group.
SHAPES = [*OP_SHAPES[:5], (2, 16, 1, 14, 14, 7, 2, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_export_formulation_equals_reference(shape, dtype):
    b, c, g, h, w, k, s, d = shape
    p = d * (k - 1) // 2
    ho, wo = involution_output_size(h, k, s, p, d), involution_output_size(w, k, s, p, d)
    x = torch.randn(b, c, h, w, dtype=dtype)
    kernel = torch.randn(b, g, k, k, ho, wo, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(involution_export(x, kernel, s, p, d), involution_reference(x, kernel, s, p, d),
                               rtol=tol, atol=tol)


def test_front_door_records_the_export_formulation_under_torch_export():
    x = torch.randn(2, 16, 12, 12)
    kernel = torch.randn(2, 1, 7, 7, 6, 6)

    class Op(torch.nn.Module):
        def forward(self, x, kernel):
            return involution(x, kernel, 2)

    ep = torch.export.export(Op(), (x, kernel))
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.conv2d.default in ops and len(ops) < 12  # not 49 per-tap slices
    torch.testing.assert_close(ep.module()(x, kernel), involution_reference(x, kernel, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_torch_export_dynamic_batch():
    model = live_eval_model("rednet26", num_classes=10)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes={"x": {0: batch}})
    for n in (1, 3):
        x = torch.randn(n, 3, 32, 32)
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


@needs_onnx
@pytest.mark.parametrize("name", ["rednet26", "rednet50"])
def test_onnx_round_trip_dynamic_batch(name, tmp_path):
    import onnx
    import onnxruntime as ort

    model = live_eval_model(name)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), path, dynamo=True, external_data=False,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    n_inv = sum(isinstance(m, rednet.layers.Involution) for m in model.modules())
    ops = [node.op_type for node in proto.graph.node]
    # One tap convolution, one multiply and one sum per involution, not K*K slices: the whole
    # network is under 20 nodes per involution layer (RedNet-26: 163 for 9).
    assert ops.count("ReduceSum") == n_inv and "Slice" not in ops and len(ops) < 20 * n_inv
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert out.shape == ref.shape == (batch, 1000) and np.isfinite(ref).all() and ref.std() > 0.1
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torch_jit_script_eval_model():
    model = live_eval_model("rednet26", num_classes=10)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torch_jit_script_of_fx_graphs():
    # timm scripts FX graphs (test_model_forward_fx_torchscript): the graph copies forward's annotations,
    # and its involution nodes call the front door itself, so both must be TorchScript's to read.
    model = live_eval_model("rednet26", num_classes=10)
    layer = Involution(32, 7, 2).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 32, 9, 9)
    scripted_model = torch.jit.script(torch.fx.symbolic_trace(model))
    scripted_layer = torch.jit.script(torch.fx.symbolic_trace(layer))
    with torch.no_grad():
        torch.testing.assert_close(scripted_model(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scripted_layer(y), layer(y), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torch_jit_script_of_the_front_door():
    scripted = torch.jit.script(involution)
    x, kernel = torch.randn(2, 16, 9, 9), torch.randn(2, 2, 5, 5, 5, 5)
    want = involution_reference(x, kernel, 2, 2, 1)
    torch.testing.assert_close(scripted(x, kernel, 2), want, rtol=1e-5, atol=1e-5)  # padding defaults to "same"
    torch.testing.assert_close(scripted(x, kernel, 2, 2), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# tools/export.py


@pytest.fixture(scope="module")
def export_tool():
    return load_tool("export")


@needs_onnx
def test_tool_onnx_end_to_end(export_tool, tmp_path, capsys):
    import onnxruntime as ort

    model = live_eval_model("rednet26")
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "r26.onnx"
    rc = export_tool.main(["--model", "rednet26", "--output", str(out), "--img-size", "64", "--pretrained",
                           str(weights), "--check", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    assert result["output"] == str(out) and out.is_file() and result["input_size"] == [3, 64, 64]
    assert result["max_abs_diff"] < 1e-4 and 0 < result["nodes"] < 250 and result["opset"] >= 18
    assert "exporting to onnx" in captured.err and "check passed" in captured.err
    # The file holds the given weights: ONNX Runtime agrees with the model they came from.
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], model(x).numpy(), rtol=0, atol=1e-4)


def test_tool_torch_export_end_to_end(export_tool, tmp_path, capsys):
    out = tmp_path / "r26.pt2"
    rc = export_tool.main(["--model", "rednet26", "--format", "export", "--output", str(out), "--img-size", "32",
                           "--num-classes", "5", "--check", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    assert out.is_file() and result["format"] == "export" and result["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("argv, message", [
    (["--model", "rednet27"], "unknown model 'rednet27'; choose one of rednet26"),
    (["--model", "rednet26", "--img-size", "16"], "--img-size must be at least 32"),
    (["--model", "rednet26", "--pretrained", "/nonexistent/w.pth"], "no such file"),
    (["--model", "rednet26", "--format", "export", "--opset", "17"], "--opset applies to --format onnx only"),
])
def test_tool_bad_input_is_one_error_line(export_tool, argv, message, capsys):
    assert export_tool.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_tool_bad_weights_file_is_one_error_line(export_tool, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint" * 100)
    argv = ["--model", "rednet26", "--format", "export", "--pretrained", str(bad), "--output", str(tmp_path / "m.pt2")]
    assert export_tool.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: rednet26: ") and "Traceback" not in "\n".join(err)


# Issue 16, item 16: an --output that cannot take the file was found only after the export (seconds to minutes).
@pytest.mark.parametrize("case", ["a-folder", "under-a-file", "read-only-folder"])
def test_tool_output_is_checked_before_exporting(export_tool, tmp_path, capsys, monkeypatch, case):
    (tmp_path / "file").write_text("precious")
    output, message = {
        "a-folder": (tmp_path, f"--output {tmp_path} is a folder; give a file name"),
        "under-a-file": (tmp_path / "file" / "m.onnx", "the folder of --output"),
        "read-only-folder": (None, "is not writable"),
    }[case]
    if output is None:
        output = read_only_dir(tmp_path) / "m.onnx"
    ran = []
    monkeypatch.setattr(export_tool, "_build", lambda args: ran.append("build"))
    monkeypatch.setattr(export_tool, "_export_onnx", lambda *a: ran.append("export"))
    try:
        assert export_tool.main(["--model", "rednet26", "--output", str(output)]) == 2
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert ran == [] and (tmp_path / "file").read_text() == "precious"


def test_tool_writes_under_runs_by_default(export_tool, tmp_path, monkeypatch, capsys):
    """Without --output the file goes to runs/<model>.pt2 (it went to the current folder: 40-60 MB in a checkout)."""
    monkeypatch.chdir(tmp_path)

    def fake_export(model, x, args):
        Path(args.output).write_bytes(b"program")
        return 1, 0

    monkeypatch.setattr(export_tool, "_export_program", fake_export)
    assert export_tool.main(["--model", "rednet26", "--format", "export", "--img-size", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == "runs/rednet26.pt2"
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == ["runs", "runs/rednet26.pt2"]


def test_tool_help(export_tool, capsys):
    with pytest.raises(SystemExit) as e:
        export_tool.main(["--help"])
    assert e.value.code == 0 and "--format" in capsys.readouterr().out
