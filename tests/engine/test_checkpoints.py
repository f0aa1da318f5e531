"""Training checkpoints on disk: the digest each file carries, what a kill -9 at any instant of a save leaves,
and the contract a checkpoint keeps with its readers (load_model_from_checkpoint, last.pt)."""
from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import torch

from rednet.engine import CheckpointError, config_to_dict, load_config, load_model_from_checkpoint
from rednet.engine.builder import build_model
from rednet.engine.checkpoint import read_checkpoint, save_checkpoint
from rednet.engine.rundir import RunDir

from ..helpers import digits_cfg, load_tool

_MARK = bytes(range(256))  # easy to find in the file: the bytes of the tensor below


def _state(step: int) -> dict:
    return {"config": {}, "model": {"w": torch.frombuffer(bytearray(_MARK), dtype=torch.uint8).clone()},
            "global_step": step}


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip-tensor":
        data[data.index(_MARK) + 100] ^= 0x01
    elif how == "flip-digest":
        data[-1] = ord("0") if data[-1] != ord("0") else ord("1")
    elif how == "truncate-1":
        del data[-1:]
    elif how == "truncate-half":
        del data[len(data) // 2:]
    elif how == "append":
        data += b"\0"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip-tensor", "flip-digest", "truncate-1", "truncate-half", "append"])
def test_damaged_checkpoint_is_refused_from_the_file_alone(tmp_path, how):
    path = save_checkpoint(_state(1), tmp_path / "checkpoint-000000001.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no sidecar to lose
    assert torch.equal(read_checkpoint(path)["model"]["w"], _state(1)["model"]["w"])
    _damage(path, how)
    if how == "flip-tensor":
        torch.load(path, weights_only=True)  # torch alone does not notice
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        read_checkpoint(path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    """Checkpoints, best.pt, last.pt, config.yaml and weights files get 0666 less the umask, as any new file does:
    teammates can read results (tempfile.mkstemp's 0600 kept them out)."""
    from rednet.models import save_weights

    run_dir = RunDir(tmp_path / "run")
    old = os.umask(umask)
    try:
        run_dir.save_checkpoint(_state(1), step=1)
        run_dir.save_best(_state(1))
        run_dir.write_config({"train": {"epochs": 1}})
        save_weights({"stem.0.conv.weight": torch.zeros(4)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    written = [run_dir.checkpoint(1), run_dir.last, run_dir.best, run_dir.config, tmp_path / "w.safetensors"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(mode) for p in written}


def test_checkpoint_is_a_plain_zip_with_the_digest_as_its_comment(tmp_path):
    import zipfile

    path = save_checkpoint(_state(3), tmp_path / "c.pt")
    data = path.read_bytes()
    comment = zipfile.ZipFile(path).comment
    assert comment.startswith(b"rednet-sha256:")
    assert comment[len(b"rednet-sha256:"):].decode() == hashlib.sha256(data[:-len(comment)]).hexdigest()


def test_checkpoint_of_an_earlier_version_reads_with_its_sidecar_only(tmp_path):
    legacy = tmp_path / "checkpoint-000000001.pt"
    torch.save({"format": "rednet-train/1", **_state(1)}, legacy)
    sidecar = legacy.with_name(legacy.name + ".sha256")
    sidecar.write_text(f"{hashlib.sha256(legacy.read_bytes()).hexdigest()}  {legacy.name}\n")
    assert read_checkpoint(legacy)["global_step"] == 1
    _damage(legacy, "flip-tensor")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(legacy)
    sidecar.unlink()
    with pytest.raises(CheckpointError, match="does not end with the sha256 digest"):
        read_checkpoint(legacy)


def _trained_like_checkpoint(path):
    from rednet.engine.builder import build_model

    cfg = load_config(None, ["model.name=resnet10t", "model.num_classes=4", "data.dataset=synthetic",
                             "data.img_size=16", "data.synthetic_val_size=8", "data.workers=0"])
    save_checkpoint({"config": config_to_dict(cfg), "model": build_model(cfg, pretrained=False).state_dict(),
                     "ema": None}, path)
    return path


def test_eval_tool_refuses_a_checkpoint_with_a_flipped_byte(tmp_path, capsys):
    path = _trained_like_checkpoint(tmp_path / "best.pt")
    assert load_tool("eval").main(["--checkpoint", str(path), "--batch-size", "8"]) == 0
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the weights
    path.write_bytes(bytes(data))
    path.with_name(path.name + ".sha256").unlink(missing_ok=True)  # what deleting a sidecar did: no check
    capsys.readouterr()
    assert load_tool("eval").main(["--checkpoint", str(path), "--batch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {path} is corrupt" in err and "Traceback" not in err


# --- kill -9 at every step of an epoch's end -----------------------------------------------

_KILLED = 77
# Every call that changes what a directory holds goes through one of these; mkstemp and the
# directory fsync go through os.open.
_FS_OPS = ("open", "fsync", "replace", "rename", "link", "unlink", "remove")


def _in_child_killed_at(k: int, action) -> int:
    """Run ``action`` in a forked child that dies (``os._exit``, like kill -9: no cleanup) just before
    its k-th file-system operation; its exit code: ``_KILLED``, or 0 if it finished first."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            count = 0

            def dying(fn):
                def call(*args, **kwargs):
                    nonlocal count
                    count += 1
                    if count == k:
                        os._exit(_KILLED)
                    return fn(*args, **kwargs)
                return call

            for name in _FS_OPS:
                setattr(os, name, dying(getattr(os, name)))
            action()
            code = 0
        except BaseException as e:  # noqa: BLE001  report anything, then leave without running pytest's exit
            print(f"child failed: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _epoch_end_run(run_dir):
    """A trainer run (a tiny linear model) that has done epoch 1 (steps 1, 2; best top-1 50) in ``run_dir``,
    and a function that ends epoch 2 at step 4 with a better top-1 (60)."""
    from rednet.engine import trainrun
    from rednet.engine.builder import build_scheduler
    from rednet.engine.distributed import DistInfo
    from rednet.engine.logger import RunLogger
    from rednet.engine.meter import EpochStats

    cfg = load_config(None, ["train.keep_last=2", "train.epochs=3", f"train.output={run_dir}"])
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run = trainrun.TrainRun(cfg, run_dir, DistInfo(), model, optimizer, build_scheduler(cfg, optimizer, 2), None, None)
    def end_epoch(step: int, top1: float) -> None:
        with torch.no_grad():
            model.weight.fill_(step)
        run.state.global_step = step
        stats = EpochStats(epoch=run.state.epoch + 1, global_step=step, train_loss=1.0, lr=0.1, images_per_s=1.0,
                           data_wait_s=0.0, epoch_time_s=1.0, skipped_images=0)
        logger = RunLogger(run_dir, enabled=True)
        val = {"top1": top1, "top5": 100.0, "loss": 1.0, "images_per_s": 1.0, "count": 8}
        trainrun.end_epoch(run, stats, val, logger)
        logger.close()

    with torch.no_grad():
        model.weight.fill_(1)
    run.state.global_step = 1
    run.save()
    end_epoch(2, 50.0)
    return lambda: end_epoch(4, 60.0)


def _check_old_or_new(run_dir) -> None:
    """Each name holds the complete old file or the complete new one, verified from itself alone."""
    steps = {}
    for name, allowed in [("checkpoint-000000001.pt", {1}), ("checkpoint-000000002.pt", {2}),
                          ("checkpoint-000000004.pt", {4}), ("best.pt", {2, 4}), ("last.pt", {2, 4})]:
        if (run_dir / name).exists():
            state = read_checkpoint(run_dir / name)
            assert state["global_step"] in allowed, name
            assert float(state["model"]["weight"][0, 0]) == state["global_step"], name
            steps[name] = state["global_step"]
    assert {"checkpoint-000000002.pt", "best.pt", "last.pt"} <= steps.keys()
    path, state = RunDir(run_dir).find_resume()
    assert state["global_step"] in (2, 4)
    if state["global_step"] == 4:  # the checkpoint says top-1 60 is the best: best.pt must hold it
        assert steps["best.pt"] == 4 and state["best_top1"] == 60.0
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs in ([1], [1, 2])
    RunDir(run_dir).lock()
    RunDir(run_dir).remove_orphans()
    left = {p.name for p in run_dir.iterdir()} - {"tb", "metrics.jsonl", RunDir.LOCK}
    assert left <= {"checkpoint-000000001.pt", "checkpoint-000000002.pt", "checkpoint-000000004.pt", "best.pt",
                    "last.pt"}, left


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")
def test_kill_at_any_instant_of_an_epoch_end_leaves_every_checkpoint_old_or_new(tmp_path):
    """Metrics line, best.pt, the rolling checkpoint, last.pt and pruning: a kill before each file operation."""
    k = 0
    while True:
        k += 1
        run_dir = tmp_path / f"kill-{k}"
        end_epoch_2 = _epoch_end_run(run_dir)
        code = _in_child_killed_at(k, end_epoch_2)
        assert code in (0, _KILLED), f"the child failed at kill point {k}"
        _check_old_or_new(run_dir)
        if code == 0:  # it finished before reaching operation k: every instant was covered
            break
        assert k < 200
    state = read_checkpoint(run_dir / "last.pt")
    assert state["global_step"] == 4 and not (run_dir / "checkpoint-000000001.pt").exists()  # pruned when done
    assert k > 10


# --- the checkpoint contract (used by the visualization tool) -------------------------------


def _write_ckpt(path, cfg, model, ema=None):
    return save_checkpoint({"config": config_to_dict(cfg), "model": model.state_dict(), "ema": ema,
                            "epoch": 1, "iteration": 0, "global_step": 5}, path)


def test_load_model_from_checkpoint_roundtrip(tmp_path):
    cfg = digits_cfg()
    model = build_model(cfg)
    path = _write_ckpt(tmp_path / "checkpoint-000000005.pt", cfg, model)
    # Plain data only: loadable without executing pickled code.
    assert torch.load(path, weights_only=True)["config"]["model"]["name"] == "rednet26"
    loaded, config = load_model_from_checkpoint(path)
    assert config["model"]["num_classes"] == 10 and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_load_model_from_checkpoint_uses_ema_only_when_evaluated(tmp_path):
    cfg = digits_cfg("train.ema=true", "train.eval_ema=true")
    model = build_model(cfg)
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    loaded, _ = load_model_from_checkpoint(_write_ckpt(tmp_path / "a.pt", cfg, model, ema))
    assert torch.equal(loaded.fc.weight, ema["fc.weight"])
    cfg = digits_cfg("train.ema=true")
    loaded, _ = load_model_from_checkpoint(_write_ckpt(tmp_path / "b.pt", cfg, model, ema))
    assert torch.equal(loaded.fc.weight, model.fc.weight)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage_no_sidecar"])
def test_corrupt_checkpoint_is_a_clear_error_and_resume_takes_previous(tmp_path, damage):
    cfg = digits_cfg()
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
