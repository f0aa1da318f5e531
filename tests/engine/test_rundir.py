"""RunDir: the names of a run directory's files and the housekeeping on them; a run directory that cannot be
used is refused before the run starts."""
from __future__ import annotations

import os
import re
import shutil

import pytest

from rednet.engine.checkpoint import read_checkpoint
from rednet.engine.rundir import RunDir
from rednet.fileio import atomic_write

from ..helpers import ROOT, fails_cleanly, read_only_dir, train_argv


def test_without_hard_links_last_pt_is_a_verified_copy_that_survives_pruning(tmp_path, monkeypatch):
    def no_links(src, dst, **kwargs):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    run_dir = RunDir(tmp_path)
    run_dir.save_checkpoint({"config": {}, "model": {}, "global_step": 1}, step=1)
    newest = run_dir.save_checkpoint({"config": {}, "model": {}, "global_step": 2}, step=2)
    assert not run_dir.last.samefile(newest) and run_dir.last.read_bytes() == newest.read_bytes()
    run_dir.prune(keep=0)
    assert read_checkpoint(run_dir.last)["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [RunDir.LAST]


def test_remove_orphans_removes_what_an_interrupted_atomic_write_leaves(tmp_path):
    """The leftover names come from fileio.atomic_write itself, not from a copy of its pattern."""
    run_dir, leftovers = RunDir(tmp_path / "run"), tmp_path / "leftovers"
    leftovers.mkdir()

    def keep_a_copy_of_the_temporary_file(f):
        f.write(b"partial")
        f.flush()
        for p in run_dir.path.iterdir():
            if p.name.startswith("."):
                shutil.copy(p, leftovers / p.name)

    written = [run_dir.checkpoint(7), run_dir.best, run_dir.last, run_dir.metrics, run_dir.config]
    for path in written:
        atomic_write(path, keep_a_copy_of_the_temporary_file)
    for p in leftovers.iterdir():
        shutil.copy(p, run_dir.path / p.name)
    (run_dir.path / ".last.pt.link").write_bytes(b"")
    (run_dir.path / ".notes.txt.abc.tmp").write_bytes(b"")  # not the trainer's: left alone
    with pytest.raises(RuntimeError, match="needs the lock"):  # another trainer may be writing them
        run_dir.remove_orphans()
    run_dir.lock()
    removed = run_dir.remove_orphans()
    assert len(removed) == len(written) + 1
    assert sorted(p.name for p in run_dir.path.iterdir()) == sorted([p.name for p in written] + [
        ".notes.txt.abc.tmp", RunDir.LOCK])


def test_set_aside_and_restart_names_never_overwrite(tmp_path):
    run_dir = RunDir(tmp_path)
    for name in ("checkpoint-000000009.pt", "best.pt", "metrics.jsonl", "eval.json", "notes.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "tb").mkdir()
    first = run_dir.set_aside(run_dir.checkpoint(9))
    run_dir.checkpoint(9).write_text("again")
    second = run_dir.set_aside(run_dir.checkpoint(9))
    assert first.name == "checkpoint-000000009.pt.other-config"
    assert second.name == "checkpoint-000000009.pt.other-config-2"
    moved = run_dir.run_files()
    assert [p.name for p in moved] == ["best.pt", "checkpoint-000000009.pt.other-config",
                                       "checkpoint-000000009.pt.other-config-2", "eval.json", "metrics.jsonl", "tb"]
    dest = run_dir.previous_dir()
    run_dir.move_aside(moved, dest)
    assert dest.name.startswith(RunDir.PREVIOUS) and run_dir.previous_dir() != dest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", dest.name]


def test_make_train_uses_the_run_directory_names():
    """The Makefile cannot import RunDir before its environment exists; this keeps its literals in step."""
    recipe = (ROOT / "Makefile").read_text()
    run = re.search(r"tools/train.py .*--output (\S+)", recipe).group(1)
    assert f"--checkpoint {run}/{RunDir.BEST}" in recipe
    assert f"--json {run}/{RunDir.EVAL}" in recipe
    assert f"--logdir {run}/{RunDir.TENSORBOARD}" in recipe


# --- a run directory that cannot be used -----------------------------------------------------


@pytest.mark.parametrize("case", ["existing-file", "under-a-file", "read-only"])
def test_unusable_run_directory(tmp_path, capsys, case):
    (tmp_path / "file").write_text("precious")
    out = {"existing-file": tmp_path / "file", "under-a-file": tmp_path / "file" / "run",
           "read-only": read_only_dir(tmp_path) if case == "read-only" else None}[case]
    try:
        fails_cleanly(capsys, "train", train_argv(out), r"the run directory train\.output \(--output\) .*"
                       r"(is a file, not a folder|lies under .*file, which is a file|is not writable)")
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o755)  # let pytest remove it
    assert (tmp_path / "file").read_text() == "precious"
