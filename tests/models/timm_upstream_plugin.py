"""A pytest plugin that narrows timm's own ``tests/test_models.py`` to RedNet.

``tests/models/test_timm_upstream.py`` runs timm's file in a subprocess with ``-p tests.models.timm_upstream_plugin``.
timm's tests are parametrized by ``timm.list_models(...)`` when its file is imported, so this
plugin imports ``rednet`` first (registering the models), then keeps only the cases of
``MODELS``. A plugin, not a conftest: timm's file lives outside this repository (``make env``
puts it in the environment folder).
"""
import pytest
import torch

import rednet  # noqa: F401  registers rednet26 ... rednet152 with timm before timm's file is collected

MODELS = ("rednet26", "rednet50")

# timm's tests whose models are a fixed list or timm's own families (its FEAT_INTER_FILTERS, "models
# with forward_intermediates() and support for FeatureGetterNet"), where RedNet, which has both,
# cannot be listed: they run on MODELS instead.
REPARAMETRIZED = (
    "test_model_forward_intermediates_features",
    "test_model_forward_intermediates",
    "test_prune_intermediate_layers_contract",
    "test_model_forward_torchscript_with_features_fx",  # timm's sample model is regnetx_002
)

# Left out, each with the reason.
DESELECTED = {
    "test_model_load_pretrained": "downloads the published weights (needs the internet)",
    "test_model_features_pretrained": "downloads the published weights (needs the internet)",
}


def pytest_configure(config):
    # As tests/conftest.py: one thread, on a 2-core machine shared with other processes.
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector, name, obj):
    if name in REPARAMETRIZED:
        # The decorators' marks, read when pytest builds the cases right after this hook.
        obj.pytestmark = [
            pytest.mark.parametrize("model_name", MODELS).mark
            if m.name == "parametrize" and m.args[0] == "model_name" else m
            for m in obj.pytestmark
        ]


def _model(item) -> str:
    # Tagged names ('rednet26.paddle_in1k', from list_models(include_tags=True)) count as their model.
    callspec = getattr(item, "callspec", None)
    name = callspec.params.get("model_name", "") if callspec else ""
    return name.split(".")[0] if isinstance(name, str) else ""


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if _model(item) in MODELS and item.originalname not in DESELECTED]
    dropped = [item for item in items if item not in keep]
    config.hook.pytest_deselected(items=dropped)
    items[:] = keep
