"""torch.hub entry points: ``torch.hub.load('<repo or dir>', 'rednet50', pretrained=True)``.

Each entry point takes ``pretrained`` (``True`` for the model's default PaddleClas
weights, or a local path / URL of a weights file in any supported layout: this
project's safetensors, the authors' mmcls ``.pth``, a PaddleClas ``.pdparams``) and
the model arguments of ``rednet.create_model`` (``num_classes``, ``in_chans``,
``features_only``, ``drop_rate``, ...). Importing this file builds nothing.
"""
from rednet.models import rednet26, rednet38, rednet50, rednet101, rednet152

__all__ = ["rednet26", "rednet38", "rednet50", "rednet101", "rednet152"]

# torch.hub checks that these are installed before it calls an entry point.
dependencies = ["torch", "timm", "numpy", "safetensors"]
