"""Tar shards (issue 17, item 6): tools/make_shards.py, and data.dataset wds: order, resume, evaluation."""
from __future__ import annotations

import json

import pytest
import torch

from rednet.analysis.inputbench import make_jpeg_folder
from rednet.data import EvalCrop, TarShardDataset, build_eval_loader, build_train_loader, epoch_order

from ..helpers import load_tool


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    make_jpeg_folder(root / "train", 30, classes=3)
    make_jpeg_folder(root / "val", 10, classes=3, seed=1)
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    tool = load_tool("make_shards")
    for split in ("train", "val"):
        assert tool.main([str(folder / split), str(out), "--shard-size", "150KB", "--json"]) == 0
    return out


def test_make_shards_writes_the_split_with_its_index(shards, folder, capsys):
    info = json.loads((shards / "_info.json").read_text())
    assert info["classes"] == ["class000", "class001", "class002"]
    train = info["splits"]["train"]
    assert train["num_samples"] == 30 and sum(train["shard_lengths"]) == 30 and len(train["filenames"]) > 2
    assert info["splits"]["val"]["num_samples"] == 10
    assert sorted(p.name for p in shards.iterdir() if p.name.startswith(".")) == []  # no plan left behind


def test_make_shards_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    tool = load_tool("make_shards")
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0 and "webdataset layout" in capsys.readouterr().out
    assert tool.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        tool.main([str(tmp_path), str(tmp_path / "out"), "--shard-size", "lots"])
    assert e.value.code == 2


def test_make_shards_resumes_after_an_interruption_to_the_same_bytes(folder, tmp_path, monkeypatch):
    import tarfile

    tool = load_tool("make_shards")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert tool.main([str(folder / "train"), str(straight), "--shard-size", "150KB"]) == 0
    real_addfile, calls = tarfile.TarFile.addfile, []

    def crash_mid_shard(self, *args, **kwargs):  # as a kill would: in the middle of the third shard
        calls.append(1)
        if len(calls) == 2 * 9:
            raise KeyboardInterrupt
        return real_addfile(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", crash_mid_shard)
    assert tool.main([str(folder / "train"), str(resumed), "--shard-size", "150KB"]) == 130
    assert any(p.name.endswith(".partial") for p in resumed.iterdir()) and not (resumed / "_info.json").exists()
    written = sorted(p.name for p in resumed.glob("*.tar"))
    assert written and len(written) < len(list(straight.glob("*.tar")))
    monkeypatch.setattr(tarfile.TarFile, "addfile", real_addfile)
    # Another source into the same OUT while one is unfinished: refused, nothing changed.
    assert tool.main([str(folder / "val"), str(resumed), "--split", "train", "--shard-size", "150KB"]) == 2
    assert tool.main([str(folder / "train"), str(resumed), "--shard-size", "150KB"]) == 0
    names = sorted(p.name for p in straight.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    for name in names:
        if name != "_info.json":
            assert (straight / name).read_bytes() == (resumed / name).read_bytes(), name
    strip = lambda info: {**info, "name": None}  # noqa: E731  (the folder's name differs)
    assert strip(json.loads((straight / "_info.json").read_text())) == strip(
        json.loads((resumed / "_info.json").read_text()))


def _epoch(shards, workers, start=0, epoch=3, batch=4):
    ds = TarShardDataset(shards, "train", EvalCrop(8, 1.0), train=True)
    loader = build_train_loader(ds, batch_size=batch, seed=5, workers=workers, persistent_workers=False)
    epoch_order(loader).set_epoch(epoch, start=start)
    return [(images.sum(dim=(1, 2, 3)).tolist(), targets.tolist()) for images, targets, _ in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_continues_the_epoch_at_the_same_batch(shards, workers):
    full = _epoch(shards, workers)
    assert len(full) == 30 // 4  # whole batches only, every process the same count
    assert _epoch(shards, workers, start=3 * 4) == full[3:]
    assert _epoch(shards, workers, epoch=4) != full  # shards are shuffled anew every epoch


def test_evaluation_reads_every_sample_once_over_ranks_and_workers(shards, folder):
    seen = []
    for rank in range(2):
        ds = TarShardDataset(shards, "val", EvalCrop(8, 1.0), train=False)
        for images, targets, skipped in build_eval_loader(ds, batch_size=3, world_size=2, rank=rank, workers=2):
            assert skipped == 0
            seen += targets.tolist()
    assert len(seen) == 10 and sorted(seen) == sorted(i % 3 for i in range(10))


def test_training_on_shards(shards, tmp_path):
    from rednet.engine import load_config
    from rednet.engine.trainer import fit

    cfg = load_config(None, ["model.name=test_resnet", "model.num_classes=3", "data.dataset=wds",
                             f"data.root={shards}", "data.img_size=16", "data.batch_size=4", "data.workers=0",
                             "train.epochs=1", "train.max_iters_per_epoch=3", f"train.output={tmp_path / 'run'}"])
    result = fit(cfg)
    assert result["count"] == 10 and torch.isfinite(torch.tensor(result["loss"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["global_step"] == 3
