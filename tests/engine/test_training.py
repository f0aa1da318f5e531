"""rednet.engine: config schema, schedule, checkpoint I/O and the train/eval loop."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from rednet.engine import (
    CheckpointError,
    ConfigError,
    config_to_dict,
    load_config,
    load_model_from_checkpoint,
)
from rednet.engine.builder import build_model
from rednet.engine.checkpoint import save_checkpoint
from rednet.engine.rundir import RunDir

from ..helpers import ROOT


def _digits_cfg(*extra: str):
    return load_config(None, ["model.name=rednet26", "model.num_classes=10", "data.dataset=digits", "data.img_size=32",
                              *extra])


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
        bad.with_name(bad.name + ".sha256").unlink(missing_ok=True)  # checkpoints no longer have sidecars
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        load_model_from_checkpoint(bad)
    assert RunDir(tmp_path).checkpoints() == [bad, good]
    path, state = RunDir(tmp_path).find_resume()
    assert path == good and state["global_step"] == 5


def test_link_last_points_at_the_newest_checkpoint_and_survives_pruning(tmp_path):
    from rednet.engine.checkpoint import read_checkpoint

    run_dir = RunDir(tmp_path)
    first = run_dir.save_checkpoint({"config": {}, "model": {}, "global_step": 1}, step=1)
    second = run_dir.save_checkpoint({"config": {}, "model": {}, "global_step": 2}, step=2)
    assert (tmp_path / "last.pt").samefile(second) and not (tmp_path / "last.pt").samefile(first)
    run_dir.prune(keep=0)
    assert not second.exists() and read_checkpoint(tmp_path / "last.pt")["global_step"] == 2  # digest verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the digest is inside: no sidecar


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_from_checkpoint(tmp_path / "nope.pt")


# --- config schema --------------------------------------------------------------------


def test_config_unknown_keys_name_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'train\.lr'.*did you mean 'optim\.lr'"):
        load_config(None, ["train.lr=0.1"])
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"'data\.batch_sise'.*'data\.batch_size'"):
        load_config(f)
    f.write_text("trian:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=r"'trian'.*'train'"):
        load_config(f)


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=abc", r"'data\.batch_size' expects an integer, got 'abc'"),
    ("data.batch_size=0", r"'data\.batch_size' expects an integer >= 1, got 0"),
    ("train.amp=fp8", r"'train\.amp' expects one of 'none', 'bf16', 'fp16'"),
    ("data.scale=[0.5]", r"'data\.scale' expects a list of 2 values"),
    ("train.deterministic=1", r"'train\.deterministic' expects true or false"),
    ("train.eval_ema=true", r"'train\.eval_ema' expects false unless train\.ema is true"),
    ("optim.lr=-1", r"'optim\.lr' expects null or a number > 0"),
    ("model.kwargs=3", r"'model\.kwargs' expects a mapping"),
])
def test_config_wrong_values_name_key_and_expectation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("optim.warmup_epochs=.inf", r"'optim\.warmup_epochs' expects a finite number, got inf"),
    ("optim.base_lr=.inf", r"'optim\.base_lr' expects a finite number"),
    ("optim.weight_decay=.nan", r"'optim\.weight_decay' expects a finite number, got nan"),
    ("data.scale=[0.5, .inf]", r"'data\.scale' expects finite numbers"),
    ("data.mean=[0.5, .inf, 0.5]", r"'data\.mean' expects finite numbers"),
    ("data.color_jitter=-.inf", r"'data\.color_jitter' expects a finite number"),
    ("train.seed=4294967296", r"'train\.seed' expects an integer in \[0, 2\*\*32\)"),
    ("train.seed=-1", r"'train\.seed' expects an integer in \[0, 2\*\*32\)"),
    ("data.split_seed=4294967296", r"'data\.split_seed' expects an integer in \[0, 2\*\*32\)"),
    ("train.cpu_threads=1025", r"'train\.cpu_threads' expects null or an integer in \[1, 1024\]"),
])
def test_config_values_that_would_fail_later(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_config_bounds_take_their_edges():
    cfg = load_config(None, ["train.seed=4294967295", "data.split_seed=4294967295", "train.cpu_threads=1024",
                             "train.cutmix=1.0", "data.batch_size=2"])
    assert (cfg.train.seed, cfg.data.split_seed, cfg.train.cpu_threads) == (2**32 - 1, 2**32 - 1, 1024)


def test_config_overrides_types_and_roundtrip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  name: resnet18\noptim:\n  lr: 0.5\n")
    cfg = load_config(f, ["optim.lr=0.1", "data.scale=[0.5, 1]", "optim.clip_grad=null", "train.ema=true",
                          "model.kwargs={drop_path_rate: 0.1}", "data.root=/x=y"])
    assert cfg.model.name == "resnet18" and cfg.optim.lr == 0.1 and cfg.data.scale == (0.5, 1.0)
    assert cfg.train.ema is True and cfg.model.kwargs == {"drop_path_rate": 0.1} and cfg.data.root == "/x=y"
    assert isinstance(cfg.optim.weight_decay, float)
    from rednet.engine.config_data import config_from_dict

    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_paper_configs_resolve_to_the_recipe():
    from rednet.engine.builder import peak_lr

    for depth in (26, 38, 50, 101, 152):
        cfg = load_config(f"rednet{depth}.yaml")
        assert cfg.model.name == f"rednet{depth}"
        assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.9, 1e-4)
        assert (cfg.train.epochs, cfg.train.label_smoothing, cfg.optim.warmup_factor) == (130, 0.1, 0.25)
        assert (cfg.data.img_size, round(cfg.data.img_size / cfg.data.eval_crop_pct)) == (224, 256)
        assert peak_lr(cfg, world_size=64) == pytest.approx(0.8)  # 32 x 64 = 2048
        assert peak_lr(cfg, world_size=8) == pytest.approx(0.1)


# configs/rednet50.yaml as it was before the recipe moved into configs/imagenet_recipe.yaml
# (git show e2c67ba:configs/rednet50.yaml, comments dropped); the other depths differed only
# in model.name and train.output.
_PAPER_CONFIG_BEFORE_BASE_FILES = """
model:
  name: rednet{depth}
  num_classes: 1000
