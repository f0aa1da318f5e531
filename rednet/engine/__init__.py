"""Training and evaluation machinery: config schema, builders, the training step and epoch loop, evaluation,
device-side step checks (``stepguard``), the run directory (``rundir``), the checkpoint file format,
distributed helpers.

The tools import what they need from here. Each name loads its module on first use, so
reading a config or a checkpoint does not import the training loop, the models or the
data pipeline.
"""
from __future__ import annotations

import importlib
from typing import Any

# name -> the module of this package that defines it
_EXPORTS = {
    "AMP_DTYPES": "builder",
    "build_model": "builder",
    "CheckpointError": "checkpoint",
    "empty_path_option": "cli",
    "fail": "cli",
    "load_model_from_checkpoint": "builder",
    "read_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "Config": "config",
    "ConfigError": "config",
    "apply_overrides": "config",
    "config_from_dict": "config",
    "config_to_dict": "config",
    "load_config": "config",
    "cleanup_distributed": "distributed",
    "init_distributed": "distributed",
    "setup_logging": "logger",
    "NonFiniteLossError": "loop",
    "evaluate": "loop",
    "TrainingInterrupted": "trainer",
    "fit": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
