"""Training and evaluation machinery: config schema, loop, evaluation, checkpoints, distributed helpers."""
from .checkpoint import CheckpointError, load_model_from_checkpoint, read_checkpoint, save_checkpoint
from .config import Config, ConfigError, config_to_dict, load_config

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "config_to_dict",
    "load_config",
    "load_model_from_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]
