"""The input pipeline's CPU cost, old path against new (``tools/benchmark.py data``), on ImageNet-like JPEGs.

The JPEGs are made from scikit-image's bundled photos (nothing is downloaded): random crops
resized to ImageNet's typical sizes and saved by PIL at quality 90, in an ImageFolder tree.

What is measured is CPU time (``time.process_time``: this process only, all its threads), not
wall time, and the two paths alternate round by round, so that the ratios mean something on a
shared, loaded machine:

- ``train`` / ``eval``: images per CPU-second of one core (``torch.set_num_threads(1)``) through
  dataset, transform and collate into batches. ``old``: PIL decode and timm's PIL transform with
  ``ToTensor`` + ``Normalize`` (float32 batches), as before issue 17. ``new``: what
  ``rednet.data.build_datasets`` gives for the config (torchvision.io decode, uint8 batches).
- ``main``: the main process's CPU time per batch while loader workers feed it (receiving the
  batch from a worker and handing it on): float32 against uint8 batches.
- ``read``: reading the files' bytes (no decode), one file per image against tar shards.
"""
from __future__ import annotations

import os
import random
import statistics
import tarfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGENET_LIKE_SIZES", "environment", "make_jpeg_folder", "markdown", "run"]

# (width, height) of typical ImageNet photos.
IMAGENET_LIKE_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (400, 500), (500, 500),
                       (640, 480), (500, 281))
# scikit-image's bundled photos (colour ones, and two grey ones that are made RGB).
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
           "colorwheel", "coins", "camera")


def _photos() -> list[np.ndarray]:
    from skimage import data as skdata

    out = []
    for name in _PHOTOS:
        img = np.asarray(getattr(skdata, name)())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append(img[..., :3].astype(np.uint8))
    return out


def make_jpeg_folder(root: str | Path, n: int, classes: int = 10, seed: int = 0, quality: int = 90,
                     grey_every: int = 0) -> Path:
    """Write ``n`` ImageNet-like JPEGs into ``root/<class>/<i>.JPEG`` (``classes`` folders) and return ``root``.

    Each is a random crop of one of scikit-image's photos, possibly flipped, resized to one of
    ``IMAGENET_LIKE_SIZES`` and saved at ``quality``; with ``grey_every`` k, every k-th is grey.
    """
    root = Path(root)
    rng = random.Random(seed)
    photos = _photos()
    for i in range(n):
        src = photos[rng.randrange(len(photos))]
        h, w = src.shape[:2]
        ch, cw = rng.randint(h // 2, h), rng.randint(w // 2, w)
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        img = Image.fromarray(src[top:top + ch, left:left + cw])
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = img.resize(rng.choice(IMAGENET_LIKE_SIZES), Image.BICUBIC)
        if grey_every and i % grey_every == 0:
            img = img.convert("L")
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:06d}.JPEG", "JPEG", quality=quality)
    return root


def _old_transform(train: bool, img_size: int) -> Callable:
    """The transform before issue 17: timm's PIL pipeline ending in ToTensor + Normalize (float32)."""
    from timm.data import create_transform

    if train:
        return create_transform(img_size, is_training=True, interpolation="bilinear", color_jitter=None)
    return create_transform(img_size, is_training=False, crop_pct=0.875, interpolation="bilinear")


def _datasets(root: Path, img_size: int) -> dict[str, dict[str, torch.utils.data.Dataset]]:
    """``{"old": {"train", "eval"}, "new": {...}}`` over the same files."""
    from rednet.data import SafeImageFolder, build_datasets
    from rednet.engine import load_config

    cfg = load_config(None, ["data.dataset=imagenet", f"data.root={root}", f"data.img_size={img_size}",
                             f"model.num_classes={len(list((root / 'train').iterdir()))}"])
    train, val = build_datasets(cfg.data, cfg.model.num_classes)
    old = {"train": SafeImageFolder(root / "train", _old_transform(True, img_size)),
           "eval": SafeImageFolder(root / "val", _old_transform(False, img_size))}
    return {"old": old, "new": {"train": train, "eval": val}}


