"""Training and evaluation in real processes: torchrun (2 gloo processes) trains, resumes bitwise exactly,
restarts a killed worker and counts an evaluation exactly; SIGTERM writes a checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rednet.engine.checkpoint import read_checkpoint
from rednet.engine.rundir import RunDir

from ..helpers import ROOT

# A timm model: the harness is model-agnostic, and resnet10t is the cheapest to step on a CPU.
TINY = ["model.name=resnet10t", "model.num_classes=4", "data.dataset=synthetic", "data.img_size=16",
        "data.batch_size=4", "data.workers=0", "data.synthetic_train_size=64", "data.synthetic_val_size=13",
        "optim.lr=0.01", "train.log_every=1", "train.label_smoothing=0.0"]


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def _env():
    # One thread per process: two processes on a shared 2-core box otherwise oversubscribe.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(args, timeout=240):
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _torchrun(nproc, script, *args):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                 str(ROOT / "tools" / script), *args])


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """Two gloo processes train one epoch, then a second torchrun resumes and trains another."""
    out = tmp_path_factory.mktemp("ddp")
    common = ["--config", "digits.yaml", "--output", str(out),
              *_sets(TINY + ["train.max_iters_per_epoch=3", "train.ckpt_every_iters=2"])]
    first = _torchrun(2, "train.py", *common, "--set", "train.epochs=1")
    assert first.returncode == 0, first.stdout + first.stderr
    second = _torchrun(2, "train.py", *common, "--set", "train.epochs=2", "--resume", "auto")
    assert second.returncode == 0, second.stdout + second.stderr
    return out, first, second


@pytest.mark.slow
def test_torchrun_train_and_resume(torchrun_run):
    out, first, second = torchrun_run
    assert "2 processes" in first.stdout and "global batch 8" in first.stdout
    assert "resumed from" in second.stdout and "epoch 1 iteration 0 (global step 3)" in second.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and [r["global_step"] for r in records] == [3, 6]
    # Validation under 2 processes with 13 images: each scored once.
    assert all(r["val_count"] == 13 for r in records)
    state = read_checkpoint(RunDir(out).checkpoints()[0])
    assert state["world_size"] == 2 and state["global_step"] == 6


@pytest.mark.slow
def test_torchrun_on_a_finished_run_says_so_on_every_rank_and_exits_0(torchrun_run):
    """Every rank returns early, together; nothing is trained, validated or written."""
    out, _, _ = torchrun_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file() and p.name != RunDir.LOCK}
    third = _torchrun(2, "train.py", "--config", "digits.yaml", "--output", str(out),
                      *_sets(TINY + ["train.max_iters_per_epoch=3", "train.ckpt_every_iters=2", "train.epochs=2"]),
                      "--resume", "auto")
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"{out} holds a finished run: 2 of 2 epochs done" in third.stdout and " val " not in third.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file() and p.name != RunDir.LOCK} == before


_FIT_THEN_GROUP = """
import sys
import torch.distributed as dist
from rednet.engine import fit, load_config
cfg = load_config("digits.yaml", sys.argv[2:], values={"train.output": sys.argv[1]})
fit(cfg, resume="auto")
sys.stdout.write(f"group left after fit: {dist.is_initialized()}\\n")  # one write: ranks share stdout
"""


@pytest.mark.slow
def test_fit_destroys_the_process_group_it_made(torchrun_run, tmp_path):
    """A group left to the interpreter's exit can abort a gloo rank at exit; fit destroys its own."""
    out, _, _ = torchrun_run
    script = tmp_path / "fit_then_group.py"
    script.write_text(_FIT_THEN_GROUP)
    res = _torchrun(2, script, str(out), *TINY, "train.max_iters_per_epoch=3", "train.ckpt_every_iters=2",
                    "train.epochs=2")  # an absolute script path stays itself under tools/
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("group left after fit: False") == 2 and "True" not in res.stdout, res.stdout + res.stderr


