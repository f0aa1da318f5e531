"""``model`` mode: training and inference images/s with peak memory, RedNet against ResNet (timm)."""
from __future__ import annotations

import gc
from typing import Callable

import torch

import rednet
from rednet.ops import (
    can_use_cuda_kernel,
    use_backend,
)

from ._common import log, time_ms

MODES = ("train", "infer")


def _make_model(name: str, device: torch.device) -> torch.nn.Module:
    # rednet.create_model builds any timm model too; `import rednet` alone no longer registers RedNet with timm.
    return rednet.create_model(name, num_classes=1000).to(device).to(memory_format=torch.channels_last)


def train_step(run: Callable, model: torch.nn.Module, imgs: torch.Tensor, target: torch.Tensor,
                amp) -> Callable[[], None]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def step():
        with amp:
            loss = torch.nn.functional.cross_entropy(run(imgs), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def infer_step(run: Callable, model: torch.nn.Module, imgs: torch.Tensor, amp) -> Callable[[], object]:
    model.eval()

    def step():
        with torch.inference_mode(), amp:
            return run(imgs)
    return step


def _model_throughput(name: str, backend: str, mode: str, batch: int, device: torch.device, args) -> dict:
    # "-": a model without involutions; the reference is forced so nothing probes CuPy.
    with use_backend(backend if backend != "-" else "reference"):
        if args.compile:
            torch._dynamo.reset()  # a fresh trace per model and backend; frees the previous ones
        model = _make_model(name, device)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_amp)
        imgs = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (batch,), device=device)
        run = torch.compile(model) if args.compile else model
        if mode == "train":
            step = train_step(run, model, imgs, target, amp)
        else:
            step = infer_step(run, model, imgs, amp)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = time_ms(step, device, args.warmup, args.repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(model=name, backend=backend, mode=mode, batch=batch, img_per_s=batch / (ms * 1e-3),
                peak_mem_gb=peak, compile=args.compile, amp="bf16" if not args.no_amp else "off")


def _largest_batch_throughput(name: str, backend: str, mode: str, device: torch.device, args) -> dict | None:
    """Throughput at --model-batch, halved on out-of-memory until it fits; None if batch 1 does not."""
    batch = args.model_batch
    while batch >= 1:
        try:
            return _model_throughput(name, backend, mode, batch, device, args)
        except torch.OutOfMemoryError:
            log(f"  OOM: {name} {backend} {mode} batch {batch}; halving")
            batch //= 2
            gc.collect()
            torch.cuda.empty_cache()
    return None


def run_model(args, device: torch.device) -> list[dict]:
    rows = []
    jobs = [(m, be) for m in args.models if m.startswith("rednet") for be in args.backends
            if be in ("reference", "cupy")]
    jobs += [(m, "-") for m in args.models if not m.startswith("rednet")]
    for name, backend in jobs:
        if backend == "cupy":
            ok, why = can_use_cuda_kernel(torch.empty(0, device=device))
            if not ok:
                log(f"skip {name} cupy: {why}")
                continue
        for mode in args.modes:
            row = _largest_batch_throughput(name, backend, mode, device, args)
            if row is None:
                continue
            rows.append(row)
            peak = row["peak_mem_gb"] if row["peak_mem_gb"] is None else round(row["peak_mem_gb"], 2)
            log(f"{name:<10} {backend:<9} {mode:<5} batch {row['batch']:<4} {row['img_per_s']:9.1f} img/s  "
                f"peak {peak} GB")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows

