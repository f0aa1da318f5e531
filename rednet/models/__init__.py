"""RedNet models, registered with timm, and their pretrained weights.

Weights files are read whatever their container (safetensors, torch ``.pth``, PaddleClas
``.pdparams``) and key layout (``KEY_LAYOUTS``), and converted to this project's names
(a ``WeightsFile``) before they meet a model. A training checkpoint, which also holds the
optimizer and the config, is ``rednet.engine``'s business; both raise ``CheckpointError``.
"""
from ..fileio import CheckpointError
from ._blocks import Bottleneck
from ._factory import create_model, list_models
from ._hub import resolve_source
from ._layouts import KEY_LAYOUTS, WeightsFile, arch_from_state_dict, convert_state_dict, detect_key_layout
from ._loading import fit_state_dict, load_pretrained, load_weights, read_weights, weights_num_classes
from ._pretrained import WEIGHTS, Weights
from ._saving import save_weights
from ._urls import redact_url
from .rednet import RedNet, rednet26, rednet38, rednet50, rednet101, rednet152

__all__ = [
    "KEY_LAYOUTS",
    "WEIGHTS",
    "Bottleneck",
    "CheckpointError",
    "RedNet",
    "Weights",
    "WeightsFile",
    "arch_from_state_dict",
    "convert_state_dict",
    "create_model",
    "detect_key_layout",
    "fit_state_dict",
    "list_models",
    "load_pretrained",
    "load_weights",
    "read_weights",
    "redact_url",
    "rednet26",
    "rednet38",
    "rednet50",
    "rednet101",
    "rednet152",
    "resolve_source",
    "save_weights",
    "weights_num_classes",
]
