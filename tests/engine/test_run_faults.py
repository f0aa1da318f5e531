"""What a training run survives, end to end with real processes: a scheduler's signals to the whole
process group, two trainers on one run directory, a full disk or file-size limit, a checkpoint
another user owns."""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rednet.engine.checkpoint import read_checkpoint
from rednet.engine.rundir import RunDir

from ..helpers import AS_NOBODY, ROOT, why_nobody_cannot_run

# timm's test_resnet on synthetic 16 px images: a step and a checkpoint (1.5 MB) cost milliseconds.
TINY = ["model.name=test_resnet", "model.num_classes=4", "data.dataset=synthetic", "data.img_size=16",
        "data.batch_size=4", "data.workers=0", "data.synthetic_train_size=32", "data.synthetic_val_size=8",
        "optim.lr=0.05", "train.log_every=1", "train.label_smoothing=0.0", "train.max_iters_per_epoch=2",
        "train.epochs=2"]
# An epoch long enough to be signalled in: 25000 steps, each logged.
LONG = ["data.synthetic_train_size=100000", "train.max_iters_per_epoch=null", "train.epochs=1"]


def _train_args(out, *items: str) -> list[str]:
    sets = [a for item in (*TINY, *items) for a in ("--set", item)]
    return [sys.executable, str(ROOT / "tools" / "train.py"), "--config", "digits.yaml", "--output", str(out), *sets]


