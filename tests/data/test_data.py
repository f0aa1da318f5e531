"""rednet.data: datasets, start-up checks, corrupt images, samplers, the loaders' workers."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from rednet.data import (
    DataError,
    DigitsDataset,
    ResumableSampler,
    ShardSampler,
    build_datasets,
    build_eval_loader,
    build_train_loader,
)
from rednet.engine import load_config

from ..helpers import TINY_TRAIN, fails_cleanly, image_tree, train_argv


def _tree(root, classes=("a", "b"), per_class=3, size=20):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _cfg(root, *extra):
    return load_config(None, ["data.dataset=imagenet", f"data.root={root}", "data.img_size=16", "model.num_classes=2",
                              *extra]).data


def test_digits_split_is_stratified_and_fixed():
    train, val = DigitsDataset(train=True, img_size=16), DigitsDataset(train=False, img_size=16)
    assert (len(train), len(val)) == (1437, 360)
    assert np.bincount(val.targets).min() >= 35  # every digit held out ~36 times
    img, target = DigitsDataset(train=False, img_size=16)[0]
    assert img.size == (16, 16) and img.mode == "RGB" and target == val.targets[0]
    assert DigitsDataset(train=False, img_size=16).targets == val.targets


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = _tree(tmp_path)
    (root / "train" / "a" / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    good = (root / "train" / "b" / "0.png").read_bytes()
    (root / "train" / "b" / "truncated.png").write_bytes(good[: len(good) // 3])
    train, _ = build_datasets(_cfg(root), num_classes=2)
    loader = build_train_loader(train, batch_size=len(train))
    images, targets, skipped = next(iter(loader))
    assert skipped == 2 and images.shape == (len(train) - 2, 3, 16, 16)


def test_a_failing_transform_is_raised_not_skipped(tmp_path):
    from rednet.data.datasets import SafeImageFolder

    def broken(img):
        raise TypeError("bug in the transform")

    with pytest.raises(TypeError, match="bug in the transform"):
        SafeImageFolder(_tree(tmp_path) / "train", transform=broken)[0]


def test_startup_errors_are_clear(tmp_path):
    root = _tree(tmp_path / "ok")
    with pytest.raises(DataError, match="model.num_classes is 5"):
        build_datasets(_cfg(root, "model.num_classes=5"), num_classes=5)
    with pytest.raises(DataError, match="val.*does not exist"):
        build_datasets(_cfg(root, "data.val_split=validation"), num_classes=2)
    mismatch = _tree(tmp_path / "mismatch")
    (mismatch / "val" / "b").rename(mismatch / "val" / "c")
    with pytest.raises(DataError, match="validation classes differ.*only in train: \\['b'\\], only in val: \\['c'\\]"):
        build_datasets(_cfg(mismatch), num_classes=2)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(DataError, match="empty"):
        build_datasets(_cfg(empty), num_classes=2)
    with pytest.raises(DataError, match="data.root is not set"):
        build_datasets(load_config(None).data, num_classes=1000)


def test_resumable_sampler_continues_the_same_order():
    data = list(range(50))
    full = ResumableSampler(data, num_replicas=2, rank=1, seed=3)
    full.set_epoch(4)
    order = list(full)
    part = ResumableSampler(data, num_replicas=2, rank=1, seed=3)
    part.set_epoch(4, start=10)
    assert list(part) == order[10:] and len(part) == len(order) - 10
    full.set_epoch(5)
    assert list(full) != order  # a new permutation every epoch


@pytest.mark.parametrize("length, world", [(13, 2), (13, 3), (2, 4)])
def test_shard_sampler_scores_each_sample_once(length, world):
    seen = [i for r in range(world) for i in ShardSampler(length, world, r)]
    assert sorted(seen) == list(range(length))


def test_train_loader_batches_are_whole():
    data = [(torch.zeros(1), i) for i in range(10)]
    loader = build_train_loader(data, batch_size=4)
    assert [len(b[1]) for b in loader] == [4, 4]
    assert sum(len(b[1]) for b in build_eval_loader(data, batch_size=4, world_size=3, rank=0)) == 4


def test_eval_data_config_of_a_model_and_of_a_training_run():
    from timm.data import resolve_data_config

    import rednet
    from rednet.data import eval_data_config

    with torch.device("meta"):
        model, gray = rednet.create_model("rednet26"), rednet.create_model("rednet26", in_chans=1)
    assert eval_data_config(model) == resolve_data_config({}, model=model)  # the pretrained config
    assert eval_data_config(model, img_size=48)["input_size"] == (3, 48, 48)
    run = {"model": {"in_chans": 3}, "data": {"img_size": 32, "eval_crop_pct": 1.0, "interpolation": "bicubic",
                                              "mean": [0.5] * 3, "std": [0.25] * 3}}
    dc = eval_data_config(model, run)
    assert (dc["input_size"], dc["crop_pct"], dc["interpolation"]) == ((3, 32, 32), 1.0, "bicubic")
    assert dc["mean"] == (0.5,) * 3 and dc["std"] == (0.25,) * 3
    assert eval_data_config(gray)["input_size"] == (1, 224, 224)  # what the first conv takes


def test_image_folder_lists_what_torchvision_lists(tmp_path):
    from torchvision.datasets import ImageFolder

    from rednet.data import SafeImageFolder

    root = _tree(tmp_path)
    nested = root / "train" / "b" / "more" / "deeper"
    nested.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(nested / "x.png")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "b" / "Z.JPG").write_bytes(b"")  # extensions match case-insensitively
    ours, theirs = SafeImageFolder(root / "train"), ImageFolder(str(root / "train"))
    assert ours.samples == theirs.samples and ours.classes == theirs.classes


@pytest.mark.parametrize("link", ["loop", "second-link"])
def test_a_folder_reached_twice_through_symlinks_is_an_error(tmp_path, link):
    from rednet.data import SafeImageFolder

    root = _tree(tmp_path)
    if link == "loop":  # 6 images became hundreds of samples, most under the wrong class
        (root / "train" / "a" / "up").symlink_to("..")
        pattern = r"folder .*train/a/up is .*train again \(a symlink loop"
    else:  # class b's images would count for class a too
        (root / "train" / "a" / "also_b").symlink_to(root / "train" / "b")
        pattern = r"folder .*train/b is .*train/a/also_b again"
    with pytest.raises(DataError, match=pattern):
        SafeImageFolder(root / "train")


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from rednet.data import SafeImageFolder

    root = _tree(tmp_path)
    grey = np.array([[0, 128 * 257, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(grey).save(root / "train" / "a" / "wide.png")
    ds = SafeImageFolder(root / "train")
    img, _ = ds[[p for p, _ in ds.samples].index(str(root / "train" / "a" / "wide.png"))]
    assert img.mode == "RGB" and np.asarray(img)[0, :, 0].tolist() == [0, 128, 255, 4]  # PIL alone: 0, 255, 255, 255


def test_a_split_with_no_decodable_image_is_an_error(tmp_path):
    from rednet.data import SafeImageFolder

    root = _tree(tmp_path, per_class=20)
    files = sorted((root / "train").rglob("*.png"))
    for f in files[:-1]:
        f.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    SafeImageFolder(root / "train").check_decodable()  # one good file, at the end, is enough
    files[-1].write_bytes(b"")
    with pytest.raises(DataError, match=r"none of 16 images spread over its 40 can be decoded \(e\.g\. .*a/0\.png"):
        build_datasets(_cfg(root), num_classes=2)


def test_training_set_smaller_than_one_batch(tmp_path):
    data = [(torch.zeros(1), i) for i in range(10)]
    with pytest.raises(DataError, match="has 10 images, fewer than one batch of 16; lower data.batch_size"):
        build_train_loader(data, batch_size=16)
    with pytest.raises(DataError, match=r"10 images \(5 per process over 2\), fewer than one batch of 8"):
        build_train_loader(data, batch_size=8, world_size=2)


# --- the loaders' workers, and splits that cannot be decoded, through the tools ---------------


def test_default_workers_are_capped_at_the_cpus_this_process_may_use(monkeypatch):
    from rednet.data import build_eval_loader, default_workers
    from rednet.engine import load_config

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_workers() == 64 and default_workers(most=8) == 8  # no fixed cap of 8 any more (issue 17)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # a node of 8 GPUs: its CPUs shared by 8 processes
    assert default_workers() == 8
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: four processes share the two CPUs
    assert default_workers() == 1
    # Only the default is capped: a value in a file or on the command line is the user's.
    assert load_config("rednet50").data.workers is None and load_config("digits").data.workers == 0
    assert load_config(None, ["data.workers=12"]).data.workers == 12
    with pytest.warns(UserWarning, match="12 worker processes"):  # torch's warning: the user's choice stands
        assert build_eval_loader(list(range(4)), 2, workers=12).num_workers == 12


@pytest.mark.parametrize("broken", ["train", "val"])
def test_train_with_an_undecodable_split_stops_before_training(tmp_path, capsys, broken):
    data = image_tree(tmp_path / "data", broken=(broken,))
    argv = train_argv(tmp_path / "run", "model.num_classes=2") + ["--data", str(data)]
    fails_cleanly(capsys, "train", argv, rf"dataset split .*{broken}: none of its 6 images can be decoded "
                                          rf"\(e\.g\. .*{broken}/a/0\.png")
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_eval_with_an_undecodable_val_split(tmp_path, capsys):
    data = image_tree(tmp_path / "data", broken=("val",))
    argv = ["--config", "digits.yaml", "--data", str(data),
            *[a for item in (*TINY_TRAIN, "model.num_classes=2") for a in ("--set", item)]]
    fails_cleanly(capsys, "eval", argv, r"dataset split .*val: none of its 6 images can be decoded")
