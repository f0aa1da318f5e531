"""tools/convert_weights.py: the foreign layouts to safetensors, a report in JSON, and its refusals (a file that
does not fit, NaN or infinity without --force, a destination that exists)."""
from __future__ import annotations

import json

import pytest
import torch

import rednet
from rednet.models import load_weights, save_weights

from ..helpers import PARAMS, load_tool, with_nonfinite, write_weights


def test_convert_weights_refuses_nonfinite_without_force(trained, tmp_path, capsys):
    sd, _, _ = trained
    tool = load_tool("convert_weights")
    src, dst = write_weights("rednet", with_nonfinite(sd), tmp_path / "nan.safetensors"), tmp_path / "out.safetensors"
    assert tool.main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "3 NaN or infinite values" in err[0]
    assert "--force" in err[0] and not dst.exists()
    assert tool.main([str(src), str(dst), "--force", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["nonfinite"] == 3 and out.err.startswith("warning: ")
    assert torch.isnan(load_weights(dst).state_dict["layer1.0.conv1.weight"]).sum() == 2


@pytest.mark.parametrize("kind", ["paddle2", "mmcls"])
def test_convert_weights_cli(trained, tmp_path, capsys, kind):
    from safetensors import safe_open

    sd, x, y = trained
    tool = load_tool("convert_weights")
    src = write_weights(kind, sd, tmp_path / "src.bin")
    dst = tmp_path / "out.safetensors"
    assert tool.main([str(src), str(dst), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "rednet26" and report["params"] == PARAMS["rednet26"]
    assert report["layout"] == ("paddle" if kind == "paddle2" else "mmcls")
    if kind == "paddle2":
        assert report["transposed"] == ["fc.weight"] and report["filled"] == 40
        assert report["dropped"] == ["StructuredToParameterName@@"]
    with safe_open(str(dst), "pt") as f:
        assert f.metadata() == {"format": "pt", "layout": "rednet", "arch": "rednet26"}
    model = rednet.create_model("rednet26", pretrained=str(dst)).eval()
    with torch.no_grad():
        assert torch.equal(model(x), y)
    assert tool.main([str(src), str(tmp_path / "x.safetensors"), "--arch", "rednet50"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not list(tmp_path.glob(".*tmp*"))
    assert "--arch" in tool.build_parser().format_help()


def test_convert_weights_never_clobbers_dst(tmp_path, capsys):
    tool = load_tool("convert_weights")
    sd = rednet.create_model("rednet26").state_dict()
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_weights(sd, src)
    dst.write_bytes(b"precious")
    assert tool.main([str(src), str(dst)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and dst.read_bytes() == b"precious"
    assert tool.main([str(src), str(dst), "--force"]) == 0
    assert torch.equal(load_weights(dst).state_dict["fc.weight"], sd["fc.weight"])
    # A failing write (here: the destination is a directory) leaves no partial file behind.
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(OSError):
        save_weights(sd, tmp_path / "dir.safetensors")
    assert not list(tmp_path.glob(".*tmp*"))
