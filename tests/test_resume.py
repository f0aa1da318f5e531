"""Resuming a run: which checkpoint, what it restores, and what it refuses to do to a run directory's results."""
from __future__ import annotations

import json

import pytest

from rednet.engine import load_config

# timm's test_resnet (0.4 M parameters) on synthetic 16 px images: a step and a checkpoint cost milliseconds.
TINY = ["model.name=test_resnet", "model.num_classes=4", "data.dataset=synthetic", "data.img_size=16",
        "data.batch_size=4", "data.workers=0", "data.synthetic_train_size=32", "data.synthetic_val_size=8",
        "optim.lr=0.05", "optim.warmup_epochs=0.5", "train.log_every=1", "train.label_smoothing=0.0",
        "train.max_iters_per_epoch=2", "train.epochs=2"]


def _cfg(out, *extra):
    return load_config(None, [*TINY, f"train.output={out}", *extra])


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_more_epochs_follows_the_longer_schedule(tmp_path):
    """The lr after a resume with a larger train.epochs is the lr of a fresh run of that length at that step."""
    from rednet.engine.trainer import fit

    fit(_cfg(tmp_path / "stretched", "train.epochs=1"))
    fit(_cfg(tmp_path / "stretched", "train.epochs=3"), resume="auto")
    fit(_cfg(tmp_path / "fresh", "train.epochs=3"))
    stretched, fresh = _records(tmp_path / "stretched"), _records(tmp_path / "fresh")
    assert [r["global_step"] for r in stretched] == [r["global_step"] for r in fresh] == [2, 4, 6]
    # The lr each epoch ended at: after step 4 of 6 it is well above 0 (the 2-step schedule ended at 0).
    assert fresh[1]["lr"] > 0.01
    assert [r["lr"] for r in stretched[1:]] == pytest.approx([r["lr"] for r in fresh[1:]], rel=1e-12, abs=0)
