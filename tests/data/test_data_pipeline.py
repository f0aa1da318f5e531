"""rednet.data's input pipeline (issue 17): uint8 decode and crops against PIL's, device-side normalisation,
GPU decode plumbing on a CPU stand-in. The training step's deferred host reads are in engine/test_step.py, the
benchmark's data mode in tools/test_benchmark.py."""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from rednet.analysis.inputbench import make_jpeg_folder
from rednet.data import DeviceInput, EvalCrop, SafeImageFolder, TrainCrop, build_datasets, build_train_loader
from rednet.data.decode import decode_rgb, load_rgb, read_bytes, to_rgb
from rednet.engine import load_config


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """24 ImageNet-like JPEGs (every 6th grey) in 4 classes."""
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"), 24, classes=4, grey_every=6)


def _files(root):
    return sorted(p for p in root.rglob("*.JPEG"))


def _pil_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


# --- item 1: decode and augment on uint8 -------------------------------------------------


def test_jpeg_decode_gives_pils_pixels(jpegs):
    for path in _files(jpegs):
        assert torch.equal(decode_rgb(read_bytes(str(path))), _pil_tensor(load_rgb(str(path)))), path


@pytest.mark.parametrize("fmt", ["cmyk-jpeg", "palette-png", "16bit-png", "rgba-png", "gif", "webp", "bmp"])
def test_what_torchvision_io_does_not_decode_goes_through_pil(tmp_path, fmt):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    path = tmp_path / "img"
    if fmt == "cmyk-jpeg":
        rgb.convert("CMYK").save(path, "JPEG")
    elif fmt == "palette-png":
        rgb.convert("P").save(path, "PNG")
    elif fmt == "16bit-png":
        Image.fromarray(np.array([[0, 128 * 257, 65535, 1000]], dtype=np.uint16)).save(path, "PNG")
    elif fmt == "rgba-png":
        rgb.convert("RGBA").save(path, "PNG")
    else:
        rgb.save(path, fmt.upper())
    got = decode_rgb(read_bytes(str(path)))
    assert got.dtype == torch.uint8 and torch.equal(got, _pil_tensor(to_rgb(Image.open(path))))
    if fmt == "16bit-png":  # scaled as before, not clipped
        assert got[0, 0].tolist() == [0, 128, 255, 4]


def test_an_rgb_image_is_not_copied_to_become_rgb(tmp_path):
    """WebP and BMP go through PIL; one already in RGB is used as decoded (convert would copy it)."""
    path = tmp_path / "img.bmp"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(path)
    opened = Image.open(path)
    assert opened.mode == "RGB" and to_rgb(opened) is opened
    assert to_rgb(Image.open(path)).tobytes() == Image.open(path).convert("RGB").tobytes()
    assert load_rgb(str(path)).tobytes() == Image.open(path).convert("RGB").tobytes()  # decoded before the file closes


def test_train_crop_draws_timms_boxes_and_flips():
    from timm.data.transforms import RandomResizedCropAndInterpolation

    crop = TrainCrop(224, (0.08, 1.0), (3 / 4, 4 / 3), "bilinear", 0.5)
    pil = Image.new("RGB", (500, 333))
    for seed in range(200):
        random.seed(seed)
        torch.manual_seed(seed)
        ours = crop.draw(500, 333)
        random.seed(seed)
        torch.manual_seed(seed)
        box = RandomResizedCropAndInterpolation.get_params(pil, (0.08, 1.0), (3 / 4, 4 / 3))
        flip = bool(torch.rand(1) < 0.5)  # torchvision's RandomHorizontalFlip, after the box
        assert ours == (box, flip)


def test_new_path_matches_timms_pil_path_on_the_same_crops(jpegs):
    """Same seeds, same boxes: the uint8 tensor crop differs from PIL's by well under half a level."""
    from timm.data import create_transform

    old_train = create_transform(224, is_training=True, interpolation="bilinear", color_jitter=None,
                                 use_prefetcher=True)
    old_eval = create_transform(224, is_training=False, crop_pct=0.875, interpolation="bilinear",
                                use_prefetcher=True)
    new_train, new_eval = TrainCrop(224), EvalCrop(224, 0.875)
    train_diffs, eval_diffs = [], []
    for i, path in enumerate(_files(jpegs)):
        tensor, pil = decode_rgb(read_bytes(str(path))), load_rgb(str(path))
        random.seed(i)
        torch.manual_seed(i)
        ours = new_train(tensor)
        random.seed(i)
        torch.manual_seed(i)
        theirs = old_train(pil)
        assert ours.shape == theirs.shape == (3, 224, 224) and ours.dtype == theirs.dtype == torch.uint8
        train_diffs.append(_mad(ours, theirs))
        eval_diffs.append(_mad(new_eval(tensor), old_eval(pil)))
    assert max(train_diffs) < 0.5 and max(eval_diffs) < 0.5, (train_diffs, eval_diffs)


