"""The GPU training path on CPU stand-ins (issue 18): the fast path by default and the warnings when
a run is off it, the launch-plan cache, and the CUDA graphs switch.

A CUDA device is stood in for by a ``torch.device("cuda", 0)`` handed to the functions that
decide (nothing runs on it), by ``rednet.ops``' availability seams, and, for the op, by CPU
tensors taking the CUDA implementation with the launch replaced by a no-op.
"""
from __future__ import annotations

import logging

import pytest
import torch

import rednet
from rednet.engine import load_config
from rednet.engine.builder import execution_warnings
from rednet.ops import _cupy

from .helpers import CONFIGS

CUDA = torch.device("cuda", 0)
NOT_IMPORTABLE = ("reference (CuPy is not importable (ModuleNotFoundError: No module named 'cupy'); install "
                  "cupy-cuda13x (pip install rednet[cuda]))")


@pytest.fixture(scope="module")
def rednet26():
    with torch.device("meta"):  # only its modules are looked at
        return rednet.create_model("rednet26")


# ----------------------------------------------------------------------------------------
# 1. The fast path by default.


@pytest.mark.parametrize("name", ["imagenet_recipe"] + [f"rednet{d}" for d in (26, 38, 50, 101, 152)])
def test_the_imagenet_configs_train_channels_last(name):
    cfg = load_config(f"{name}.yaml")
    assert cfg.train.channels_last and cfg.train.amp == "bf16"
    assert (CONFIGS / f"{name}.yaml").is_file()


def test_nchw_on_cuda_warns_once_with_the_fix(rednet26):
    cfg = load_config("rednet26", ["train.channels_last=false"])
    (warning,) = execution_warnings(rednet26, cfg, CUDA, "cupy")
    assert "NCHW" in warning and "--set train.channels_last=true" in warning
    assert execution_warnings(rednet26, load_config("rednet26"), CUDA, "cupy") == []  # the fast path: silent


def test_no_usable_cupy_on_cuda_warns_once_with_the_fix(rednet26, monkeypatch):
    cfg = load_config("rednet26")
    (warning,) = execution_warnings(rednet26, cfg, CUDA, NOT_IMPORTABLE)
    assert "No module named 'cupy'" in warning and "pip install rednet[cuda]" in warning
    assert "PyTorch reference" in warning and warning.count("pip install") == 1
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    (warning,) = execution_warnings(rednet26, cfg, CUDA, "reference (CuPy sees no usable CUDA device (driver or "
                                                          "runtime mismatch?))")
    assert "driver or runtime mismatch" in warning and 'Fix: pip install "rednet[cuda]"' in warning
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a torch for CUDA 12: the extra's CuPy is the wrong one
    (warning,) = execution_warnings(rednet26, cfg, CUDA, "reference (CuPy sees no usable CUDA device)")
    assert "pip install cupy-cuda12x" in warning
    # Both at once: two warnings, each with its own fix.
    assert len(execution_warnings(rednet26, load_config("rednet26", ["train.channels_last=false"]), CUDA,
                                  NOT_IMPORTABLE)) == 2


def test_no_warning_where_nothing_is_lost(rednet26):
    nchw = load_config("rednet26", ["train.channels_last=false"])
    assert execution_warnings(rednet26, nchw, torch.device("cpu"), "reference (no compiler)") == []  # not CUDA
    forced = "reference (forced by $REDNET_INVOLUTION_BACKEND or use_backend)"
    assert execution_warnings(rednet26, load_config("rednet26"), CUDA, forced) == []  # asked for
    with torch.device("meta"):
        resnet = rednet.create_model("resnet18")
    assert execution_warnings(resnet, nchw, CUDA, "none (the model has no involution layers)") == []


def test_the_warning_follows_what_rednet_ops_says_about_the_device(rednet26, monkeypatch):
    # No injected answer: describe_backend is asked, through the ops' availability seam.
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    monkeypatch.setattr(_cupy, "installed", lambda: False)
    monkeypatch.setattr(_cupy, "can_run_on", lambda *a: (False, "CuPy is not importable (ModuleNotFoundError)"))
    cfg = load_config("rednet26")
    (warning,) = execution_warnings(rednet26, cfg, CUDA)
    assert "CuPy is not importable" in warning and "rednet[cuda]" in warning
    monkeypatch.setattr(_cupy, "can_run_on", lambda *a: (True, "ok"))
    assert execution_warnings(rednet26, cfg, CUDA) == []


def test_the_trainer_logs_the_warning_once_after_the_execution_line(tmp_path, monkeypatch, caplog):
    from rednet.engine import trainer

    def on_cuda(model, cfg, device, backend=None):  # the run's CPU stands in for a CUDA device
        return execution_warnings(model, cfg, CUDA, backend)

    monkeypatch.setattr(trainer, "execution_warnings", on_cuda)
    cfg = load_config(None, ["model.name=rednet26", "model.num_classes=4", "data.dataset=synthetic", "data.img_size=16",
                             "data.batch_size=4", "data.workers=0", "data.synthetic_train_size=4",
                             "data.synthetic_val_size=4", "train.epochs=1", "train.device=cpu",
                             "train.channels_last=false", f"train.output={tmp_path}"])
    with caplog.at_level(logging.INFO, logger="rednet"):
        trainer.fit(cfg)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "rednet"]
    at = next(i for i, (_, m) in enumerate(messages) if m.startswith("execution: "))
    warnings = [m for level, m in messages if level == logging.WARNING]
    assert len(warnings) == 1 and messages[at + 1] == (logging.WARNING, warnings[0])
    assert "--set train.channels_last=true" in warnings[0]
