"""Pretrained weights as metadata: one ``Weights`` per published file.

The model's ``pretrained_cfg`` (eval transforms) and its default download derive from
this table; reading and converting the files lives in ``_readers``, ``_layouts`` and
``_loading``.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WEIGHTS", "Weights"]


@dataclass(frozen=True)
class Weights:
    """One set of published weights; eval transforms and loading derive from it.

    Args:
        url: where the file is published.
        layout: its key layout, one of ``KEY_LAYOUTS`` (``'rednet'``, ``'mmcls'``, ``'paddle'``).
        top1: published ImageNet top-1 (%).
        top5: published top-5 (%), if any.
        sha256: digest (or a prefix of it) the download is checked against, if known.
        num_classes: classifier outputs.
        input_size: ``(C, H, W)`` of the evaluation crop.
        crop_pct: crop size over resize size at evaluation.
        interpolation: resize interpolation at evaluation.
    """

    url: str
    layout: str
    top1: float
    top5: float | None = None
    sha256: str | None = None
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bilinear"


_PADDLE = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/RedNet{}_pretrained.pdparams"

# Top-1 of the PaddleClas port as PaddleClas publishes it (ImageNet val, single crop).
# No sha256: the files cannot be fetched from where this table was written, and a
# digest that was never checked against the real file would only break downloads.
WEIGHTS: dict[str, Weights] = {
    f"rednet{d}.paddle_in1k": Weights(url=_PADDLE.format(d), layout="paddle", top1=top1)
    for d, top1 in ((26, 75.95), (38, 77.47), (50, 78.33), (101, 78.94), (152, 79.17))
}
