"""rednet.engine: config schema, schedule, checkpoint I/O and the train/eval loop."""
from __future__ import annotations

import pytest
import torch

from rednet.engine import CheckpointError, ConfigError, config_to_dict, load_config, load_model_from_checkpoint, save_checkpoint
from rednet.engine.builder import build_model
from rednet.engine.checkpoint import find_resume_checkpoint, list_checkpoints


def _digits_cfg(*extra: str):
    return load_config(None, ["model.name=rednet26", "model.num_classes=10", "data.dataset=digits", "data.img_size=32", *extra])


# --- checkpoint contract (used by the visualization tool) -------------------------------


def _write_ckpt(path, cfg, model, ema=None):
    return save_checkpoint({"config": config_to_dict(cfg), "model": model.state_dict(), "ema": ema,
                            "epoch": 1, "iteration": 0, "global_step": 5}, path)


def test_load_model_from_checkpoint_roundtrip(tmp_path):
    cfg = _digits_cfg()
    model = build_model(cfg)
    path = _write_ckpt(tmp_path / "checkpoint-000000005.pt", cfg, model)
    # Plain data only: loadable without executing pickled code.
    assert torch.load(path, weights_only=True)["config"]["model"]["name"] == "rednet26"
    loaded, config = load_model_from_checkpoint(path)
    assert config["model"]["num_classes"] == 10 and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_load_model_from_checkpoint_uses_ema_only_when_evaluated(tmp_path):
    cfg = _digits_cfg("train.ema=true", "train.eval_ema=true")
    model = build_model(cfg)
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    loaded, _ = load_model_from_checkpoint(_write_ckpt(tmp_path / "a.pt", cfg, model, ema))
    assert torch.equal(loaded.fc.weight, ema["fc.weight"])
    cfg = _digits_cfg("train.ema=true")
    loaded, _ = load_model_from_checkpoint(_write_ckpt(tmp_path / "b.pt", cfg, model, ema))
    assert torch.equal(loaded.fc.weight, model.fc.weight)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage_no_sidecar"])
def test_corrupt_checkpoint_is_a_clear_error_and_resume_takes_previous(tmp_path, damage):
    cfg = _digits_cfg()
    model = build_model(cfg)
    good = _write_ckpt(tmp_path / "checkpoint-000000005.pt", cfg, model)
    bad = _write_ckpt(tmp_path / "checkpoint-000000010.pt", cfg, model)
    data = bytearray(bad.read_bytes())
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF  # inside tensor data: torch.load alone would not notice
        bad.write_bytes(bytes(data))
    else:
        bad.write_bytes(b"not a checkpoint")
        bad.with_name(bad.name + ".sha256").unlink()
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        load_model_from_checkpoint(bad)
    assert list_checkpoints(tmp_path) == [bad, good]
    path, state = find_resume_checkpoint(tmp_path)
    assert path == good and state["global_step"] == 5


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_from_checkpoint(tmp_path / "nope.pt")
