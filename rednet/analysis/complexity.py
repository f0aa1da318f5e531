"""Parameters and multiply-accumulates (MACs) of a model, counted on a forward pass.

Forward hooks count, per image:

* convolutions: ``Cout * Ho * Wo * (Cin / groups) * prod(kernel)``;
* linear layers: ``in_features * out_features`` per output row (tokens included);
* BatchNorm (and other ``_NormBase`` layers): one multiply-add per output element,
  the cost of the per-channel affine ``x * scale + shift`` it folds into at inference;
* the involution aggregation: ``K * K * C * Ho * Wo`` per Involution module. Its
  kernel generation (reduce and span 1x1 convolutions, BN) is counted by the hooks
  above, since those are ordinary submodules.

Activations, pooling, residual additions and attention matmuls are not counted,
following the convention of the GFLOPs (= GMACs) columns of the paper and of ResNet
tables. The forward runs on the ``meta`` device by default: shapes are exact and no
memory or arithmetic is spent.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from ..layers import Involution

__all__ = ["Complexity", "count_complexity", "count_model"]

_logger = logging.getLogger(__name__)


@dataclass
class Complexity:
    """Counts for one image.

    Attributes:
        model: model name.
        input_size: (C, H, W) of the counted input.
        params: number of parameters (each shared tensor once).
        macs: multiply-accumulates per image; GFLOPs in the paper's sense is ``macs / 1e9``.
        by_type: ``macs`` split into ``conv``, ``linear``, ``norm`` and ``involution``.
        device: where the forward ran.
    """

    model: str
    input_size: tuple[int, int, int]
    params: int
    macs: int
    by_type: dict[str, int] = field(default_factory=dict)
    device: str = "meta"

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["gmacs"] = round(self.gmacs, 4)
        d["params_m"] = round(self.params / 1e6, 4)
        return d


def _per_image(out: torch.Tensor) -> int:
    return out.numel() // out.shape[0] if out.dim() > 0 and out.shape[0] else out.numel()


def _conv_macs(m: _ConvNd, out: torch.Tensor) -> int:
    k = 1
    for s in m.kernel_size:
        k *= s
    # out (B, Cout, *spatial): every output element reads Cin/groups * prod(kernel) inputs.
    return _per_image(out) * (m.in_channels // m.groups) * k


def _linear_macs(m: nn.Linear, out: torch.Tensor) -> int:
    return _per_image(out) * m.in_features


def _norm_macs(m: nn.Module, out: torch.Tensor) -> int:
    return _per_image(out)


def _involution_macs(m: Involution, out: torch.Tensor) -> int:
    # out (B, C, Ho, Wo): each output element sums K*K taps weighted by its group's kernel.
    return _per_image(out) * m.kernel_size * m.kernel_size


_COUNTERS: tuple[tuple[type, str, Callable[[Any, torch.Tensor], int]], ...] = (
    (Involution, "involution", _involution_macs),
    (_ConvNd, "conv", _conv_macs),
    (nn.Linear, "linear", _linear_macs),
    (_NormBase, "norm", _norm_macs),
)


@torch.no_grad()
def count_complexity(
    model: nn.Module,
    input_size: tuple[int, int, int] = (3, 224, 224),
    name: str | None = None,
) -> Complexity:
    """Count parameters and per-image MACs of ``model`` with one forward pass.

    The forward runs wherever the model's parameters are (build it under
    ``torch.device('meta')`` for a free, shape-only pass).

    Args:
        model: any ``nn.Module`` taking one (B, C, H, W) tensor.
        input_size: (C, H, W) of the input.
        name: model name for the report; defaults to the class name.
    """
    by_type = {kind: 0 for _, kind, _ in _COUNTERS}

    def hook(kind: str, fn: Callable[[Any, torch.Tensor], int]):
        def _hook(mod: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                by_type[kind] += int(fn(mod, out))
        return _hook

    handles = []
    for mod in model.modules():
        for cls, kind, fn in _COUNTERS:
            if isinstance(mod, cls):
                handles.append(mod.register_forward_hook(hook(kind, fn)))
                break
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((1, *input_size), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return Complexity(
        model=name or type(model).__name__,
        input_size=tuple(input_size),
        params=int(params),
        macs=int(sum(by_type.values())),
        by_type=by_type,
        device=device.type,
    )


def count_model(
    name: str,
    input_size: tuple[int, int, int] | None = None,
    device: str = "meta",
    **kwargs: Any,
) -> Complexity:
    """Build a registered model (RedNet or any timm name) and count it.

    Args:
        name: model name, e.g. ``'rednet50'`` or ``'resnet50'``.
        input_size: (C, H, W); defaults to the model's pretrained config input size.
        device: ``'meta'`` (shape-only, no memory) or a real device; a model whose forward
            cannot run on ``meta`` (data-dependent shapes) is retried on the CPU.
        **kwargs: model arguments (``num_classes``, ``in_chans``, ...).
    """
    from ..models import create_model  # registers RedNet with timm

    def build(dev: str) -> nn.Module:
        with torch.device(dev):
            return create_model(name, **kwargs)

    model = build(device)  # an unknown name fails here, before any fallback
    size = input_size or tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    if device != "meta":
        return count_complexity(model, size, name=name)
    try:
        return count_complexity(model, size, name=name)
    except (NotImplementedError, RuntimeError) as e:
        _logger.warning("%s cannot run on the meta device (%s); counting with a CPU forward", name, e)
        return count_complexity(build("cpu"), size, name=name)
