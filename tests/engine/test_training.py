"""rednet.engine's training: fit's own checks, loss, mixup and the schedule from the config, resume exactness,
the train loop."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from rednet.engine import CheckpointError, ConfigError, load_config, load_model_from_checkpoint
from rednet.engine.rundir import RunDir

from ..helpers import digits_cfg

# --- fit's checks, loss, mixup and the schedule ---------------------------------------


def test_fit_runs_its_own_pre_checks(tmp_path):
    """A library caller of ``fit`` gets the checks the tool used to make: before any data is read or written."""
    from rednet.engine import fit
    from rednet.fileio import OutputDirError

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="model.name 'rednet5' is not a registered model"):
        fit(digits_cfg("model.name=rednet5", f"train.output={tmp_path / 'run'}"))
    with pytest.raises(OutputDirError, match="train.output .* is a file, not a folder"):
        fit(digits_cfg(f"train.output={tmp_path / 'file'}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_checkpoint_path_in_model_kwargs_is_checked_unless_a_checkpoint_follows(tmp_path):
    """timm loads model.kwargs.checkpoint_path into the model it builds: a missing file is the config's error,
    except when a training checkpoint's weights replace the initial ones (eval, resume)."""
    from rednet.engine.builder import build_model, check_buildable

    cfg = load_config(None, ["model.name=test_resnet", f"model.kwargs={{checkpoint_path: {tmp_path / 'nope.pth'}}}"])
    for check in (check_buildable, build_model):
        with pytest.raises(ConfigError, match=r"model\.kwargs\.checkpoint_path '.*nope\.pth' does not exist"):
            check(cfg)
    with torch.device("meta"):
        assert build_model(cfg, pretrained=False) is not None


def test_loss_and_mixup_follow_the_config():
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from rednet.engine.builder import build_loss_and_mixup

    loss_fn, mixup = build_loss_and_mixup(load_config(None, ["train.cutmix=1.0"]))
    assert isinstance(loss_fn, SoftTargetCrossEntropy) and isinstance(mixup, Mixup)
    loss_fn, mixup = build_loss_and_mixup(load_config(None))  # the paper: label smoothing 0.1
    assert isinstance(loss_fn, LabelSmoothingCrossEntropy) and mixup is None
    loss_fn, mixup = build_loss_and_mixup(load_config(None, ["train.label_smoothing=0"]))
    assert isinstance(loss_fn, torch.nn.CrossEntropyLoss) and mixup is None
    # An odd batch with mixup is the config's error, before anything is built.
    with pytest.raises(ConfigError, match=r"'data\.batch_size' expects an even number"):
        load_config(None, ["train.mixup=0.2", "data.batch_size=5"])


def test_lr_scaling_counts_accumulation():
    from rednet.engine.builder import global_batch_size, peak_lr

    cfg = load_config(None, ["data.batch_size=32", "train.accum_steps=2"])
    assert global_batch_size(cfg, 8) == 512 and peak_lr(cfg, 8) == pytest.approx(0.2)


def test_warmup_cosine_schedule():
    from rednet.engine.builder import build_scheduler

    cfg = load_config(None, ["train.epochs=10", "optim.warmup_epochs=2", "optim.lr=1.0"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(cfg, opt, steps_per_epoch=50)
    lrs = []
    for _ in range(500):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.25)  # warmup from 0.25 x lr
    assert all(a < b for a, b in zip(lrs[:100], lrs[1:100]))  # rising during warmup
    assert max(lrs) < 1.0 and lrs[100] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))  # then half-cosine down
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


# --- training loop: resume exactness, non-finite loss, corrupt images ------------------


