"""The distinct involution calls a network makes, found by tracing one forward pass.

Used by ``tools/benchmark.py`` to time the operator on exactly the shapes RedNet runs.
"""
from __future__ import annotations

from typing import TypedDict

import torch
import torch.nn as nn

from ..layers import Involution

__all__ = ["InvolutionShape", "involution_shapes"]


class InvolutionShape(TypedDict):
    """One distinct involution call: its input (C, H, W), window, stride and groups.

    ``name`` is the stage of the first layer making the call (``stem``, ``layer1`` ...
    ``layer4``), with ``.down`` for strided ones; ``count`` is how many layers make it.
    """

    name: str
    C: int
    H: int
    W: int
    K: int
    stride: int
    G: int
    count: int


@torch.no_grad()
def involution_shapes(model: str | nn.Module = "rednet50", size: int = 224) -> list[InvolutionShape]:
    """Distinct involution calls of ``model`` on a ``size`` x ``size`` image, in call order, with counts.

    Args:
        model: a registered model name, built and traced on the ``meta`` device (no memory,
            instant), or a module, traced in eval mode wherever its parameters are.
        size: input height and width in pixels.
    """
    if isinstance(model, str):
        from ..models import create_model  # registers RedNet with timm

        with torch.device("meta"):
            net = create_model(model)
    else:
        net = model
    seen: dict[tuple, InvolutionShape] = {}

    def record(name: str, mod: Involution, args: tuple) -> None:
        _, c, h, w = args[0].shape
        key = (c, h, w, mod.kernel_size, mod.stride, mod.groups)
        if key not in seen:
            label = name.split(".")[0] + (".down" if mod.stride > 1 else "")  # stem / layer1..4
            seen[key] = InvolutionShape(name=label, C=c, H=h, W=w, K=mod.kernel_size, stride=mod.stride,
                                        G=mod.groups, count=0)
        seen[key]["count"] += 1

    hooks = [mod.register_forward_pre_hook(lambda m, args, name=name: record(name, m, args))
             for name, mod in net.named_modules() if isinstance(mod, Involution)]
    p = next(iter(net.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    was_training = net.training
    net.eval()  # a real module's BatchNorm statistics stay as they were
    try:
        net(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    return list(seen.values())
