"""Writing weights in this project's own format: safetensors in the ``rednet`` key layout."""
from __future__ import annotations

import os

import torch

from ..fileio import atomic_write
from ._layouts import arch_from_state_dict

__all__ = ["save_weights"]


def save_weights(
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike,
    arch: str | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a state dict as this project's safetensors layout, atomically.

    The header records ``layout='rednet'`` and the model name, so ``read_weights``
    needs no guessing and ``tools/convert_weights.py`` can tell the variant.

    Args:
        state_dict: tensors under RedNet's key names.
        path: destination file; replaced only once the new one is complete.
        arch: model name stored in the metadata; inferred from the keys when None.
        metadata: extra string metadata.
    """
    from safetensors.torch import save

    meta = {"format": "pt", "layout": "rednet"}
    arch = arch or arch_from_state_dict(state_dict)
    if arch:
        meta["arch"] = arch
    meta.update(metadata or {})
    # safetensors refuses shared or strided storage; clone keeps every tensor standalone.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda f: f.write(save(tensors, metadata=meta)))
