"""The one folder both compiled caches live under: the native CPU libraries (``_native_build``)
and the CUDA kernel binaries (``_kernel_cache``, in its ``kernels`` subfolder)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root"]

CACHE_ENV = "REDNET_CACHE_DIR"


def cache_root() -> Path:
    """``$REDNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/rednet``, else ``~/.cache/rednet``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rednet"
