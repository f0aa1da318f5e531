"""RedNet as a first-class timm model: intermediates, FX tracing, pooling and regularisation."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import DropBlock2d, DropPath
from timm.models import FeatureGraphNet, FeatureListNet
from timm.models._features import FeatureGetterNet
from timm.models.resnet import drop_blocks
from torchvision.models.feature_extraction import create_feature_extractor

import rednet
from rednet.models import Bottleneck, RedNet
from rednet.models._blocks import POOL_TYPES

from ..helpers import DEPTHS, PARAMS, live_eval_model

MODELS = list(DEPTHS)
STAGES = ["layer1", "layer2", "layer3", "layer4"]


# ----------------------------------------------------------------------------------------
# forward_intermediates / prune_intermediate_layers / feature_cls='getter'


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_match_features_only(name):
    # Train mode (batch statistics) keeps every depth's random activations finite.
    model = rednet.create_model(name, zero_init_last=False)
    listed = FeatureListNet(copy.deepcopy(model), out_indices=(0, 1, 2, 3))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        expected = listed(x)
    assert [t.shape[1] for t in inter] == [f["num_chs"] for f in model.feature_info]
    assert torch.isfinite(final).all()
    for a, b in zip(inter, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(final, expected[-1], rtol=0, atol=0)


def test_forward_intermediates_indices_stop_early_and_format():
    model = live_eval_model("rednet26")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        assert [t.shape[1:] for t in full] == [(256, 8, 8), (512, 4, 4), (1024, 2, 2), (2048, 1, 1)]
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)  # an int: the last n
        picked = model.forward_intermediates(x, indices=[0, -2], intermediates_only=True)
        final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    for got, want in ((last2, full[2:]), (picked, [full[0], full[2]]), (early, [full[1]])):
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(final, full[1])  # stop_early ends the trunk at the last selected stage
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_forward_intermediates_with_grad_checkpointing():
    model = rednet.create_model("rednet26", zero_init_last=False)  # train mode: batch statistics
    x = torch.randn(2, 3, 32, 32)
    ref = model.forward_intermediates(x, intermediates_only=True)
    model.set_grad_checkpointing()
    got = model.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    sum(t.sum() for t in got).backward()
    assert model.stem[0].conv.weight.grad is not None


@pytest.mark.parametrize("name, out_indices", [("rednet26", (0, 1, 2, 3)), ("rednet26", (0, 2)), ("rednet50", (1, 3))])
def test_getter_features_equal_features_only(name, out_indices):
    listed = timm.create_model(name, features_only=True, out_indices=out_indices).eval()
    getter = timm.create_model(name, features_only=True, out_indices=out_indices, feature_cls="getter").eval()
    assert isinstance(getter, FeatureGetterNet)
    assert getter.feature_info.channels() == listed.feature_info.channels()
    assert getter.feature_info.reduction() == listed.feature_info.reduction()
    # The same (calibrated) weights in both; pruning left the getter only the stages it needs.
    weights = live_eval_model(name).state_dict()
    for net in (listed, getter.model):
        net.load_state_dict({k: v for k, v in weights.items() if k in net.state_dict()}, strict=True)
    if max(out_indices) < 3:
        assert len(getter.model.layer4) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(getter(x), listed(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_prune_intermediate_layers():
    model = live_eval_model("rednet26")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers([0, 2]) == [0, 2]
        assert len(model.layer4) == 0 and len(model.layer3) == 4
        assert model.num_features == model.head_hidden_size == 1024 and isinstance(model.fc, nn.Identity)
        assert model.forward_head(model.forward_features(x)).shape == (1, 1024, 2, 2)  # no pool left
        got = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[2])
    keep_all = live_eval_model("rednet26")
    keep_all.prune_intermediate_layers(4, prune_head=False)
    assert isinstance(keep_all.fc, nn.Linear) and keep_all.num_features == 2048


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_fx_features_keep_rednet_out_indices_and_script():
    # A feature_cfg that names only the class used to drop RedNet's default out_indices for timm's 0..4.
    fx_feats = timm.create_model("rednet26", features_only=True, feature_cfg=dict(feature_cls="fx")).eval()
    assert isinstance(fx_feats, FeatureGraphNet) and fx_feats.feature_info.channels() == [256, 512, 1024, 2048]
    scripted = torch.jit.script(fx_feats)  # as timm's test_model_forward_torchscript_with_features_fx
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(scripted(x), fx_feats(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    picked = timm.create_model("rednet26", features_only=True, feature_cfg=dict(feature_cls="fx", out_indices=(2,)))
    assert picked.feature_info.channels() == [1024]


@pytest.mark.parametrize("feature_cls", ["list", "fx", "getter"])
@pytest.mark.parametrize("out_indices", [(4,), (0, 4), (-5,), (1, 1), (), 0, 5], ids=str)
def test_bad_out_indices_name_the_valid_ones(feature_cls, out_indices):
    with pytest.raises(ValueError, match=r"feature indices 0, 1, 2, 3 .*int from 1 to 4"):
        timm.create_model("rednet26", features_only=True, feature_cls=feature_cls, out_indices=out_indices)
    with pytest.raises(ValueError, match=r"out_indices=.* is not valid for RedNet"):
        timm.create_model("rednet26", features_only=True, feature_cfg=dict(feature_cls=feature_cls,
                                                                          out_indices=out_indices))


def test_good_out_indices_still_accepted():
    good = (((-1,), [2048]), (2, [1024, 2048]), ((0, -1), [256, 2048]), (4, [256, 512, 1024, 2048]))
    for out_indices, channels in good:
        model = timm.create_model("rednet26", features_only=True, out_indices=out_indices)
        assert model.feature_info.channels() == channels


# ----------------------------------------------------------------------------------------
# torch.fx


@pytest.mark.parametrize("name", ["rednet26", "rednet50"])
def test_torchvision_fx_feature_extractor(name):
    model = live_eval_model(name)
    nodes = {"layer1": "c2", "layer2.0.conv2.conv2.conv": "kernel", "layer3": "c4", "fc": "logits"}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = extractor(x)
        inter = model.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(out["c2"], inter[0], rtol=0, atol=0)
        torch.testing.assert_close(out["c4"], inter[2], rtol=0, atol=0)
        torch.testing.assert_close(out["logits"], model(x), rtol=0, atol=0)
    assert out["kernel"].shape == (2, 49 * 8, 4, 4)  # the involution's own submodules are nodes


def test_fx_symbolic_trace_whole_model_and_timm_fx_features():
    model = live_eval_model("rednet26", num_classes=10)
    x = torch.randn(2, 3, 48, 48)
    gm = torch.fx.symbolic_trace(model)
    fx_feats = timm.create_model("rednet26", features_only=True, feature_cls="fx", out_indices=(1, 2, 3))
    assert isinstance(fx_feats, FeatureGraphNet) and fx_feats.feature_info.channels() == [512, 1024, 2048]
    same_weights = FeatureGraphNet(copy.deepcopy(model), out_indices=(1, 2, 3))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
        assert [f.shape[1:] for f in fx_feats.eval()(x)] == [(512, 6, 6), (1024, 3, 3), (2048, 2, 2)]
        got = same_weights(x)
        want = model.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------
# global_pool


def test_default_pool_is_exactly_the_mean():
    model = live_eval_model("rednet26", num_classes=0)
    feats = torch.randn(3, 2048, 5, 4)
    assert torch.equal(model.forward_head(feats), feats.mean((2, 3)))
    cl = feats.to(memory_format=torch.channels_last)
    assert torch.equal(model.forward_head(cl), cl.mean((2, 3)))


@pytest.mark.parametrize("pool", [p for p in POOL_TYPES if p])
def test_global_pool_types(pool):
    model = timm.create_model("rednet26", global_pool=pool, num_classes=5)
    width = 4096 if pool == "catavgmax" else 2048
    assert model.num_features == 2048 and model.head_hidden_size == width and model.fc.in_features == width
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 5)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, width)
    assert set(model.state_dict()) == set(rednet.create_model("rednet26").state_dict())
    model.reset_classifier(3)  # keeps the pool type, as timm
    assert model.global_pool.pool_type == pool and model.fc.in_features == width


def test_global_pool_none_and_bad_values():
    model = timm.create_model("rednet26", global_pool="", num_classes=0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2048, 1, 1)
    with pytest.raises(ValueError, match=r"global_pool must be one of \('avg', 'max', 'avgmax', 'catavgmax', ''\)"):
        timm.create_model("rednet26", global_pool="mean")
    with pytest.raises(ValueError, match="num_classes=0"):
        timm.create_model("rednet26", global_pool="")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        rednet.create_model("rednet26").reset_classifier(10, "fast")
    assert sum(p.numel() for p in rednet.create_model("rednet26").parameters()) == PARAMS["rednet26"]


def test_reset_classifier_on_a_model_without_pool():
    # timm's test_model_default_cfgs: reset_classifier(n) on a global_pool='' model adds a classifier.
    model = timm.create_model("rednet26", num_classes=0, global_pool="")
    model.reset_classifier(5)
    assert model.global_pool.pool_type == "avg" and model.num_classes == 5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    model.reset_classifier(0, "")
    with pytest.raises(ValueError, match="num_classes=0"):
        model.reset_classifier(5, "")  # asked for explicitly, it is still an error
    assert model.global_pool.pool_type == "" and model.num_classes == 0  # and changed nothing


# ----------------------------------------------------------------------------------------
# device, dtype and in_chans, as timm's models take them


def test_device_and_dtype_arguments():
    model = timm.create_model("rednet26", device="meta", dtype=torch.float64)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert all(t.device.type == "meta" for t in tensors.values())
    assert {t.dtype for t in tensors.values()} == {torch.float64, torch.long}  # long: num_batches_tracked
    assert all(t.dtype == torch.float64 for t in model.parameters())
    cpu = rednet.create_model("rednet26", num_classes=4, dtype=torch.float64)
    assert cpu(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
    layer = rednet.layers.Involution(32, 3, device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in layer.parameters()} == {("meta", torch.bfloat16)}
    with pytest.raises(TypeError):
        timm.create_model("rednet26", device="meta", not_a_model_arg=1)


def test_new_head_on_the_models_device_and_dtype():
    model = rednet.create_model("rednet26").to(torch.float64)
    model.reset_classifier(3)
    assert model.fc.weight.dtype == torch.float64
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 3)
    model.to("meta")
    model.reset_classifier(2, "max")
    assert (model.fc.weight.device.type, model.fc.weight.dtype) == ("meta", torch.float64)


def test_in_chans_attribute():
    assert rednet.create_model("rednet26").in_chans == 3
    model = timm.create_model("rednet26", in_chans=1, num_classes=2)
    assert model.in_chans == 1 == model.stem[0].conv.in_channels
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2)


# ----------------------------------------------------------------------------------------
# Regularisation (timm recipe arguments)


def test_default_model_tree_and_state_dict_unchanged_by_regularisation():
    plain = rednet.create_model("rednet50")
    reg = rednet.create_model("rednet50", drop_path_rate=0.1, drop_block_rate=0.1, drop_rate=0.2)
    assert list(plain.state_dict()) == list(reg.state_dict())
    assert sum(p.numel() for p in reg.parameters()) == PARAMS["rednet50"]
    assert not any(isinstance(m, (DropPath, DropBlock2d)) for m in plain.modules())
    assert all(b.drop_path is None and b.drop_block is None for b in plain.modules() if isinstance(b, Bottleneck))


def test_drop_path_linear_decay_as_timm_resnet():
    model = rednet.create_model("rednet50", drop_path_rate=0.2)
    blocks = [b for s in STAGES for b in getattr(model, s)]
    n = len(blocks)
    assert blocks[0].drop_path is None  # rate 0 for the first block: no module
    for i, b in enumerate(blocks[1:], 1):
        assert isinstance(b.drop_path, DropPath) and b.drop_path.drop_prob == pytest.approx(0.2 * i / (n - 1))
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    ref = timm.create_model("resnet50", drop_path_rate=0.2)  # the rule we follow, block for block
    ref_blocks = [b for s in STAGES for b in getattr(ref, s)]
    assert [b.drop_path.drop_prob if b.drop_path is not None else 0.0 for b in blocks] == \
        [b.drop_path.drop_prob if b.drop_path is not None else 0.0 for b in ref_blocks]


def test_drop_block_in_stages_3_and_4_as_timm_resnet():
    model = rednet.create_model("rednet26", drop_block_rate=0.1)
    for stage, db in zip(STAGES, drop_blocks(0.1)):
        for b in getattr(model, stage):
            if db is None:
                assert b.drop_block is None
            else:
                want = db()
                assert isinstance(b.drop_block, DropBlock2d)
                assert (b.drop_block.drop_prob, b.drop_block.block_size, b.drop_block.gamma_scale) == \
                    (want.drop_prob, want.block_size, want.gamma_scale)


def test_regularisation_is_off_in_eval_and_active_in_train():
    model = live_eval_model("rednet26", num_classes=4, drop_path_rate=0.5, drop_block_rate=0.5, drop_rate=0.5)
    plain = live_eval_model("rednet26", num_classes=4)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        model.train()
        plain.train()
        torch.manual_seed(1)
        noisy = model(x)
        torch.manual_seed(1)
        assert not torch.allclose(noisy, plain(x))
    loss = model(x).logsumexp(1).sum()
    loss.backward()


def test_zero_init_last_through_create_model():
    on = timm.create_model("rednet26")
    off = timm.create_model("rednet26", zero_init_last=False)
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in on.modules() if isinstance(b, Bottleneck))
    assert all(bool((b.bn3.weight == 1).all()) for b in off.modules() if isinstance(b, Bottleneck))


def test_single_block_network_with_drop_path():
    # One block in total: timm's rule would divide by zero; the rate is then 0 for that block.
    model = RedNet((1, 0, 0, 0), num_classes=2, drop_path_rate=0.1)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_regularisation_keys_in_the_yaml_schema():
    from rednet.engine import ConfigError, load_config

    cfg = load_config(None, ["model.drop_path_rate=0.05", "model.drop_block_rate=0.1"])
    assert (cfg.model.drop_path_rate, cfg.model.drop_block_rate) == (0.05, 0.1)
    assert load_config(None).model.drop_path_rate == load_config(None).model.drop_block_rate == 0.0
    with pytest.raises(ConfigError, match="model.drop_path_rate"):
        load_config(None, ["model.drop_path_rate=1.0"])
    with pytest.raises(ConfigError, match="model.drop_block_rate"):
        load_config(None, ["model.drop_block_rate=-0.1"])


def test_regularisation_keys_reach_the_model():
    from rednet.engine import load_config
    from rednet.engine.builder import build_model

    cfg = load_config(None, ["model.name=rednet26", "model.drop_path_rate=0.1", "model.drop_block_rate=0.1"])
    model = build_model(cfg)
    assert model.layer4[0].drop_path is not None and model.layer4[0].drop_path.drop_prob > 0
    assert model.layer3[0].drop_block is not None
    # A timm model that takes no drop_block_rate still builds when the key is left at 0.
    assert build_model(load_config(None, ["model.name=vit_tiny_patch16_224", "model.num_classes=2",
                                          "model.drop_path_rate=0.1"])) is not None
