"""Every registered RedNet: architecture as released, timm conventions, and training paths."""
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn

import rednet
from rednet.layers import Involution
from rednet.models import Bottleneck, RedNet

from ..helpers import PARAMS, ROOT

MODELS = list(PARAMS)


def test_registry():
    assert rednet.list_models() == MODELS
    assert set(MODELS) <= set(timm.list_models("rednet*"))


def test_import_rednet_registers_with_timm():
    # The README's usage: a fresh interpreter, `import rednet`, then timm alone builds the model.
    code = "import timm, rednet; print(type(timm.create_model('rednet26', num_classes=3)).__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "RedNet"


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_matches_release(name):
    model = rednet.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_reset_classifier(name):
    model = timm.create_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features) == (2, 2048)


@pytest.mark.parametrize("name", MODELS)
def test_features_only(name):
    model = timm.create_model(name, features_only=True)
    assert model.feature_info.channels() == [256, 512, 1024, 2048]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4), (1, 2048, 2, 2)]
    picked = timm.create_model(name, features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in picked(torch.randn(1, 3, 64, 64))] == [512, 2048]


def test_architecture_as_released():
    model = rednet.create_model("rednet50")
    keys = model.state_dict().keys()
    for k in ("stem.0.conv.weight", "stem.1.conv1.conv.weight", "stem.1.conv1.bn.running_var", "stem.1.conv2.conv.bias",
              "stem.2.weight", "stem.4.conv.weight", "stem.4.bn.bias", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
              "layer1.0.conv2.conv1.conv.weight", "layer1.0.conv2.conv2.conv.bias", "layer1.0.downsample.0.weight",
              "layer4.2.bn3.num_batches_tracked", "fc.weight"):
        assert k in keys, k
    assert "layer1.1.downsample.0.weight" not in keys  # identity shortcut once shapes match
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    stem_inv = model.stem[1]
    assert isinstance(stem_inv, Involution) and (stem_inv.kernel_size, stem_inv.groups, stem_inv.stride) == (3, 2, 1)
    blk = model.layer3[0]
    inv = blk.conv2
    assert isinstance(inv, Involution) and (inv.kernel_size, inv.stride, inv.groups) == (7, 2, 16)
    assert blk.conv1.stride == (1, 1) and blk.downsample[0].stride == (2, 2)  # stride on the involution
    assert blk.conv2.conv1.conv.out_channels == 256 // 4 and blk.conv2.conv2.conv.out_channels == 49 * 16
    assert model.fc.in_features == 2048 and model.fc.out_features == 1000


def test_init_as_released():
    model = rednet.create_model("rednet26")
    for m in model.modules():
        if isinstance(m, Bottleneck):
            assert torch.count_nonzero(m.bn3.weight) == 0 and bool((m.bn2.weight == 1).all())
    w = model.layer2[0].conv1.weight  # kaiming normal, fan_out: std = sqrt(2 / (out * k * k))
    assert abs(w.std().item() - (2 / w.shape[0]) ** 0.5) < 0.15 * (2 / w.shape[0]) ** 0.5
    assert not any(torch.count_nonzero(m.bn3.weight) == 0 for m in RedNet((1, 1, 1, 1), zero_init_last=False).modules()
                   if isinstance(m, Bottleneck))


def test_pretrained_cfg():
    cfg = rednet.create_model("rednet50").pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bilinear"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["url"].endswith("RedNet50_pretrained.pdparams") and cfg["first_conv"] == "stem.0.conv"


def test_in_chans_pre_logits_odd_input_sizes():
    model = rednet.create_model("rednet26", in_chans=1, num_classes=4).eval()
    for size in (33, 45, 64):  # odd sizes exercise the ceil-mode kernel pooling at stride 2
        assert model(torch.randn(1, 1, size, size)).shape == (1, 4)
    feats = model.forward_features(torch.randn(1, 1, 64, 64))
    assert model.forward_head(feats, pre_logits=True).shape == (1, 2048)


def test_channels_last_same_output():
    model = rednet.create_model("rednet26", num_classes=5).eval()
    x = torch.randn(2, 3, 48, 48)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)


def test_grad_checkpointing_same_gradients():
    model = rednet.create_model("rednet26", num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_torch_export_matches_eager():
    # Under torch.export the front door records the portable tap formulation (rednet/ops/_export.py).
    model = rednet.create_model("rednet26", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_involution_rejects_bad_group_channels():
    with pytest.raises(ValueError, match="divisible by group_channels=16"):
        Involution(40, 7)
    assert isinstance(Involution(32, 3, stride=2).avgpool, nn.AvgPool2d)
