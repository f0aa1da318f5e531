"""Training and evaluation machinery, and the one door the tools come through.

- the config: ``config`` (the schema: sections, keys, value checks), ``config_data`` (plain
  data <-> typed config, ``--set`` overrides), ``config_files`` (YAML files, ``base:``
  merging, the bundled configs, ``load_config``);
- building a run: ``builder`` (model, optimizer, schedule, loss, precision; a model from a
  training checkpoint), ``devices`` (the device a run names is here, and
  ``$REDNET_INVOLUTION_BACKEND`` runs on it);
- running it: ``trainer`` (``fit``), ``trainrun`` (the run's state, what a checkpoint keeps of
  it, an epoch's bookkeeping), ``signals`` (stop signals), ``kernelcheck`` (the CUDA kernels'
  check for a model, agreed by every rank before the first step), ``step`` (the training step),
  ``loop`` (the epoch, the eval pass), ``meter``, ``stepguard`` (device-side step checks),
  ``evaluation`` (``run_eval``), ``rundir`` (the run directory), ``runlock`` (its lock),
  ``checkpoint`` (the file format), ``resume``, ``classes`` (a checkpoint's or weights' classes
  against the data's), ``logger``, ``distributed``;
- ``cli``: what the tools share, above all ``EXIT_CODES`` and ``run_command``.

This module imports exactly what the tools (``rednet.tools``) use, and the errors ``EXIT_CODES`` names; the
tools import from here and nowhere else in the engine. Everything else stays in its module.
"""
from ..data import DataError
from ..fileio import CheckpointError, OutputDirError
from .builder import load_model_from_checkpoint
from .cli import (
    EXIT_CODES,
    UsageError,
    check_device_option,
    check_path_options,
    list_configs,
    path_values,
    run_command,
)
from .config import ConfigError
from .config_data import config_to_dict
from .config_files import load_config
from .evaluation import run_eval
from .resume import RESUME_SAFE_KEYS
from .stepguard import NonFiniteLossError
from .trainer import TrainingInterrupted, fit

__all__ = [
    "EXIT_CODES",
    "RESUME_SAFE_KEYS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "NonFiniteLossError",
    "OutputDirError",
    "TrainingInterrupted",
    "UsageError",
    "check_device_option",
    "check_path_options",
    "config_to_dict",
    "fit",
    "list_configs",
    "load_config",
    "load_model_from_checkpoint",
    "path_values",
    "run_command",
    "run_eval",
]