def _env(**extra: str) -> dict[str, str]:
    # One thread per process: the tests share a 2-core machine.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _start(args: list[str], **kwargs) -> subprocess.Popen:
    """A trainer in its own session: its process group holds it and its loader workers, as under SLURM."""
    return subprocess.Popen(args, cwd=ROOT, env=kwargs.pop("env", _env()), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> list[str]:
    """The lines ``proc`` printed up to the first that matches ``pattern``."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
        if time.time() > deadline:
            break
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n" + "".join(lines))


def _finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The rest of ``proc``'s output once it exits; its whole process group is killed if it does not."""
    try:
        rest, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{rest}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rest


# --- signals to the whole process group (SLURM's time limit, scancel, kill -TERM -PGID) -------------------------


def test_the_help_lists_the_exit_codes(capsys):
    from ..helpers import load_tool

    with pytest.raises(SystemExit):
        load_tool("train").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "129 SIGHUP, 130 SIGINT, 138 SIGUSR1, 143 SIGTERM" in text and "that another trainer holds" in text
    assert signal.SIGHUP == 1 and signal.SIGUSR1 == 10 and signal.SIGTERM == 15  # the numbers the help gives


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_to_the_process_group_checkpoints_and_exits_128_plus_n(tmp_path, sig):
    """The loader workers get the signal too; they ignore it, and the trainer checkpoints and exits 128 + N."""
    proc = _start(_train_args(tmp_path, *LONG, "data.workers=2"))
    log = "".join(_read_until(proc, r"epoch 1/1 step 2/"))
    os.killpg(proc.pid, sig)
    log += _finish(proc)
    assert proc.returncode == 128 + sig, log
    assert "Traceback" not in log and "killed by signal" not in log, log
    stopped = [line for line in log.splitlines() if "stopped by" in line]
    assert len(stopped) == 1 and f"stopped by {sig.name}; checkpoint {tmp_path}" in stopped[0], log
    state = read_checkpoint(RunDir(tmp_path).checkpoints()[0])
    assert state["epoch"] == 0 and state["iteration"] >= 2 and state["iteration"] == state["global_step"]


_WORKER_SCRIPT = """
import signal, subprocess, sys, time
from torch.utils.data import DataLoader
from rednet.engine.signals import shield_workers

loader = DataLoader(list(range(1000)), batch_size=1, num_workers=1, persistent_workers=True)
shield_workers(loader)
batches = iter(loader)
next(batches)
(worker,) = batches._workers
for name in ("TERM", "INT", "USR1", "HUP"):  # from another process, as a scheduler's are
    subprocess.run(["kill", "-" + name, str(worker.pid)], check=True)
time.sleep(1)
print("after the others' signals:", worker.is_alive(), int(next(batches)[0]), flush=True)
signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise on the death that follows
worker.terminate()  # the trainer's own SIGTERM: how torch and multiprocessing end a worker
worker.join(timeout=10)
print("after the trainer's:", worker.exitcode, flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="the worker cannot tell who sent a SIGTERM")
def test_a_loader_worker_ignores_anyones_stop_signal_but_its_trainers_sigterm():
    """A worker deaf to every SIGTERM would be waited for for ever by the clean-up that ends it with one."""
    result = subprocess.run([sys.executable, "-c", _WORKER_SCRIPT], cwd=ROOT, env=_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["after the others' signals: True 1",
                                          f"after the trainer's: {-signal.SIGTERM}"], result.stdout + result.stderr


@pytest.mark.slow
def test_a_stop_signal_during_validation_checkpoints_within_seconds(tmp_path):
    """A validation of 100000 images, one per batch, is stopped at the next batch: the checkpoint holds the
    epoch's finished training, which a resume validates again (test_resume covers that resume)."""
    proc = _start(_train_args(tmp_path, "data.workers=2", "data.synthetic_val_size=100000",
                              "data.eval_batch_size=1", "train.epochs=1"))
    log = "".join(_read_until(proc, r"epoch 1/1 step 2/2"))
    time.sleep(1.0)  # into the validation: its workers started, batches flowing
    os.killpg(proc.pid, signal.SIGTERM)
    start = time.monotonic()
    log += _finish(proc, timeout=30)
    elapsed = time.monotonic() - start
    assert proc.returncode == 143, log
    assert elapsed < 10, f"took {elapsed:.1f} s to stop\n{log}"
    assert "stopped by SIGTERM during the validation of epoch 1 (a resume validates it again)" in log
    assert "Traceback" not in log
    state = read_checkpoint(RunDir(tmp_path).last)
    assert (state["epoch"], state["iteration"], state["global_step"]) == (0, 2, 2)
    assert not RunDir(tmp_path).metrics.exists()  # the epoch has not ended


# --- one trainer per run directory -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path):
    first = _start(_train_args(tmp_path, *LONG, "train.ckpt_every_iters=1"))
    second = third = None
    try:
        _read_until(first, r"epoch 1/1 step 2/")
        # A requeued job while the first still runs: refused before it reads or changes anything.
        second = subprocess.run(_train_args(tmp_path, *LONG, "train.ckpt_every_iters=1") + ["--resume", "auto"],
                                cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        errors = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and "Traceback" not in second.stdout + second.stderr, second.stderr
        assert re.fullmatch(rf"error: {re.escape(str(tmp_path))} is in use by another trainer \(pid {first.pid} on "
                            r"host \S+, running since .+\); wait for it to end or stop it, or train in another "
                            r"--output", errors[0]), errors[0]
        _read_until(first, r"epoch 1/1 step 6/")  # the first trains on, its files untouched
        assert first.poll() is None
        os.killpg(first.pid, signal.SIGKILL)  # a crashed node: no clean-up at all
        first.wait()
        third = _start(_train_args(tmp_path, *LONG, "train.ckpt_every_iters=1") + ["--resume", "auto"])
        log = "".join(_read_until(third, r"resumed from"))
        assert re.search(rf"taking over the lock of {re.escape(str(tmp_path))} from pid {first.pid} on host \S+, "
                         r"running since .+: that trainer is gone", log), log
        _read_until(third, r"step \d+/")
        os.killpg(third.pid, signal.SIGTERM)
        log += _finish(third)
        assert third.returncode == 143, log
    finally:
        for proc in (first, third):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert RunDir(tmp_path).lock_file.read_text() == ""  # the third ended cleanly: its lock names nobody


# --- a full disk, a file-size limit ------------------------------------------------------------------------------


def _limit_file_size(limit: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


def _one_error_line(result_or_log: str, pattern: str) -> None:
    errors = [line for line in result_or_log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(pattern, errors[0]), result_or_log
    assert "Traceback" not in result_or_log


def _intact(run_dir: Path, step: int) -> None:
    """The checkpoints from before the failed write verify, last.pt holds ``step``, and no temporary file is left."""
    for path in RunDir(run_dir).checkpoints() + [run_dir / "best.pt"]:
        read_checkpoint(path)
    assert read_checkpoint(run_dir / "last.pt")["global_step"] == step
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_a_file_size_limit_during_a_checkpoint_or_before_the_run_is_one_line(tmp_path):
    """RLIMIT_FSIZE gives a real EFBIG: at epoch 2's first checkpoint write (1.5 MB against a 500 kB limit), and,
    with a 200-byte limit, at config.yaml before the run starts."""
    run = tmp_path / "run"
    first = subprocess.run(_train_args(run, "train.epochs=1"), cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    second = subprocess.run(_train_args(run) + ["--resume", "auto"], cwd=ROOT, env=_env(), capture_output=True,
                            text=True, timeout=120, preexec_fn=_limit_file_size(500_000))
    assert second.returncode == 2, second.stdout + second.stderr
    _one_error_line(second.stdout + second.stderr,
                    rf"error: cannot write (best\.pt|checkpoint-000000004\.pt) in {re.escape(str(run))}: the file "
                    r"reached the largest size this process may write \(ulimit -f: 500,000 bytes\) or the file system "
                    r"allows \([\d.]+ [kMG]B free there\); raise the limit, or write elsewhere")
    _intact(run, 2)
    fresh = subprocess.run(_train_args(tmp_path / "fresh"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=120, preexec_fn=_limit_file_size(200))
    assert fresh.returncode == 2, fresh.stdout + fresh.stderr
    _one_error_line(fresh.stdout + fresh.stderr,
                    rf"error: cannot write config\.yaml in {re.escape(str(tmp_path / 'fresh'))}: the file reached .*")


@pytest.fixture()
def small_tmpfs():
    """A 5 MB tmpfs (root in a container that allows mounts), else skip."""
    where = Path(tempfile.mkdtemp(prefix="rednet-tmpfs-"))
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(where)], capture_output=True).returncode == 0
    if not mounted:
        where.rmdir()
        pytest.skip("cannot mount a tmpfs here (needs root and a container that allows mounts); "
                    "test_no_space_during_a_checkpoint_in_process covers ENOSPC without one")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        where.rmdir()


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_line(small_tmpfs):
    """Epoch 1's checkpoint (3.1 MB with the optimizer) and best.pt (1.5 MB) fit in 5 MB; epoch 2's next write
    does not: a real ENOSPC."""
    run = small_tmpfs / "run"
    result = subprocess.run(_train_args(run), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    _one_error_line(result.stdout + result.stderr,
                    rf"error: cannot write (best\.pt|checkpoint-000000004\.pt) in {re.escape(str(run))}: no space left "
                    r"on the device \((?:[\d.]+ [kM]B|\d+ bytes) free there\); make room there, or write elsewhere")
    _intact(run, 2)


def test_no_space_during_a_checkpoint_in_process(tmp_path, monkeypatch):
    """ENOSPC from the file system (here raised by fsync, where a full disk also shows): one error naming the
    folder and its free space, the previous checkpoint and last.pt intact, no temporary file left."""
    import rednet.fileio
    from rednet.fileio import CheckpointError  # what every tool reports as one line, exit 2

    run_dir = RunDir(tmp_path)
    run_dir.save_checkpoint({"config": {}, "model": {}, "global_step": 1}, step=1)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rednet.fileio.os, "fsync", full)
    with pytest.raises(CheckpointError, match=rf"cannot write checkpoint-000000002\.pt in {re.escape(str(tmp_path))}: "
                                           r"no space left on the device \(.* free there\)"):
        run_dir.save_checkpoint({"config": {}, "model": {}, "global_step": 2}, step=2)
    monkeypatch.undo()
    assert read_checkpoint(run_dir.last)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000000001.pt", "last.pt"]


# --- a checkpoint this user may not read ---------------------------------------------------------------------------


@pytest.fixture()
def nobody_run(tmp_path):
    """A run directory after steps 1 and 2 (checkpointed each), owned by uid 65534, whose newest checkpoint is
    root's and 0000: unreadable to 65534. (Root reads any file, so the trainer must run as 65534.)"""
    if why_nobody_cannot_run():
        pytest.skip(why_nobody_cannot_run())
    base = Path(tempfile.mkdtemp(prefix="rednet-uid-"))  # not under pytest's 0700 tmp_path
    run = base / "run"
    try:
        result = subprocess.run(_train_args(run, "train.epochs=1", "train.ckpt_every_iters=1"), cwd=ROOT,
                                env=_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        for p in [base, *base.rglob("*")]:
            os.lchown(p, 65534, 65534)
        newest = RunDir(run).checkpoints()[0]
        os.chown(newest, 0, 0)
        newest.chmod(0)
        yield base, run, newest
    finally:
        shutil.rmtree(base)


def _as_nobody(args: list[str], home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*AS_NOBODY, *args], cwd=ROOT,
                          env=_env(HOME=str(home), TORCH_HOME=str(home / "torch")), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_a_checkpoint_this_user_cannot_read(nobody_run):
    """--resume auto skips it with a message and continues from the one before; eval --checkpoint exits 2."""
    base, run, newest = nobody_run
    ev = _as_nobody([sys.executable, str(ROOT / "tools" / "eval.py"), "--checkpoint", str(newest)], base)
    assert ev.returncode == 2, ev.stdout + ev.stderr
    _one_error_line(ev.stdout + ev.stderr, rf"error: cannot read checkpoint {re.escape(str(newest))}: Permission "
                                           r"denied")
    # best.pt too (last.pt is a hard link to the newest: it went with it); the resume starts from step 1.
    os.chown(run / "best.pt", 0, 0)
    (run / "best.pt").chmod(0)
    tr = _as_nobody(_train_args(run, "train.epochs=1", "train.ckpt_every_iters=1") + ["--resume", "auto"], base)
    log = tr.stdout + tr.stderr
    assert tr.returncode == 0, log
    assert f"resume: skipping cannot read checkpoint {newest}: Permission denied" in log
    assert f"resumed from {run / 'checkpoint-000000001.pt'}" in log and "Traceback" not in log
