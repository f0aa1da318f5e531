"""Capture the kernels an Involution layer generates, as in the paper's Figure 3.

The kernel is computed inside ``Involution.forward`` and handed straight to the
operator, so it is never a module output. It is, however, exactly the output of
the layer's span convolution (``conv2``) viewed as (B, G, K, K, Ho, Wo); a forward
hook there reads it without touching the forward path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..layers import Involution

__all__ = [
    "KernelCapture",
    "capture_kernel_sums",
    "default_layer",
    "involution_layers",
    "resolve_layer",
    "top_groups",
]


def involution_layers(model: nn.Module) -> dict[str, Involution]:
    """Every Involution in ``model`` by its ``named_modules()`` name, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Involution)}


def default_layer(model: nn.Module) -> str:
    """The involution of the last block of stage 3 (the paper's Figure 3).

    Falls back to the last involution of the model when it has no stage 3 (e.g. a
    custom network built from ``Involution`` layers).
    """
    names = list(involution_layers(model))
    if not names:
        raise ValueError(f"{type(model).__name__} has no Involution layers to visualize")
    # Match on the module path, not a hard-coded block index: the depth of stage 3
    # differs per variant (4 blocks in RedNet-26, 36 in RedNet-152).
    stage3 = [n for n in names if n.startswith("layer3.")]
    return (stage3 or names)[-1]


def resolve_layer(model: nn.Module, name: str) -> Involution:
    """The Involution called ``name``; a ``ValueError`` listing the valid names otherwise."""
    layers = involution_layers(model)
    if name not in layers:
        raise ValueError(f"unknown involution layer {name!r}; valid layers: {', '.join(layers)}")
    return layers[name]


@dataclass
class KernelCapture:
    """Context manager that records the per-position kernel sums of one Involution.

    Each forward pass through the layer appends a (B, G, Ho, Wo) float32 CPU tensor to
    ``sums``: at every output position, the sum of that position's K*K kernel for each
    group. Summing happens on the layer's device, so only the small map is copied back.

    Args:
        layer: the Involution to observe.
        keep_kernels: also keep the full kernels, (B, G, K, K, Ho, Wo), in ``kernels``.
    """

    layer: Involution
    keep_kernels: bool = False
    sums: list[torch.Tensor] = field(default_factory=list, init=False)
    kernels: list[torch.Tensor] = field(default_factory=list, init=False)
    _handle: torch.utils.hooks.RemovableHandle | None = field(default=None, init=False, repr=False)

    def _hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        k, g = self.layer.kernel_size, self.layer.groups
        b, _, ho, wo = out.shape
        # Same (group, tap) channel order as Involution.generate_kernel's view.
        taps = out.detach().view(b, g, k * k, ho, wo)  # (B, G, K*K, Ho, Wo)
        # float32 so kernels generated under AMP are summed without fp16 rounding.
        self.sums.append(taps.float().sum(2).cpu())  # (B, G, Ho, Wo)
        if self.keep_kernels:
            self.kernels.append(taps.view(b, g, k, k, ho, wo).float().cpu())
        # Returning None leaves the module output, and so the forward path, unchanged.

    def __enter__(self) -> KernelCapture:
        self._handle = self.layer.conv2.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class _StopForward(Exception):
    """Raised by a hook once the observed layer has run: nothing after it is needed."""


def _stop(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
    raise _StopForward


@torch.no_grad()
def capture_kernel_sums(model: nn.Module, x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """Run ``model`` on ``x`` and return the kernel sums of one involution layer.

    The model is run in eval mode (BatchNorm with running statistics, as at inference)
    and restored to its previous mode afterwards. The forward pass stops once the layer
    has run, so early layers of deep models cost little.

    Args:
        model: a network containing Involution layers.
        x: input batch on the model's device, (B, C, H, W).
        layer: ``named_modules()`` name of the layer; the last block of stage 3 if None.

    Returns:
        (B, G, Ho, Wo) float32 tensor on the CPU.
    """
    layer = layer if layer is not None else default_layer(model)
    target = resolve_layer(model, layer)
    was_training = model.training
    model.eval()
    stop = target.register_forward_hook(_stop)
    try:
        with KernelCapture(target) as cap:
            model(x)
    except _StopForward:
        pass
    finally:
        stop.remove()
        model.train(was_training)
    if not cap.sums:
        raise RuntimeError(f"layer {layer!r} is not used by {type(model).__name__}.forward; nothing was captured")
    return cap.sums[0]


def top_groups(sums: torch.Tensor, n: int | None) -> list[int]:
    """Indices of the ``n`` groups whose maps vary most over the image, largest first.

    Spatial variance picks the groups that respond to image content; a group whose
    kernel sum is nearly constant has nothing to show.

    Args:
        sums: (G, Ho, Wo) kernel sums of one image.
        n: how many groups; None or a value >= G keeps all, in group order.
    """
    if sums.dim() != 3:
        raise ValueError(f"expected kernel sums of one image, (G, Ho, Wo); got shape {tuple(sums.shape)}")
    g = sums.shape[0]
    if n is None or n >= g:
        return list(range(g))
    if n < 1:
        raise ValueError(f"number of groups must be at least 1, got {n}")
    var = sums.flatten(1).var(1, unbiased=False)  # (G,)
    return var.topk(n).indices.tolist()
