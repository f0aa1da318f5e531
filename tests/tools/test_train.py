"""tools/train.py as a user runs it: the execution line it logs (precision, device, backend) and where its
run directory goes by default."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from rednet.ops import can_use_native_kernel

from ..helpers import load_tool


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule: needs a machine without CUDA")
def test_train_logs_how_it_runs_and_keeps_the_recipes_amp_off_a_cpu(tmp_path, capsys):
    from rednet.engine.checkpoint import read_checkpoint

    config = tmp_path / "mine.yaml"  # the recipe (train.amp: bf16, optim sgd) on a few synthetic images
    config.write_text("base: rednet26\nmodel:\n  num_classes: 4\ndata:\n  dataset: synthetic\n  img_size: 16\n"
                      "  batch_size: 4\n  workers: 0\n  synthetic_train_size: 8\n  synthetic_val_size: 4\n"
                      "optim:\n  lr: 0.01\ntrain:\n  epochs: 1\n  max_iters_per_epoch: 1\n  amp: fp16\n")
    assert load_tool("train").main(["--config", str(config), "--output", str(tmp_path / "run"), "--json",
                                    str(tmp_path / "final.json")]) == 0
    assert set(json.loads((tmp_path / "final.json").read_text())) >= {"top1", "best_top1", "epochs"}
    lines = [line for line in capsys.readouterr().out.splitlines() if "execution:" in line]
    assert len(lines) == 1, lines
    assert "precision fp32 (train.amp fp16 applies on CUDA" in lines[0] and "device cpu" in lines[0]
    assert "memory format channels_last" in lines[0]  # the recipe's
    # RedNet-26 has involutions: on a CPU, the native kernel where it builds.
    native, why = can_use_native_kernel(torch.empty(0))
    assert (f"involution backend {'native' if native else f'reference ({why}'}") in lines[0]
    assert read_checkpoint(tmp_path / "run" / "last.pt")["scaler"] is None  # no fp16, so no loss scaling


@pytest.mark.parametrize("argv, output", [
    (["--config", "rednet50"], "runs/rednet50"),
    (["--config", "rednet50", "--set", "model.name=resnet50"], "runs/resnet50"),  # was runs/rednet50: the same run
    (["--config", "rednet50", "--set", "model.name=resnet50", "--output", "elsewhere"], "elsewhere"),
    (["--config", "digits", "--set", "model.name=resnet50"], "runs/digits"),  # a config that names its run
    (["--config", "rednet50", "--set", "model.name=hf-hub:timm/resnet18.a1_in1k"], "runs/hf-hub_timm_resnet18.a1_in1k"),
])
def test_the_run_directory_follows_the_model(capsys, argv, output):
    assert load_tool("train").main([*argv, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["output"] == output