def test_new_path_still_refuses_bombs_and_skips_broken_jpegs(jpegs, tmp_path, monkeypatch):
    root = tmp_path / "split"
    (root / "a").mkdir(parents=True)
    files = _files(jpegs)
    good = files[0].read_bytes()
    (root / "a" / "good.JPEG").write_bytes(good)
    (root / "a" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    ds = SafeImageFolder(root, TrainCrop(32))
    by_name = {p.rsplit("/", 1)[1]: i for i, (p, _) in enumerate(ds.samples)}
    assert ds[by_name["truncated.JPEG"]] is None and ds[by_name["good.JPEG"]][0].shape == (3, 32, 32)
    # A decompression bomb (over twice MAX_IMAGE_PIXELS) is refused from its header, before decoding.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert ds[by_name["good.JPEG"]] is None


def test_every_dataset_yields_uint8_batches(jpegs, tmp_path):
    import shutil

    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        shutil.copytree(jpegs, root / split)
    configs = [
        ["data.dataset=imagenet", f"data.root={root}", "model.num_classes=4"],
        ["data.dataset=imagenet", f"data.root={root}", "model.num_classes=4", "data.decode=pil"],
        ["data.dataset=imagenet", f"data.root={root}", "model.num_classes=4", "data.auto_augment=rand-m9-mstd0.5"],
        ["data.dataset=digits", "model.num_classes=10"],
        ["data.dataset=synthetic", "model.num_classes=4"],
    ]
    for extra in configs:
        cfg = load_config(None, ["data.img_size=32", *extra])
        train, val = build_datasets(cfg.data, cfg.model.num_classes)
        for ds in (train, val):
            images, _, skipped = next(iter(build_train_loader(ds, batch_size=4)))
            assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32) and skipped == 0, extra


# --- item 2: normalised on the device ----------------------------------------------------


def test_device_normalisation_equals_to_tensor_and_normalize():
    from torchvision.transforms import Normalize, ToTensor

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    batch = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    batch[0, :, 0, :] = torch.arange(16)  # the extremes and everything between appear
    batch[0, :, 1, :] = torch.arange(240, 256)
    ref = torch.stack([Normalize(mean, std)(ToTensor()(img.permute(1, 2, 0).numpy())) for img in batch])
    inp = DeviceInput(mean, std)
    out, targets, dropped = inp.prepare(batch, torch.arange(4), torch.device("cpu"))
    assert out.dtype == torch.float32 and dropped == 0 and torch.equal(targets, torch.arange(4))
    assert (out - ref).abs().max().item() < 1e-6
    nhwc, _, _ = inp.prepare(batch, torch.arange(4), torch.device("cpu"), channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc, out)
    floats = torch.randn(2, 3, 4, 4)  # a dataset of one's own that normalises itself: only moved
    assert torch.equal(inp.prepare(floats, torch.arange(2), torch.device("cpu"))[0], floats)


def test_copying_ahead_yields_the_same_batches_in_order():
    loader = [(torch.full((2, 3, 4, 4), i, dtype=torch.uint8), torch.tensor([i, i]), i % 2) for i in range(5)]
    inp = DeviceInput((0.0,) * 3, (1 / 255,) * 3)
    ahead = list(inp.batches(loader, torch.device("cpu"), lookahead=True))
    plain = list(inp.batches(loader, torch.device("cpu"), lookahead=False))
    assert len(ahead) == len(plain) == 5
    for i, ((a, ta, sa), (b, tb, sb)) in enumerate(zip(ahead, plain)):
        assert torch.equal(a, b) and a[0, 0, 0, 0].item() == i and torch.equal(ta, tb) and sa == sb == i % 2


def test_copying_ahead_waits_for_workers_only():
    """Without workers, fetching ahead would draw the next batch's augmentation before a checkpoint."""
    drawn = []

    class Loader:
        num_workers = 0

        def __iter__(self):
            for i in range(3):
                drawn.append(i)
                yield torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.tensor([i]), 0

    it = DeviceInput().batches(Loader(), torch.device("cpu"))
    next(it)
    assert drawn == [0]  # the default on a CPU (and with workers: 0 anywhere): nothing fetched ahead
    it = DeviceInput().batches(Loader(), torch.device("cpu"), lookahead=True)
    drawn.clear()
    next(it)
    assert drawn == [0, 1]