@pytest.fixture(scope="module")
def torchrun_straight_and_resumed(tmp_path_factory):
    """Two gloo processes train 2 epochs of 3 steps, checkpointing every step; a second pair starts from a
    copy of the step-2 checkpoint in another run directory (as if killed there) and finishes the run."""
    import shutil

    straight, resumed = tmp_path_factory.mktemp("ddp-straight"), tmp_path_factory.mktemp("ddp-resumed")
    # Mixup draws from numpy's RNG, which each rank seeds with seed + rank: if a rank resumed with
    # another rank's RNG states, its mixing weights, so the gradients, would differ. timm's
    # test_resnet (0.4 M parameters) keeps a checkpoint every step cheap.
    sets = _sets(TINY + ["model.name=test_resnet", "train.epochs=2", "train.max_iters_per_epoch=3",
                         "train.ckpt_every_iters=1", "train.keep_last=10", "train.mixup=0.2",
                         "train.deterministic=true"])
    first = _torchrun(2, "train.py", "--config", "digits.yaml", "--output", str(straight), *sets)
    assert first.returncode == 0, first.stdout + first.stderr
    shutil.copy(straight / "checkpoint-000000002.pt", resumed / "checkpoint-000000002.pt")
    second = _torchrun(2, "train.py", "--config", "digits.yaml", "--output", str(resumed), *sets,
                       "--resume", "auto")
    assert second.returncode == 0, second.stdout + second.stderr
    return straight, resumed, second


@pytest.mark.slow
def test_torchrun_resume_is_bitwise_exact(torchrun_straight_and_resumed):
    import torch

    straight, resumed, second = torchrun_straight_and_resumed
    assert "resumed from" in second.stdout and "epoch 0 iteration 2 (global step 2)" in second.stdout
    a, b = read_checkpoint(straight / "last.pt"), read_checkpoint(resumed / "last.pt")
    assert a["global_step"] == b["global_step"] == 6 and a["world_size"] == b["world_size"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"]), k
    # Each rank's RNG states are its own, and each rank got its own back.
    assert len(b["rng"]) == 2 and not torch.equal(b["rng"][0]["torch"], b["rng"][1]["torch"])
    for rank in range(2):
        assert torch.equal(a["rng"][rank]["numpy"][1], b["rng"][rank]["numpy"][1])


@pytest.mark.slow
def test_eval_tool_counts_exactly_under_torchrun(torchrun_run, tmp_path):
    out, _, _ = torchrun_run
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r1 = _run([sys.executable, str(ROOT / "tools" / "eval.py"), "--checkpoint", str(out / "last.pt"),
               "--batch-size", "4", "--json", str(one)])
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = _torchrun(2, "eval.py", "--checkpoint", str(out / "last.pt"), "--batch-size", "4", "--json", str(two))
    assert r2.returncode == 0, r2.stdout + r2.stderr
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["count"] == b["count"] == 13 and b["world_size"] == 2
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert {"top1", "top5", "loss", "images_per_s", "model"} <= b.keys()


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint(tmp_path):
    args = [sys.executable, str(ROOT / "tools" / "train.py"), "--config", "digits.yaml",
            "--output", str(tmp_path), *_sets(TINY + ["data.synthetic_train_size=100000", "train.epochs=1"])]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.time() + 120
        for line in proc.stdout:  # the output is a pipe: plain progress lines, one per step
            lines.append(line)
            if " step " in line or time.time() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "received SIGTERM" in log and "stopped by SIGTERM" in log
    state = read_checkpoint(RunDir(tmp_path).checkpoints()[0])
    assert state["epoch"] == 0 and state["iteration"] >= 1 and state["iteration"] == state["global_step"]


def _worker_pid(parent: int, rank: str) -> int | None:
    """The torchrun worker of ``rank`` among the descendants of ``parent`` (read from /proc)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env and b"TORCHELASTIC_RESTART_COUNT=0" in env:
            return int(d.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the worker")
def test_torchrun_restarted_worker_resumes_by_itself(tmp_path):
    # One worker: the restart-and-resume path is the same for any world size, and on a
    # 2-core machine gloo intermittently failed to re-form a 2-process mesh after the
    # restart (connectFullMesh: Connection refused), which is not what this test is about.
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--max-restarts=1",
            str(ROOT / "tools" / "train.py"), "--config", "digits.yaml", "--output", str(tmp_path),
            *_sets(TINY + ["data.synthetic_train_size=100000", "train.max_iters_per_epoch=120",
                           "train.ckpt_every_iters=20", "train.keep_last=2", "train.epochs=1", "train.log_every=20"])]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:
        # Own session: the cleanup below can kill the agent and its workers together.
        proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not RunDir(tmp_path).checkpoints() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        # The agent's child is the worker (torchrun starts workers directly under it).
        victim = _worker_pid(proc.pid, "0")
        assert victim is not None, "no worker found\n" + log.read_text()
        os.kill(victim, signal.SIGKILL)  # a crashed node process, not a polite preemption
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, out
    assert "restarted by torchrun: resuming" in out and "resumed from" in out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["epoch"] == 1 and records[-1]["global_step"] == 120
