from ._factory import create_model, list_models
from .rednet import Bottleneck, RedNet

__all__ = ["Bottleneck", "RedNet", "create_model", "list_models"]
