"""hubconf.py: torch.hub.load from a local checkout, and importing it builds nothing."""
from __future__ import annotations

import importlib.util
import inspect

import timm
import torch

import rednet
from rednet.models import save_weights

from ..helpers import ROOT

NAMES = ["rednet26", "rednet38", "rednet50", "rednet101", "rednet152"]


def test_import_builds_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("importing hubconf built a model")

    monkeypatch.setattr(rednet.models.rednet.RedNet, "__init__", refuse)
    spec = importlib.util.spec_from_file_location("_hubconf_under_test", ROOT / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    assert set(hub.dependencies) >= {"torch", "timm", "safetensors", "numpy"}
    for name in NAMES:
        fn = getattr(hub, name)
        assert list(inspect.signature(fn).parameters) == ["pretrained", "kwargs"]
        assert "Args:" in fn.__doc__
    entry_points = [n for n in dir(hub) if callable(getattr(hub, n)) and not n.startswith("_")]
    assert sorted(entry_points) == sorted(NAMES)


def test_entry_points_are_the_registered_models():
    spec = importlib.util.spec_from_file_location("_hubconf_entry_points", ROOT / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    for name in NAMES:  # imported, not re-wrapped: one docstring and one set of depths per model
        assert getattr(hub, name) is getattr(rednet.models, name) is timm.models.model_entrypoint(name)


def test_hub_load_local_with_kwargs_and_weights(tmp_path):
    model = torch.hub.load(str(ROOT), "rednet26", source="local", num_classes=10)
    assert isinstance(model, rednet.models.RedNet) and model.fc.out_features == 10
    # pretrained as a path: weights land unchanged (classifier dropped for 10 classes).
    ref = rednet.create_model("rednet26")
    with torch.no_grad():
        ref.layer3[1].bn2.weight.fill_(0.5)
    save_weights(ref.state_dict(), tmp_path / "w.safetensors")
    loaded = torch.hub.load(str(ROOT), "rednet26", source="local", pretrained=str(tmp_path / "w.safetensors"))
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