data:
  dataset: imagenet
  root: null
  img_size: 224
  batch_size: 32
  workers: 8
  scale: [0.08, 1.0]
  ratio: [0.75, 1.3333333]
  hflip: 0.5
  color_jitter: null
  auto_augment: null
  reprob: 0.0
  interpolation: bilinear
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
  eval_crop_pct: 0.875
optim:
  name: sgd
  lr: null
  base_lr: 0.8
  base_batch_size: 2048
  momentum: 0.9
  weight_decay: 1.0e-4
  decay_bn_and_bias: true
  warmup_epochs: 5
  warmup_factor: 0.25
  min_lr_factor: 0.0
train:
  epochs: 130
  amp: bf16
  channels_last: false
  sync_bn: false
  label_smoothing: 0.1
  ema: false
  val_every: 1
  log_every: 50
  ckpt_every_iters: 2000
  keep_last: 3
  output: runs/rednet{depth}
"""


@pytest.mark.parametrize("depth", [26, 38, 50, 101, 152])
def test_paper_configs_resolve_as_before_base_files(tmp_path, depth):
    before = tmp_path / "before.yaml"
    before.write_text(_PAPER_CONFIG_BEFORE_BASE_FILES.format(depth=depth))
    # Changes on purpose since: the schema's data.workers became null (min(8, CPUs) per process),
    # which the old file spelled out as the old default, 8; the recipe trains channels_last
    # (the CUDA kernels' fast path, issue 18).
    now_default = ["data.workers=null", "train.channels_last=true"]
    assert config_to_dict(load_config(f"rednet{depth}.yaml")) == config_to_dict(load_config(before, now_default))


def test_config_base_file_is_merged_under_the_including_file(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "root.yaml").write_text("optim:\n  lr: 0.3\n  momentum: 0.5\ntrain:\n  epochs: 7\n")
    (tmp_path / "recipes" / "mid.yaml").write_text("base: root.yaml\noptim:\n  momentum: 0.8\ndata:\n")
    (tmp_path / "run.yaml").write_text("base: recipes/mid.yaml\nmodel:\n  name: resnet18\ntrain:\n")
    cfg = load_config(tmp_path / "run.yaml", ["optim.lr=0.2"])  # overrides come last
    assert cfg.model.name == "resnet18" and cfg.optim.lr == 0.2 and cfg.optim.momentum == 0.8
    assert cfg.train.epochs == 7 and cfg.data == load_config(None).data  # an empty section keeps the base's


def test_config_base_file_errors_name_the_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"base file .*missing\.yaml does not exist"):
        load_config(f)
    f.write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"'base' expects a file name"):
        load_config(f)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    f.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(f)
    f.write_text("base: run.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(f)


def test_engine_exports_what_the_tools_import():
    import rednet.engine

    for name in rednet.engine.__all__:
        assert getattr(rednet.engine, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'fitt'"):
        rednet.engine.fitt


def test_the_tools_come_through_one_door():
    """The tools (``rednet/tools``, and the developer tools left in ``tools/``) import from ``rednet.engine``
    itself, never its modules; it exports exactly what they import, and the errors of the exit-code table (with
    the table)."""
    import ast

    import rednet.engine

    imported = set()
    for path in sorted([*(ROOT / "rednet" / "tools").glob("*.py"), *(ROOT / "tools").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [m for m in modules if m.startswith("rednet.engine.")], f"{path.name} imports {modules}"
            if isinstance(node, ast.ImportFrom) and node.module == "rednet.engine":
                imported |= {a.name for a in node.names}
    errors = {row.error.__name__ for row in rednet.engine.EXIT_CODES if row.error is not KeyboardInterrupt}
    assert sorted(rednet.engine.__all__) == sorted(imported | errors | {"EXIT_CODES"})


def test_run_command_ends_each_error_with_its_exit_status(capsys, caplog, monkeypatch):
    import logging
    import signal

    from rednet.engine import EXIT_CODES, NonFiniteLossError, TrainingInterrupted, run_command

    # A tool run earlier in this process left its handler on a stdout that pytest has since closed.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if type(h) is not logging.StreamHandler])

    def raising(error: BaseException):
        def command() -> int:
            raise error
        return command

    for row in EXIT_CODES:
        if row.error is TrainingInterrupted:
            assert run_command(raising(TrainingInterrupted(signal.SIGTERM, None))) == 128 + signal.SIGTERM
            assert "stopped by SIGTERM" in caplog.text
        elif row.error is KeyboardInterrupt:
            assert run_command(raising(KeyboardInterrupt()), interrupted="stopped; nothing written") == 130
            assert capsys.readouterr().err == "stopped; nothing written\n"
        elif row.error is NonFiniteLossError:  # logged, with the run's other lines
            assert run_command(raising(NonFiniteLossError("loss nan at iteration 7"))) == 3
            assert "error: loss nan at iteration 7" in caplog.text
        else:
            code = run_command(raising(row.error("what to fix:\n  the details")))
            assert (code, capsys.readouterr().err) == (row.code, "error: what to fix: the details\n")
    assert run_command(lambda: 0) == 0
    with pytest.raises(ZeroDivisionError):  # a bug is not bad input: it keeps its traceback
        run_command(lambda: 1 // 0)


def test_the_readme_quotes_the_exit_codes():
    from rednet.engine import EXIT_CODES, TrainingInterrupted

    section = (ROOT / "README.md").read_text().split("\n## Exit codes\n")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    assert rows == [f"| {'128 + N' if row.error is TrainingInterrupted else row.code} | `{row.error.__name__}` | "
                    f"{row.meaning} |" for row in EXIT_CODES]


def test_fit_runs_its_own_pre_checks(tmp_path):
    """A library caller of ``fit`` gets the checks the tool used to make: before any data is read or written."""
    from rednet.engine import fit
    from rednet.fileio import OutputDirError

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="model.name 'rednet5' is not a registered model"):
        fit(_digits_cfg("model.name=rednet5", f"train.output={tmp_path / 'run'}"))
    with pytest.raises(OutputDirError, match="train.output .* is a file, not a folder"):
        fit(_digits_cfg(f"train.output={tmp_path / 'file'}"))
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