# --- item 5: GPU decode, on a CPU stand-in ------------------------------------------------


def _gpu_stand_in_loader(root, gpu: bool, seed: int = 0):
    ds = SafeImageFolder(root, TrainCrop(32), gpu_decode=gpu)
    random.seed(seed)
    torch.manual_seed(seed)
    loader = build_train_loader(ds, batch_size=len(ds), seed=seed)
    loader.sampler.set_epoch(0)
    return ds, next(iter(loader))


def test_gpu_decode_plumbing_on_a_cpu_stand_in(jpegs, tmp_path):
    """Workers hand over bytes and crop boxes; the decoder decodes and crops them on the 'device' (here the CPU)."""
    import shutil

    from rednet.data.gpudecode import EncodedBatch, GpuDecoder

    root = tmp_path / "split"
    shutil.copytree(jpegs, root)
    files = _files(root)
    Image.open(files[1]).save(root / "class000" / "png_one.png")  # decoded in the worker, travels decoded
    ds, (cpu_images, cpu_targets, cpu_skipped) = _gpu_stand_in_loader(root, gpu=False)
    gpu_ds, (encoded, targets, skipped) = _gpu_stand_in_loader(root, gpu=True)
    assert isinstance(encoded, EncodedBatch) and skipped == cpu_skipped == 0
    assert sum(isinstance(item, torch.Tensor) for item in encoded.items) == 1  # the PNG
    inp = DeviceInput((0.0,) * 3, (1 / 255,) * 3, decoder=GpuDecoder(gpu_ds.transform))
    images, kept_targets, dropped = inp.prepare(encoded, targets, torch.device("cpu"))
    # Same boxes and flips (drawn in the same order), same decoder: the same pixels as the CPU path.
    assert dropped == 0 and torch.equal(kept_targets, cpu_targets)
    assert torch.equal(images, cpu_images.float())

    # A JPEG whose header reads but whose data is cut passes the worker and is dropped and counted
    # on the device (its box was drawn, so later boxes differ from the CPU path's).
    broken = files[2].read_bytes()
    (root / "class000" / "broken.JPEG").write_bytes(broken[: len(broken) // 2])
    gpu_ds, (encoded, targets, skipped) = _gpu_stand_in_loader(root, gpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images, kept_targets, dropped = inp.prepare(encoded, targets, torch.device("cpu"))
    assert (skipped, dropped, len(encoded)) == (0, 1, len(gpu_ds))
    assert images.shape == (len(gpu_ds) - 1, 3, 32, 32) and len(kept_targets) == len(gpu_ds) - 1


def test_gpu_decode_check_and_fallback_warn_once(jpegs, tmp_path, monkeypatch):
    import rednet.data.device as device_mod
    import rednet.data.gpudecode as gpudecode

    monkeypatch.setattr(gpudecode, "_checked", {})
    samples = [read_bytes(str(p)) for p in _files(jpegs)[:3]]
    assert gpudecode.check_gpu_decode(torch.device("cpu"), samples) is None  # the stand-in agrees with the CPU

    def broken(datas, device):  # a decoder that swaps the channels
        return [decode_rgb(d).flip(0) for d in datas]

    monkeypatch.setattr(gpudecode, "_checked", {})
    monkeypatch.setattr(gpudecode, "decode_on_device", broken)
    why = gpudecode.check_gpu_decode(torch.device("cpu"), samples)
    assert why is not None and "differ from the CPU" in why

    monkeypatch.setattr(device_mod, "_fallback_warned", False)
    cfg = load_config(None, ["data.decode=gpu", "data.img_size=32"])
    ds = SafeImageFolder(jpegs, TrainCrop(32), gpu_decode=True)
    with pytest.warns(gpudecode.GpuDecodeWarning, match="decoding on the CPU instead"):
        inp = device_mod.build_device_input(cfg.data, torch.device("cpu"), ds)
    assert inp.decoder is None and not ds.gpu_decode
    assert isinstance(ds[0][0], torch.Tensor) and ds[0][0].shape == (3, 32, 32)  # decoded in the worker again
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process
        device_mod.build_device_input(cfg.data, torch.device("cpu"), SafeImageFolder(jpegs, TrainCrop(32), True))
