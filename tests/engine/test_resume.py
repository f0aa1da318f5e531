"""Resuming a run: which checkpoint, what it restores, and what it refuses to do to a run directory's results;
the class names a checkpoint stores, against the data of a resume or an evaluation."""
from __future__ import annotations

import json

import pytest

from rednet.engine import load_config

from ..helpers import CONFIGS, load_tool

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


# --- what a run directory's results allow ------------------------------------------------------------------


def _args(out, *extra):
    sets = [a for item in TINY for a in ("--set", item)]
    return ["--config", str(CONFIGS / "digits.yaml"), "--output", str(out), *sets, *extra]


def _snapshot(run_dir) -> dict[str, bytes]:
    """The results: every file but the trainer's lock, which says who runs there."""
    from rednet.engine.rundir import RunDir

    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file() and p.name != RunDir.LOCK}


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A run directory after one finished epoch (of two): checkpoint-000000002.pt, best.pt, last.pt, metrics."""
    out = tmp_path_factory.mktemp("one-epoch")
    assert load_tool("train").main(_args(out, "--set", "train.epochs=1")) == 0
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_unreadable_checkpoints_never_start_over_on_results(one_epoch, tmp_path, capsys):
    """Every rolling checkpoint truncated: --resume auto refuses instead of training from epoch 1 over best.pt."""
    from rednet.engine.rundir import RunDir

    out = _copy(one_epoch, tmp_path / "run")
    for path in RunDir(out).checkpoints() + [out / "last.pt"]:
        path.write_bytes(path.read_bytes()[:1000])
    before = _snapshot(out)
    train = load_tool("train")
    capsys.readouterr()
    assert train.main(_args(out, "--resume", "auto")) == 2
    log = _printed(capsys)
    assert "error: " in log and "Traceback" not in log
    assert "holds results (1 rolling checkpoint, best.pt, last.pt, metrics.jsonl (1 epoch records))" in log
    assert "checkpoint-000000002.pt is truncated" in log and "--restart" in log and "--output" in log
    assert train.main(_args(out)) == 2  # no --resume: the same refusal
    assert "pass --resume auto to continue that run" in _printed(capsys)
    assert _snapshot(out) == before  # nothing touched
    # --restart keeps every old byte, in previous-<time>/, and starts over.
    assert train.main(_args(out, "--restart")) == 0
    (previous,) = out.glob("previous-*")
    assert _snapshot(previous) == {k: v for k, v in before.items()}
    assert [r["epoch"] for r in _records(out)] == [1, 2]


def _printed(capsys) -> str:
    # Log lines go to stdout, the one `error:` line of a refusal to stderr.
    captured = capsys.readouterr()
    return captured.out + captured.err


def _foreign_checkpoint(state: dict, path, step: int):
    """A checkpoint of another config (3 classes instead of 4) named after a later step."""
    from rednet.engine import config_to_dict
    from rednet.engine.builder import build_model
    from rednet.engine.checkpoint import save_checkpoint

    cfg = load_config(CONFIGS / "digits.yaml", [*TINY, "model.num_classes=3"])
    save_checkpoint({**state, "config": config_to_dict(cfg), "model": build_model(cfg).state_dict(),
                     "global_step": step}, path)


def test_resume_auto_skips_a_checkpoint_of_another_config(one_epoch, tmp_path, capsys):
    from rednet.engine.checkpoint import read_checkpoint

    out = _copy(one_epoch, tmp_path / "run")
    own = read_checkpoint(out / "checkpoint-000000002.pt")
    _foreign_checkpoint(own, out / "checkpoint-000000009.pt", 9)
    foreign = (out / "checkpoint-000000009.pt").read_bytes()
    capsys.readouterr()
    assert load_tool("train").main(_args(out, "--resume", "auto")) == 0
    log = _printed(capsys)
    assert "resume: skipping" in log and "model.num_classes: 3 -> 4" in log
    assert "resumed from " + str(out / "checkpoint-000000002.pt") in log
    # Set aside, byte for byte: the resumed run neither pruned nor overwrote it.
    assert (out / "checkpoint-000000009.pt.other-config").read_bytes() == foreign
    last = read_checkpoint(out / "last.pt")
    assert last["global_step"] == 4 and last["config"]["model"]["num_classes"] == 4
    assert [r["epoch"] for r in _records(out)] == [1, 2]
    # Going back to an older checkpoint of the same directory would leave two histories in it.
    assert load_tool("train").main(_args(out, "--resume", str(out / "checkpoint-000000002.pt"))) == 2
    assert "holds checkpoints newer than checkpoint-000000002.pt" in _printed(capsys)


def test_only_a_checkpoint_of_another_config_is_refused(one_epoch, tmp_path, capsys):
    from rednet.engine.checkpoint import read_checkpoint

    out = _copy(one_epoch, tmp_path / "run")
    _foreign_checkpoint(read_checkpoint(out / "last.pt"), out / "checkpoint-000000009.pt", 9)
    for name in ("checkpoint-000000002.pt", "last.pt"):
        (out / name).unlink()
    before = _snapshot(out)
    train = load_tool("train")
    capsys.readouterr()
    assert train.main(_args(out, "--resume", "auto")) == 2
    log = _printed(capsys)
    assert "written by another config (model.num_classes: 3 -> 4)" in log and "--allow-config-change" in log
    # Allowed, but the weights cannot fit a 4-class model: still a clear error, not a traceback.
    assert train.main(_args(out, "--resume", "auto", "--allow-config-change")) == 2
    log = _printed(capsys)
    assert "do not fit the model" in log and "Traceback" not in log
    assert _snapshot(out) == before


def test_resume_from_best_pt_or_an_older_checkpoint_is_a_clear_error(one_epoch, tmp_path, capsys):
    out = _copy(one_epoch, tmp_path / "run")
    train = load_tool("train")
    capsys.readouterr()
    assert train.main(_args(out, "--resume", str(out / "best.pt"))) == 2
    log = _printed(capsys)
    assert "holds no optimizer state" in log and "resume from last.pt or a checkpoint-*.pt" in log
    assert "KeyError" not in log
    with pytest.raises(SystemExit) as e:  # argparse: one or the other
        train.main(_args(out, "--resume", "auto", "--restart"))
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_allow_config_change_help_names_every_key_a_resume_may_change():
    from rednet.engine import RESUME_SAFE_KEYS

    help_text = " ".join(load_tool("train").build_parser().format_help().split())
    assert "--allow-config-change" in help_text and ", ".join(RESUME_SAFE_KEYS) in help_text


class _Killed(BaseException):
    """Stands in for a kill -9: nothing after it runs (BaseException: no handler in the trainer catches it)."""


def test_a_kill_between_an_epochs_metrics_line_and_its_checkpoint(tmp_path, monkeypatch, capsys):
    """The resumed run leaves one metrics record per epoch, and removes the temporary files of interrupted writes."""
    from rednet.engine.checkpoint import read_checkpoint
    from rednet.engine.trainrun import TrainRun

    out = tmp_path / "run"
    save = TrainRun.save

    def killed_at_the_end_of_epoch_2(run):
        if run.state.epoch == 2 and run.state.iteration == 0:
            raise _Killed
        return save(run)

    monkeypatch.setattr(TrainRun, "save", killed_at_the_end_of_epoch_2)
    with pytest.raises(_Killed):
        load_tool("train").main(_args(out))
    monkeypatch.setattr(TrainRun, "save", save)
    assert [r["epoch"] for r in _records(out)] == [1, 2]
    assert read_checkpoint(out / "last.pt")["epoch"] == 1  # epoch 2's record, not its checkpoint
    # What interrupted writes leave: a checkpoint's temporary file, and last.pt's link in the making.
    (out / ".checkpoint-000000004.pt.k3j_x9q2.tmp").write_bytes(b"\0" * (1 << 20))
    (out / ".last.pt.link").write_bytes(b"\0")
    capsys.readouterr()
    assert load_tool("train").main(_args(out, "--resume", "auto")) == 0
    assert [r["epoch"] for r in _records(out)] == [1, 2]
    assert [p.name for p in out.glob(".*")] == [".lock"]
    assert read_checkpoint(out / "last.pt")["global_step"] == 4
    log = _printed(capsys)
    assert "dropped 1 record(s) after epoch 1" in log and "removed 2 temporary file(s) (1.0 MB)" in log


def test_a_stop_on_an_epochs_last_step_is_recorded_with_the_epochs_real_numbers(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the last step of epoch 1: the checkpoint holds the finished steps and their statistics, and
    the resumed run records epoch 1 with the loss of an uninterrupted run, not 0 at 0 img/s."""
    import os
    import signal

    from rednet.engine import step
    from rednet.engine.checkpoint import read_checkpoint

    assert load_tool("train").main(_args(tmp_path / "straight")) == 0
    forward_backward = step._forward_backward

    def ctrl_c_in_the_last_step(ctx, batches, state):
        if (state.epoch, state.iteration) == (0, 1):
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler asks for a stop after this step
        return forward_backward(ctx, batches, state)

    out = tmp_path / "stopped"
    monkeypatch.setattr(step, "_forward_backward", ctrl_c_in_the_last_step)
    assert load_tool("train").main(_args(out)) == 130
    monkeypatch.setattr(step, "_forward_backward", forward_backward)
    state = read_checkpoint(out / "last.pt")
    assert (state["epoch"], state["iteration"], state["global_step"]) == (0, 2, 2)
    assert not (out / "metrics.jsonl").exists()
    capsys.readouterr()
    assert load_tool("train").main(_args(out, "--resume", "auto")) == 0
    straight, resumed = _records(tmp_path / "straight"), _records(out)
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(straight, resumed):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-12) and b["train_loss"] > 0
        assert b["images_per_s"] > 0 and b["epoch_time_s"] > 0
    assert f"epoch 1/2: train loss {straight[0]['train_loss']:.4f}" in _printed(capsys)


