from .rednet import Bottleneck, RedNet
from ._factory import create_model, list_models

__all__ = ["Bottleneck", "RedNet", "create_model", "list_models"]
