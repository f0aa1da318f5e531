"""Pretrained weights: metadata per weight, and loading of every supported layout."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Weights", "WEIGHTS", "load_pretrained"]


@dataclass(frozen=True)
class Weights:
    """One set of published weights; eval transforms and loading derive from it."""

    url: str
    layout: str  # "rednet" (safetensors), "mmcls" (.pth) or "paddle" (.pdparams)
    top1: float
    top5: float | None = None
    sha256: str | None = None
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bilinear"


_PADDLE = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/RedNet{}_pretrained.pdparams"

# Top-1 of the PaddleClas port as PaddleClas publishes it (ImageNet val, single crop).
WEIGHTS: dict[str, Weights] = {
    f"rednet{d}.paddle_in1k": Weights(url=_PADDLE.format(d), layout="paddle", top1=top1)
    for d, top1 in ((26, 75.95), (38, 77.47), (50, 78.33), (101, 78.94), (152, 79.17))
}


def load_pretrained(model, source: str, sha256: str | None = None) -> None:
    raise NotImplementedError("being written")