def test_resume_at_another_world_size_says_what_changes(tmp_path, capsys):
    """A checkpoint of 2 processes, 1 step into an epoch of 4, resumed by 1: the batch, the peak lr (optim.lr null),
    the schedule and the position in the epoch, in numbers."""
    from rednet.engine.checkpoint import read_checkpoint, save_checkpoint

    sets = ("--set", "optim.lr=null", "--set", "train.max_iters_per_epoch=null", "--set", "train.epochs=1",
            "--set", "train.ckpt_every_iters=1", "--set", "train.keep_last=10")
    first = tmp_path / "first"
    assert load_tool("train").main(_args(first, *sets)) == 0
    state = read_checkpoint(first / "checkpoint-000000001.pt")
    assert (state["epoch"], state["iteration"]) == (0, 1)
    # As if 2 processes wrote it: then an epoch of the 32 images had 4 steps of 2 x 4.
    (tmp_path / "run").mkdir()
    save_checkpoint({**state, "world_size": 2, "rng": state["rng"] * 2}, tmp_path / "run" / "checkpoint-000000001.pt")
    capsys.readouterr()
    assert load_tool("train").main(_args(tmp_path / "run", *sets, "--resume", "auto")) == 0
    assert ("resuming a run of 2 processes with 1: the global batch changes from 8 to 4 images per step; optim.lr "
            "is null, so the peak lr follows it, from 0.003125 to 0.001563; an epoch has 8 steps instead of 4, so the "
            "schedule continues at step 1 of 8 (it was of 4); epoch 1 was 1 steps in (8 images of its shuffled "
            "order); it continues after its first 4 images, so 4 of them are trained on twice; its record in "
            "metrics.jsonl covers only the steps after this resume; the data order differs from an uninterrupted "
            "run") in _printed(capsys)


def test_a_finished_run_says_so_and_how_to_train_again_without_validating(one_epoch, tmp_path, monkeypatch, capsys):
    """A second `make train`: --resume auto on a run that has done its epochs changes nothing and validates nothing."""
    from rednet.engine import trainer

    out = _copy(one_epoch, tmp_path / "run")
    before = _snapshot(out)

    def no_validation(*args, **kwargs):
        raise AssertionError("a finished run was validated again")

    monkeypatch.setattr(trainer, "evaluate", no_validation)
    capsys.readouterr()
    assert load_tool("train").main(_args(out, "--set", "train.epochs=1", "--resume", "auto")) == 0
    log = _printed(capsys)
    best = _records(out)[-1]["best_top1"]
    assert (f"{out} holds a finished run: 1 of 1 epochs done, best top-1 {best:.2f}; its results are there (best.pt, "
            f"last.pt, metrics.jsonl). To train again: --restart (moves them into {out}/previous-<time>/ and starts "
            "over), --set train.epochs=N with N > 1 (continues this run), or another --output") in log
    assert '"finished": true' in log
    assert _snapshot(out) == before


def test_metrics_lines_that_are_not_utf8_are_dropped_and_counted(one_epoch, tmp_path, capsys):
    out = _copy(one_epoch, tmp_path / "run")
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"epoch": 2, "train_loss": \xff\xfe\n')  # a disk error's bytes, not UTF-8
    train = load_tool("train")
    capsys.readouterr()
    assert train.main(_args(out)) == 2  # no --resume: the refusal counts the lines
    assert "metrics.jsonl (2 epoch records)" in _printed(capsys)
    assert train.main(_args(out, "--resume", "auto")) == 0
    assert "metrics.jsonl: dropped 1 damaged line(s)" in _printed(capsys)
    assert [r["epoch"] for r in _records(out)] == [1, 2]


