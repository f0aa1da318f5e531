"""RedNet: involution networks, their operator, training and evaluation.

Importing the package registers rednet26 ... rednet152 with timm, so
``import rednet; timm.create_model("rednet50")`` works. The command-line tools are
``rednet.tools`` (``python -m rednet <command>``, the ``rednet-<command>`` scripts); importing
the package loads none of them.
"""
from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "__version__"]