def _cpu_seconds(fn: Callable[[], object]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def _through_collate(dataset, indices: list[int], batch: int) -> Callable[[], None]:
    from rednet.data import collate_skip

    def run() -> None:
        for start in range(0, len(indices), batch):
            collate_skip([dataset[i] for i in indices[start:start + batch]])

    return run


def _main_process_seconds(loader_iter, batches: int) -> float:
    """CPU seconds of this process per batch while ``batches`` batches arrive from the workers."""
    t0 = time.process_time()
    for _ in range(batches):
        next(loader_iter)
    return (time.process_time() - t0) / batches


def _read_files(paths: list[Path]) -> Callable[[], None]:
    def run() -> None:
        for p in paths:
            with open(p, "rb") as f:
                f.read()

    return run


def _read_tar(tar_path: Path) -> Callable[[], None]:
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def run() -> None:
        with open(tar_path, "rb") as f:  # as rednet.data.shards reads a shard
            for _ in group_by_keys(dict(m, __url__=str(tar_path)) for m in tar_file_iterator(f)):
                pass

    return run


def _summary(values: list[float]) -> float:
    return statistics.median(values)


def run(root: Path, images: int = 300, rounds: int = 5, batch: int = 64, workers: int = 2, img_size: int = 224,
        log: Callable[[str], None] = print) -> dict:
    """Make ``images`` JPEGs under ``root`` and measure both paths, interleaved over ``rounds``; the results."""
    from torch.utils.data import DataLoader

    from rednet.data import collate_skip

    torch.set_num_threads(1)
    for split in ("train", "val"):
        make_jpeg_folder(root / split, images, seed=0 if split == "train" else 1)
    sets = _datasets(root, img_size)
    indices = list(range(images))
    paths = sorted((root / "train").rglob("*.JPEG"))
    tar_path = root / "train.tar"
    with tarfile.open(tar_path, "w") as tar:
        for p in paths:
            tar.add(p, arcname=str(p.relative_to(root)))

    loaders = {name: DataLoader(sets[name]["train"], batch_size=batch, shuffle=True, num_workers=workers,
                                collate_fn=collate_skip, persistent_workers=True, prefetch_factor=2,
                                generator=torch.Generator().manual_seed(0))
               for name in ("old", "new")} if workers > 0 else {}
    iters = {name: iter(loader) for name, loader in loaders.items()}
    for it in iters.values():
        next(it)  # workers started and warm

    cpu: dict[str, dict[str, list[float]]] = {k: {"old": [], "new": []} for k in ("train", "eval", "main", "read")}
    for r in range(rounds):
        for path in ("old", "new") if r % 2 == 0 else ("new", "old"):  # alternate who goes first, too
            for kind in ("train", "eval"):
                random.seed(r)
                torch.manual_seed(r)
                cpu[kind][path].append(_cpu_seconds(_through_collate(sets[path][kind], indices, batch)) / images)
            if path in iters:
                per_batch = max(1, min(4, images // batch - 1))
                try:
                    cpu["main"][path].append(_main_process_seconds(iters[path], per_batch))
                except StopIteration:
                    iters[path] = iter(loaders[path])
                    cpu["main"][path].append(_main_process_seconds(iters[path], per_batch))
        cpu["read"]["old"].append(_cpu_seconds(_read_files(paths)) / images)
        cpu["read"]["new"].append(_cpu_seconds(_read_tar(tar_path)) / images)
        log(f"round {r + 1}/{rounds}: train {1 / cpu['train']['old'][-1]:.0f} -> {1 / cpu['train']['new'][-1]:.0f} "
            f"img/CPU-s, eval {1 / cpu['eval']['old'][-1]:.0f} -> {1 / cpu['eval']['new'][-1]:.0f}")
    del iters, loaders
    return _results(cpu, images, rounds, batch, workers, img_size)


def _results(cpu: dict, images: int, rounds: int, batch: int, workers: int, img_size: int) -> dict:
    rows = []
    for kind, unit in (("train", "images per CPU-second"), ("eval", "images per CPU-second"),
                       ("main", "main-process CPU ms per batch"), ("read", "bytes read: images per CPU-second")):
        if not cpu[kind]["old"]:
            continue
        old, new = _summary(cpu[kind]["old"]), _summary(cpu[kind]["new"])
        ratios = [o / n for o, n in zip(cpu[kind]["old"], cpu[kind]["new"])]  # per round: old CPU / new CPU
        value = (lambda s: s * 1e3) if kind == "main" else (lambda s: 1.0 / s)
        rows.append(dict(kind=kind, unit=unit, old=value(old), new=value(new), cpu_ratio_old_over_new=_summary(ratios),
                         rounds=[[value(o), value(n)] for o, n in zip(cpu[kind]["old"], cpu[kind]["new"])]))
    by = {r["kind"]: r for r in rows}
    per_gpu = {}
    for path in ("old", "new"):
        if "train" in by:
            cores = 3000.0 / by["train"][path]
            if "main" in by:
                cores += 3000.0 / batch * by["main"][path] / 1e3
            per_gpu[path] = cores
    return dict(images=images, rounds=rounds, batch=batch, loader_workers=workers, img_size=img_size, rows=rows,
                cores_per_gpu_at_3000_img_s=per_gpu)


def environment() -> dict:
    """CPU model and flags, and the versions that decide decode speed."""
    import platform

    import PIL
    import torchvision
    from PIL import features

    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = sorted(f for f in have if f.startswith(("avx", "sse4", "fma", "bmi")))
                break
    except OSError:
        pass
    return dict(cpu_model=model, cpu_flags=flags, cpus=len(os.sched_getaffinity(0)), torch=torch.__version__,
                torchvision=torchvision.__version__, pillow=PIL.__version__,
                libjpeg_turbo=features.version("libjpeg_turbo"), python=platform.python_version())


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# Input pipeline benchmark {res['date']}", "",
             f"CPU: {env['cpu_model']} ({env['cpus']} CPUs visible), flags {' '.join(env['cpu_flags'])}; "
             f"torch {env['torch']}, torchvision {env['torchvision']}, Pillow {env['pillow']} "
             f"(libjpeg-turbo {env['libjpeg_turbo']}), Python {env['python']}.", "",
             f"Command: `{res['command']}`", "",
             f"{res['images']} ImageNet-like JPEGs (scikit-image photos, quality 90), {res['img_size']} px, "
             f"batches of {res['batch']}, {res['rounds']} rounds alternating old and new, one thread; "
             f"CPU time of this process, medians over rounds. `old`: PIL decode, timm's PIL transform, "
             "ToTensor + Normalize, float32 batches. `new`: rednet.data's builders: torchvision.io decode, uint8 "
             "crops, uint8 batches.", "",
             "| what | unit | old | new | old CPU / new CPU (median of rounds) |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['kind']} | {r['unit']} | {r['old']:.1f} | {r['new']:.1f} | "
                     f"{r['cpu_ratio_old_over_new']:.2f}x |")
    cores = res["cores_per_gpu_at_3000_img_s"]
    if cores:
        lines += ["", "Cores per GPU for 3,000 img/s (train transform plus the main process's share): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in cores.items()) + "."]
    lines += ["", "`main` is measured with the loader's workers on the same machine; `read` reads the training "
              "files' bytes (page-cached) one file per image (`old`) against one tar (`new`).", ""]
    return "\n".join(lines)