def test_where_flock_fails_the_trainer_warns_and_removes_no_leftovers(tmp_path, monkeypatch, capsys):
    """Lustre without -o flock answers ENOSYS: the run goes on, says that nothing keeps a second trainer out, and
    leaves the temporary files it cannot know to be dead."""
    import errno
    import os

    from rednet.engine import rundir, runlock

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    out = tmp_path / "run"
    out.mkdir()
    leftover = out / ".checkpoint-000000002.pt.k3j_x9q2.tmp"
    leftover.write_bytes(b"\0")
    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    capsys.readouterr()
    assert load_tool("train").main(_args(out, "--set", "train.epochs=1")) == 0
    log = _printed(capsys)
    assert (f"cannot lock {out / '.lock'} (flock: Function not implemented; the file system does not support it, "
            "e.g. Lustre mounted without -o flock): nothing keeps a second trainer from writing there at the same "
            "time, and leftovers of interrupted writes are not removed") in log
    assert leftover.exists() and not rundir.RunDir(out).locked


# --- the class names a checkpoint stores -------------------------------------------------------------------

# test_resnet on an ImageFolder of 16 px PNGs: classes are folder names.
FOLDER = ["model.name=test_resnet", "model.num_classes=2", "data.img_size=16", "data.batch_size=4",
          "data.workers=0", "optim.lr=0.05", "train.log_every=1", "train.label_smoothing=0.0",
          "train.max_iters_per_epoch=1", "train.epochs=2"]


