"""Parameter and MAC counting, and tools/complexity.py, against docs/reference.md."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from rednet.analysis.complexity import count_complexity, count_model
from rednet.layers import Involution

from ..helpers import PAPER_GMACS, PARAMS, fails_cleanly, load_tool

# docs/reference.md: exact parameter counts and the GFLOPs (MACs) column at 224x224.
REFERENCE = {name: (PARAMS[name], PAPER_GMACS[name]) for name in PARAMS}


def _tool():
    return load_tool("complexity")


@pytest.mark.parametrize("name", list(REFERENCE))
def test_cli_json_matches_reference(name, capsys):
    assert _tool().main(["--model", name, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    params, gmacs = REFERENCE[name]
    assert out["model"] == name and out["params"] == params
    assert isinstance(out["macs"], int)
    assert abs(out["macs"] / 1e9 / gmacs - 1) < 0.03, (out["macs"], gmacs)
    assert out["by_type"]["involution"] > 0 and sum(out["by_type"].values()) == out["macs"]


def test_small_model_counted_by_hand():
    inv = Involution(32, 7, stride=2)  # reduce 32->8 (+BN), span 8->49*2, aggregation on 8x8 outputs
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), inv,
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    c = count_complexity(model, (3, 16, 16))
    conv = 32 * 16 * 16 * 3 * 9 + 8 * 8 * 8 * 32 + 98 * 8 * 8 * 8
    assert c.by_type == {"involution": 49 * 32 * 8 * 8, "conv": conv, "linear": 320, "norm": 32 * 256 + 8 * 64}
    assert c.params == sum(p.numel() for p in model.parameters())
    assert c.device == "cpu" and model.training  # mode restored


def test_meta_and_cpu_agree_and_other_sizes():
    meta = count_model("rednet26", (3, 64, 64))
    cpu = count_model("rednet26", (3, 64, 64), device="cpu")
    assert (meta.params, meta.macs, meta.by_type) == (cpu.params, cpu.macs, cpu.by_type)
    assert meta.device == "meta" and cpu.device == "cpu"
    full = count_model("rednet26", (3, 224, 224))
    conv_like = lambda c: c.macs - c.by_type["linear"]  # noqa: E731  the classifier does not scale
    assert abs(conv_like(full) / conv_like(meta) / (224 / 64) ** 2 - 1) < 0.02  # MACs scale with pixels


def test_any_timm_model_and_text_output(capsys):
    assert _tool().main(["--model", "resnet50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["macs"] / 4.1e9 - 1) < 0.03 and abs(out["params"] / 25.6e6 - 1) < 0.01
    assert _tool().main(["--model", "rednet50"]) == 0
    text = capsys.readouterr().out
    assert "15,540,806" in text and "involution" in text
    assert _tool().main(["--model", "rednet5"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert "--img-size" in _tool().build_parser().format_help()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_complexity_on_cuda_without_a_gpu(capsys):
    """A traceback from torch's CUDA initialisation."""
    fails_cleanly(capsys, "complexity", ["--model", "rednet26", "--device", "cuda"],
                   r"^error: --device cuda: no CUDA device is visible to torch; use --device cpu$")