def _fit_cfg(out, *extra):
    # Digits: timm's random-resized-crop draws from python's RNG, mixup from numpy's, and the
    # model from torch's, so every RNG the checkpoint restores is exercised.
    return load_config(None, [
        "model.name=rednet26", "model.num_classes=10", "data.dataset=digits", "data.img_size=16",
        "data.batch_size=8", "data.eval_batch_size=128", "data.workers=0", "data.scale=[0.5, 1]",
        "optim.lr=0.05", "optim.warmup_epochs=0.5", "optim.clip_grad=5.0", "train.epochs=2",
        "train.max_iters_per_epoch=4", "train.deterministic=true", "train.mixup=0.2", "train.ema=true",
        "train.ema_decay=0.9", "train.ckpt_every_iters=1", "train.keep_last=20", "train.log_every=1",
        f"train.output={out}", *extra,
    ])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Two epochs without interruption; every step checkpointed."""
    from rednet.engine.trainer import fit

    out = tmp_path_factory.mktemp("straight")
    result = fit(_fit_cfg(out))
    return out, result


def _assert_same_state(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for (ka, va), (kb, vb) in zip(sorted(a["optimizer"]["state"].items()), sorted(b["optimizer"]["state"].items())):
        assert torch.equal(va["momentum_buffer"], vb["momentum_buffer"])
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]


@pytest.mark.slow
@pytest.mark.parametrize("step", [2, 4, 7], ids=["mid-epoch-1", "epoch-end", "mid-epoch-2"])
def test_resume_is_bitwise_exact(straight_run, tmp_path, step):
    """Kill after checkpoint `step` (copy it to a fresh run dir), resume: same weights as straight."""
    import shutil

    from rednet.engine.checkpoint import read_checkpoint
    from rednet.engine.trainer import fit

    out, result = straight_run
    name = f"checkpoint-{step:09d}.pt"
    shutil.copy(out / name, tmp_path / name)
    resumed = fit(_fit_cfg(tmp_path), resume="auto")
    final = f"checkpoint-{8:09d}.pt"
    _assert_same_state(read_checkpoint(out / final), read_checkpoint(tmp_path / final))
    assert resumed["top1"] == result["top1"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["epoch"] == 2


def test_fresh_run_refuses_a_used_run_dir(straight_run):
    from rednet.engine.trainer import fit

    out, _ = straight_run
    with pytest.raises(CheckpointError, match="--resume auto"):
        fit(_fit_cfg(out))


def test_straight_run_outputs(straight_run):
    out, result = straight_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["val_count"] == 360 and result["count"] == 360
    assert {"train_loss", "lr", "images_per_s", "data_wait_s", "val_top1", "val_top5"} <= records[0].keys()
    assert (out / "config.yaml").is_file() and any((out / "tb").iterdir())
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    model, cfg = load_model_from_checkpoint(out / "last.pt")
    assert cfg["train"]["output"] == str(out) and model.fc.out_features == 10


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    from rednet.engine.checkpoint import read_checkpoint
    from rednet.engine.stepguard import NonFiniteLossError
    from rednet.engine.trainer import fit

    cfg = _fit_cfg(tmp_path, "optim.lr=1e30", "optim.clip_grad=null", "train.mixup=0", "train.ema=false",
                   "train.max_iters_per_epoch=20", "train.epochs=1")
    with pytest.raises(NonFiniteLossError, match=r"iteration (\d+)") as info:
        fit(cfg)
    it = int(re.search(r"iteration (\d+)", str(info.value)).group(1))
    ckpts = RunDir(tmp_path).checkpoints()
    assert ckpts and read_checkpoint(ckpts[0])["global_step"] == it  # written after the last good step
    state = read_checkpoint(ckpts[0])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("extra", [
    ["train.amp=bf16"],
    ["train.amp=fp16", "optim.clip_grad=1.0"],  # GradScaler + unscale before clipping
    ["train.channels_last=true", "train.accum_steps=2", "data.batch_size=2"],
], ids=["bf16", "fp16-scaler-clip", "channels-last-accum"])
def test_precision_and_layout_options_train(tmp_path, extra):
    from rednet.engine.trainer import fit

    cfg = load_config(None, ["model.name=rednet26", "model.num_classes=4", "data.dataset=synthetic", "data.img_size=16",
                             "data.batch_size=4", "data.workers=0", "data.synthetic_train_size=32",
                             "data.synthetic_val_size=7", "train.epochs=1", "train.max_iters_per_epoch=2",
                             f"train.output={tmp_path}", *extra])
    result = fit(cfg)
    assert result["count"] == 7 and math.isfinite(result["loss"])
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["global_step"] == 2 and (state["scaler"] is not None) == ("train.amp=fp16" in extra)


# --- unreadable images in the loop -----------------------------------------------------


def _loop_context(model):
    from rednet.engine.step import StepContext

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    return StepContext(model=model, optimizer=opt, scheduler=sched, loss_fn=torch.nn.CrossEntropyLoss(),
                       device=torch.device("cpu"))


def _batches(*readable: bool):
    # What collate_skip yields: images, targets and how many images of the batch were unreadable.
    empty = (torch.empty(0, 3, 8, 8), torch.empty(0, dtype=torch.long), 4)
    return [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,)), 0) if r else empty for r in readable]


def test_a_batch_of_only_unreadable_images_is_not_a_step():
    from rednet.engine.loop import train_one_epoch
    from rednet.engine.step import TrainState

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    ctx, state = _loop_context(model), TrainState()
    result = train_one_epoch(ctx, _batches(False, True), state, steps=2, main_process=False)
    # Both positions of the epoch are consumed, but only the readable batch moved the weights
    # and the schedule.
    assert (state.iteration, state.global_step, ctx.scheduler.last_epoch) == (2, 1, 1)
    assert result.steps == 1 and result.stats.skipped_images == 4


def test_an_epoch_of_only_unreadable_images_is_a_data_error():
    from rednet.data import DataError
    from rednet.engine.loop import evaluate, train_one_epoch
    from rednet.engine.step import TrainState

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    with pytest.raises(DataError, match="every image of epoch 1 was unreadable"):
        train_one_epoch(_loop_context(model), _batches(False, False), TrainState(), steps=2, main_process=False)
    with pytest.raises(DataError, match="scored no images"):
        evaluate(model, _batches(False), torch.device("cpu"), main_process=False)


def test_train_step_accumulates_micro_batches_and_reports_a_stop():
    import dataclasses

    from rednet.engine.step import TrainState, train_step

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    stops = iter([False, True])
    ctx = dataclasses.replace(_loop_context(model), accum_steps=2, stop_requested=lambda: next(stops))
    batches, state = iter(_batches(True, False, True, True)), TrainState()
    first = train_step(ctx, batches, state)  # two micro-batches, one of them unreadable
    assert (first.images, first.skipped, first.stop, state.global_step) == (4, 4, False, 1)
    second = train_step(ctx, batches, state)
    assert (second.images, second.skipped, second.stop, state.global_step) == (8, 0, True, 2)
    assert second.lr == 0.1 and math.isfinite(second.loss) and ctx.scheduler.last_epoch == 2


def test_the_epoch_record_is_the_stats_fields_in_order():
    """metrics.jsonl's keys: EpochStats' fields, with evaluate's result spread as val_<key>."""
    from rednet.engine.meter import EpochStats

    stats = EpochStats(epoch=3, global_step=30, train_loss=0.5, lr=0.1, images_per_s=9.0, data_wait_s=0.01,
                       epoch_time_s=2.0, skipped_images=1)
    keys = ["epoch", "global_step", "train_loss", "lr", "images_per_s", "data_wait_s", "epoch_time_s",
            "skipped_images"]
    assert list(stats.record()) == keys + ["best_top1", "time"]
    stats.val = {"top1": 50.0, "count": 8}
    assert list(stats.record()) == keys + ["val_top1", "val_count", "best_top1", "time"]
