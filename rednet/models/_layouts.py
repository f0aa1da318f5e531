"""Key layouts of RedNet weights, and their conversion to this project's key names.

A state dict's layout is detected from its key names, never from a file name:

* ``rednet``: this project's names (``stem.*``, ``layer1.*`` ... ``layer4.*``, ``fc.*``);
* ``mmcls``: the authors' release, the same names under ``backbone.`` / ``head.`` prefixes;
* ``paddle``: the PaddleClas port, with BN statistics named ``_mean`` / ``_variance``, no
  ``num_batches_tracked``, and ``fc.weight`` stored as (in, out).

Every layout is converted to the ``rednet`` names before it meets a model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from ..fileio import CheckpointError

__all__ = [
    "KEY_LAYOUTS",
    "WeightsFile",
    "arch_from_state_dict",
    "convert_state_dict",
    "count_blocks",
    "count_nonfinite",
    "detect_key_layout",
    "format_keys",
]

KEY_LAYOUTS = ("rednet", "mmcls", "paddle")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_SHOW = 8  # keys named in an error before "... and N more"


def format_keys(keys: Iterable[str]) -> str:
    """The first few ``keys`` for an error message, then how many more there are."""
    keys = list(keys)
    more = f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def detect_key_layout(keys: Iterable[str]) -> str:
    """Which key layout a state dict uses: ``'rednet'``, ``'mmcls'`` or ``'paddle'``.

    Args:
        keys: the state dict's keys.

    Raises:
        CheckpointError: if the names belong to none of them.
    """
    keys = list(keys)
    if any(k.startswith("backbone.") for k in keys):
        return "mmcls"
    if any(k.endswith(("._mean", "._variance")) for k in keys):
        return "paddle"
    if any(re.match(r"(stem|layer[1-4])\.", k) for k in keys):
        return "rednet"
    raise CheckpointError("these keys match none of the RedNet layouts (rednet, mmcls, paddle): " + format_keys(keys))


def count_blocks(keys: Iterable[str]) -> tuple[int, ...]:
    """Bottleneck blocks per stage, from ``layer<i>.<j>.`` key names in the ``rednet`` layout."""
    blocks = [0, 0, 0, 0]
    for k in keys:
        m = re.match(r"layer([1-4])\.(\d+)\.", k)
        if m:
            i = int(m.group(1)) - 1
            blocks[i] = max(blocks[i], int(m.group(2)) + 1)
    return tuple(blocks)


def arch_from_state_dict(state_dict: dict[str, Any]) -> str | None:
    """The RedNet variant whose block counts match the keys (``'rednet50'``), else None.

    Args:
        state_dict: a state dict in the ``rednet`` layout.
    """
    blocks = count_blocks(state_dict)
    if not all(blocks):
        return None
    # A RedNet-D has D = 3 * (bottleneck blocks) + 2 layers (stem conv and classifier).
    return f"rednet{3 * sum(blocks) + 2}"


@dataclass
class WeightsFile:
    """Weights converted to this project's key names, with a record of what the conversion did.

    Attributes:
        state_dict: tensors under RedNet's own key names.
        container: ``'safetensors'``, ``'torch'``, ``'pickle'`` or ``'memory'``.
        layout: the key layout it was stored in, one of ``KEY_LAYOUTS``.
        renamed: ``(source name, rednet name)`` for every key whose name changed.
        transposed: keys whose tensor was transposed (the PaddleClas classifier).
        filled: keys the source lacks and that were filled (BN ``num_batches_tracked`` = 0).
        dropped: source entries that are not weights (``meta``, Paddle's name table).
        metadata: the file's own metadata (safetensors header), if any.
        source: where it was read from.
        nonfinite: NaN or infinite values per key, for the keys that have any (``read_weights`` fills it).
    """

    state_dict: dict[str, torch.Tensor]
    container: str
    layout: str
    renamed: list[tuple[str, str]] = field(default_factory=list)
    transposed: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""
    nonfinite: dict[str, int] = field(default_factory=dict)

    @property
    def arch(self) -> str | None:
        return self.metadata.get("arch") or arch_from_state_dict(self.state_dict)

    @property
    def num_classes(self) -> int | None:
        w = self.state_dict.get("fc.weight")
        return int(w.shape[0]) if w is not None else None

    def describe_nonfinite(self) -> str:
        """``nonfinite`` in words, for a warning or an error: how many values, and in which tensors."""
        keys = [f"{k} ({n:,})" for k, n in self.nonfinite.items()]
        return f"{sum(self.nonfinite.values()):,} NaN or infinite values in {len(keys)} tensors: {format_keys(keys)}"

    def summary(self) -> dict[str, Any]:
        """What was mapped, as plain data (for ``--json`` and logs)."""
        return dict(
            source=self.source,
            container=self.container,
            layout=self.layout,
            arch=self.arch,
            num_classes=self.num_classes,
            tensors=len(self.state_dict),
            params=int(sum(v.numel() for k, v in self.state_dict.items() if not k.endswith(_BUFFERS))),
            renamed=len(self.renamed),
            transposed=list(self.transposed),
            filled=len(self.filled),
            dropped=list(self.dropped),
            rename_examples=[list(p) for p in self.renamed[:3]],
            nonfinite=sum(self.nonfinite.values()),
        )


def _rednet_key(key: str, layout: str) -> str:
    if key.startswith("module."):  # saved from DistributedDataParallel
        key = key[len("module."):]
    if layout == "mmcls":
        if key.startswith("backbone."):
            key = key[len("backbone."):]
        elif key.startswith("head."):
            key = key[len("head."):]  # head.fc.* -> fc.*
    elif layout == "paddle":
        key = re.sub(r"\._mean$", ".running_mean", key)
        key = re.sub(r"\._variance$", ".running_var", key)
    return key


def count_nonfinite(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """NaN or infinite values per key, for the floating-point tensors that have any.

    Args:
        state_dict: tensors on a real device (``meta`` tensors hold no values and are skipped).
    """
    out = {}
    for k, t in state_dict.items():
        if (t.is_floating_point() or t.is_complex()) and not t.is_meta:
            n = int(t.numel() - torch.isfinite(t).sum())
            if n:
                out[k] = n
    return out


def convert_state_dict(state_dict: dict[str, torch.Tensor], layout: str | None = None) -> WeightsFile:
    """Rename a state dict in any supported layout to this project's names.

    Args:
        state_dict: tensors in the ``rednet``, ``mmcls`` or ``paddle`` layout.
        layout: the layout, or None to detect it from the key names.

    Raises:
        CheckpointError: ``layout`` is None and the keys match no layout.
        ValueError: ``layout`` is not one of ``KEY_LAYOUTS``.
    """
    layout = layout or detect_key_layout(state_dict)
    if layout not in KEY_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {KEY_LAYOUTS}")
    out: dict[str, torch.Tensor] = {}
    wf = WeightsFile(out, container="memory", layout=layout)
    for key, t in state_dict.items():
        new = _rednet_key(key, layout)
        if layout == "paddle" and new == "fc.weight" and t.dim() == 2:
            # Paddle's Linear stores (in_features, out_features).
            t = t.t().contiguous()
            wf.transposed.append(new)
        if new != key:
            wf.renamed.append((key, new))
        out[new] = t
    if layout == "paddle":
        for key in [k for k in out if k.endswith(".running_mean")]:
            nbt = key[: -len("running_mean")] + "num_batches_tracked"
            if nbt not in out:
                out[nbt] = torch.tensor(0, dtype=torch.long)
                wf.filled.append(nbt)
    return wf
