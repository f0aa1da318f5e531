"""The fused inference pass (``rednet.ops.involution_fused``): kernel generation, aggregation,
BatchNorm and ReLU in one native pass, against the module's unfused path; where RedNet takes it
and where it must not (training, gradients, other layouts, autocast, a forced reference)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import rednet
from rednet.layers import Involution
from rednet.ops import _cpu, can_use_fused_kernel, involution_fused, pack_fused_weights, use_backend

from ..helpers import live_eval_model


@pytest.fixture(autouse=True)
def built():
    ok, why = _cpu.available()
    if not ok:
        pytest.skip(why)


def _randomize_bn(module: nn.Module) -> None:
    """Statistics and affine parameters away from the identity, so folding them is tested."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def _unfused(inv: Involution, bn: nn.BatchNorm2d | None, relu: bool, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), use_backend("reference"):
        y = inv(x)
        y = bn(y) if bn is not None else y
        return torch.relu(y) if relu else y


# (C, K, stride, H, W, batch): RedNet's stem and block windows, odd sizes (the ceil-mode pool
# averages a cut window), maps narrower than the window, a 1-pixel-wide output.
SHAPES = [
    (32, 3, 1, 20, 17, 2),
    (64, 7, 1, 15, 13, 2),
    (128, 7, 2, 15, 9, 3),
    (64, 7, 2, 9, 9, 1),
    (256, 7, 1, 5, 6, 2),
    (512, 7, 1, 3, 3, 1),
    (48, 5, 2, 11, 2, 2),
]


@pytest.mark.parametrize("c,k,s,h,w,b", SHAPES)
@pytest.mark.parametrize("with_bn,relu", [(True, True), (False, False)])
def test_fused_matches_module_bn_relu(c, k, s, h, w, b, with_bn, relu):
    inv = Involution(c, k, s).eval()
    bn = nn.BatchNorm2d(c).eval() if with_bn else None
    _randomize_bn(inv)
    if bn is not None:
        _randomize_bn(bn)
    x = torch.randn(b, c, h, w).contiguous(memory_format=torch.channels_last)
    assert can_use_fused_kernel(x, c, k, c // 16) == (True, "ok")
    with torch.no_grad():
        assert inv.can_fuse(x, bn)
        y = inv.forward_fused(x, bn, relu=relu)
    ref = _unfused(inv, bn, relu, x)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_pack_pads_to_whole_vectors_with_zeros():
    w = pack_fused_weights(torch.randn(8, 32), torch.randn(8), torch.randn(18, 8, 1, 1), torch.randn(18))
    assert w.reduce_weight.shape == (32, 16) and w.reduce_bias.shape == (16,)
    assert w.span_weight.shape == (16, 32) and w.span_bias.shape == (32,)
    assert not w.reduce_weight[:, 8:].any() and not w.span_weight[8:].any() and not w.span_weight[:, 18:].any()


@pytest.mark.parametrize("make,why", [
    (lambda x: x.contiguous(), "not channels_last"),
    (lambda x: x.double(), "float32"),
    (lambda x: x[:, :48], "is not (B, 64, H, W)"),
])
def test_can_use_fused_kernel_says_why_not(make, why):
    x = make(torch.randn(1, 64, 6, 6).contiguous(memory_format=torch.channels_last))
    ok, reason = can_use_fused_kernel(x, 64, 7, 4)
    assert not ok and why in reason
    assert can_use_fused_kernel(torch.randn(1, 24, 6, 6).contiguous(memory_format=torch.channels_last), 24, 3, 2) \
        == (False, "12 channels per group; the fused pass needs a multiple of 16")


def test_involution_fused_rejects_half_an_affine_map():
    inv = Involution(32, 3).eval()
    x = torch.randn(1, 32, 5, 5).contiguous(memory_format=torch.channels_last)
    weights, _, _ = inv._folded(None)
    with pytest.raises(ValueError, match="scale and shift together"):
        involution_fused(x, weights, 3, 1, 2, scale=torch.ones(32))


def _count_fused(monkeypatch) -> list:
    calls = []
    original = Involution.forward_fused

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Involution, "forward_fused", counting)
    return calls


@pytest.mark.parametrize("name", ["rednet26", "rednet50"])
def test_eval_model_fused_output_matches_unfused(name, monkeypatch):
    model = live_eval_model(name).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    calls = _count_fused(monkeypatch)
    with torch.no_grad():
        fused = model(x)
    assert len(calls) == sum(isinstance(m, Involution) for m in model.modules())  # all, stem included
    calls.clear()
    unfused = model(x)  # gradients on: the module's plain path
    assert not calls
    torch.testing.assert_close(fused, unfused.detach(), rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), fused, rtol=0, atol=0)


def test_fusion_only_at_inference(monkeypatch):
    """Training, recorded gradients, an NCHW network, autocast and a forced reference take the plain path."""
    model = rednet.create_model("rednet26").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    calls = _count_fused(monkeypatch)
    model.train()
    with torch.no_grad():
        model(x)
    model(x).sum().backward()
    model.eval()
    model(x)
    with torch.no_grad():
        rednet.create_model("rednet26").eval()(x.contiguous())  # an NCHW network
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        with use_backend("reference"):
            model(x)
    assert not calls
    with torch.no_grad():
        model(x)
    assert calls


def test_fused_weights_follow_in_place_updates():
    """The packed weights are cached per tensor version: an in-place change is seen at once."""
    inv, bn = Involution(64, 7).eval(), nn.BatchNorm2d(64).eval()
    _randomize_bn(inv)
    x = torch.randn(1, 64, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        first = inv.forward_fused(x, bn, relu=True)
        assert inv._folded(bn) is inv._folded(bn)  # reused while nothing changes
        inv.conv2.conv.weight.mul_(2)
        inv.conv1.bn.running_var.add_(1)
        bn.bias.add_(0.5)
        second = inv.forward_fused(x, bn, relu=True)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, _unfused(inv, bn, True, x), rtol=1e-5, atol=1e-5)


def test_torch_compile_with_freezing_keeps_the_fused_op_opaque():
    """One graph (fullgraph), the fused op a node in it, and inductor with freezing agrees with eager."""
    import torch._inductor.config

    model = live_eval_model("rednet26").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    targets = []

    def capture(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with torch.no_grad():
        ref = model(x)
        torch.compile(model, backend=capture, fullgraph=True)(x)
        assert targets.count(torch.ops.rednet.involution_fused.default) == 9  # every involution of RedNet-26
        with torch._inductor.config.patch(freezing=True):
            out = torch.compile(model, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
