"""RedNet: involution networks, their operator, training and evaluation.

Subpackages load on first use, so ``import rednet.fileio`` or ``import rednet.ops``
does not import the models (and timm) with them.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "__version__"]

_SUBPACKAGES = ("analysis", "data", "engine", "fileio", "layers", "models", "ops")


def __getattr__(name: str) -> Any:
    if name in ("create_model", "list_models"):
        return getattr(importlib.import_module(".models", __name__), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'rednet' has no attribute {name!r}")