def _image_folder(root, classes, splits=("train", "val"), per_class=2):
    """``root/<split>/<class>/*.png``, 20x20 RGB noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _folder_args(data, out, *extra):
    sets = [a for item in FOLDER for a in ("--set", item)]
    return ["--config", str(CONFIGS / "digits.yaml"), "--data", str(data), "--output", str(out), *sets, *extra]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """One epoch (of two) on train/{cat,dog}: the data and the run directory."""
    root = tmp_path_factory.mktemp("classes")
    data = _image_folder(root / "data", ("cat", "dog"))
    assert load_tool("train").main(_folder_args(data, root / "run", "--set", "train.epochs=1")) == 0
    return data, root / "run"


def _renamed(data, tmp_path, old="dog", new="wolf"):
    """A copy of the data with one class folder renamed in both splits: same count, same order."""
    copy = _copy(data, tmp_path / "renamed")
    for split in ("train", "val"):
        (copy / split / old).rename(copy / split / new)
    return copy


def test_every_checkpoint_stores_the_class_names(folder_run):
    import torch

    _, out = folder_run
    for name in ("checkpoint-000000001.pt", "best.pt", "last.pt"):
        state = torch.load(out / name, weights_only=True)  # plain data: no pickled code to allow
        assert state["classes"] == ["cat", "dog"], name


def test_resume_on_renamed_class_folders_is_refused_unless_allowed(folder_run, tmp_path, capsys):
    from rednet.engine.checkpoint import read_checkpoint

    data, run = folder_run
    out, renamed = _copy(run, tmp_path / "run"), _renamed(data, tmp_path)
    before = _snapshot(out)
    train = load_tool("train")
    capsys.readouterr()
    assert train.main(_folder_args(renamed, out, "--resume", "auto")) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in captured.out + captured.err
    assert f"cannot resume from {out / 'checkpoint-000000001.pt'}" in errors[0]
    assert "label 1: 'dog' -> 'wolf'" in errors[0] and "--allow-config-change" in errors[0]
    assert _snapshot(out) == before  # refused before the directory changed
    assert train.main(_folder_args(renamed, out, "--resume", "auto", "--allow-config-change")) == 0
    assert "continuing from" in _printed(capsys)
    last = read_checkpoint(out / "last.pt")
    assert last["global_step"] == 2 and last["classes"] == ["cat", "wolf"]


def test_a_checkpoint_without_class_names_still_resumes(folder_run, tmp_path, capsys):
    """Checkpoints written before the names were stored: only the class count is checked."""
    from rednet.engine.checkpoint import read_checkpoint, save_checkpoint

    data, run = folder_run
    out = _copy(run, tmp_path / "run")
    for name in ("checkpoint-000000001.pt", "best.pt"):
        state = read_checkpoint(out / name)
        del state["classes"]
        save_checkpoint(state, out / name)
    (out / "last.pt").unlink()
    capsys.readouterr()
    assert load_tool("train").main(_folder_args(_renamed(data, tmp_path), out, "--resume", "auto")) == 0
    assert "stores no class names (written before checkpoints held them): only the class count is checked" in (
        _printed(capsys))
    assert read_checkpoint(out / "last.pt")["classes"] == ["cat", "wolf"]


def _eval(checkpoint, data, *extra):
    return ["--checkpoint", str(checkpoint), "--data", str(data), "--workers", "0", *extra]


def test_eval_on_renamed_class_folders_is_refused_unless_allowed(folder_run, tmp_path, capsys):
    data, run = folder_run
    renamed = _renamed(data, tmp_path)
    evaluate = load_tool("eval")
    capsys.readouterr()
    assert evaluate.main(_eval(run / "best.pt", renamed, "--json", str(tmp_path / "r.json"))) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in captured.out + captured.err
    assert f"the folder {renamed / 'val'} has other class names than the model was trained on" in errors[0]
    assert "label 1: 'dog' -> 'wolf'" in errors[0] and "--allow-config-change" in errors[0]
    assert "eval step" not in captured.out and not (tmp_path / "r.json").exists()
    assert evaluate.main(_eval(run / "best.pt", renamed, "--allow-config-change")) == 0
    assert "scoring although the class names differ from the model's (label 1: 'dog' -> 'wolf')" in (
        _printed(capsys))
    assert evaluate.main(_eval(run / "best.pt", data)) == 0  # the names it was trained on


@pytest.mark.parametrize("classes", [("cat", "dog", "fox"), ("cat",)], ids=["more", "fewer"])
def test_eval_of_a_checkpoint_on_a_folder_of_another_class_count(folder_run, tmp_path, capsys, classes):
    """3 folder classes on a 2-class model ended in an IndexError traceback; 1 was scored, exit 0."""
    _, run = folder_run
    data = _image_folder(tmp_path / "data", classes, splits=("val",))
    capsys.readouterr()
    assert load_tool("eval").main(_eval(run / "best.pt", data)) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in captured.out + captured.err
    assert (f"the folder {data / 'val'} has {len(classes)} classes but the model has 2 (trained in "
            f"{run / 'best.pt'}): evaluate it on data of the 2 classes it was trained on") in errors[0]
    assert ("would need a mapping" in errors[0]) == (len(classes) < 2)


def test_config_changes_show_urls_redacted():
    """The lines a resume logs about config changes never show a URL's token (model.pretrained)."""
    from rednet.engine import config_to_dict
    from rednet.engine.resume import config_changes

    def cfg(token):
        return config_to_dict(_cfg("run", f"model.pretrained=https://host/w.pth?token={token}"))

    safe, unsafe = config_changes(cfg("NEW"), cfg("OLD"))
    assert not safe and unsafe == ["model.pretrained: 'https://host/w.pth?token=***' -> 'https://host/w.pth?token=***'"]
