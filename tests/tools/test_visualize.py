"""Involution kernel capture (rednet.analysis) and tools/visualize.py end to end."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import rednet
from rednet.analysis.kernels import (
    KernelCapture,
    capture_kernel_sums,
    default_layer,
    involution_layers,
    resolve_layer,
    top_groups,
)
from rednet.analysis.plot import denormalize, load_image, plot_kernel_maps
from rednet.layers import Involution

from ..helpers import CONFIGS, DEPTHS, ROOT, load_tool

visualize = load_tool("visualize")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """rednet26 whose kernel-generation BatchNorms have non-trivial statistics.

    Fresh BNs (mean 0, var 1, weight 1, bias 0) are identities in eval mode, where a
    train/eval mix-up could hide. Only the involutions' own BNs are changed: involution
    multiplies activations by kernels made from them, so scaling every BN compounds
    into overflow over 26 layers.
    """
    g = torch.Generator().manual_seed(0)
    m = rednet.create_model("rednet26", num_classes=10)
    with torch.no_grad():
        for bn in (inv.conv1.bn for inv in involution_layers(m).values()):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return m.eval()


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_layer_names_and_default_for_every_model(name):
    with torch.device("meta"):  # names only: no memory, no init cost
        m = rednet.create_model(name)
    d = DEPTHS[name]
    expected = ["stem.1"] + [f"layer{s + 1}.{i}.conv2" for s in range(4) for i in range(d[s])]
    assert list(involution_layers(m)) == expected
    assert default_layer(m) == f"layer3.{d[2] - 1}.conv2"


def test_default_layer_without_stage3_falls_back_to_last():
    net = nn.Sequential(Involution(16, 3), nn.ReLU(), Involution(16, 3))
    assert default_layer(net) == "2"
    with pytest.raises(ValueError, match="no Involution"):
        default_layer(nn.Conv2d(3, 3, 1))


def test_resolve_unknown_layer_lists_valid_names(model):
    with pytest.raises(ValueError) as e:
        resolve_layer(model, "layer3.9.conv2")
    assert "layer3.9.conv2" in str(e.value) and "stem.1" in str(e.value) and "layer4.0.conv2" in str(e.value)


def test_captured_sums_match_recomputed_kernels(model):
    """Hook captures of every layer, in one pass, against generate_kernel on the hooked input."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference_out = model(x)
    layers = involution_layers(model)
    inputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0].clone()))
               for n, m in layers.items()]
    caps = {n: KernelCapture(m, keep_kernels=True) for n, m in layers.items()}
    try:
        for c in caps.values():
            c.__enter__()
        with torch.no_grad():
            out = model(x)
    finally:
        for c in caps.values():
            c.__exit__(None, None, None)
        for h in handles:
            h.remove()
    # The hooks observe only: the network's output is bit-identical.
    assert torch.isfinite(out).all() and torch.equal(out, reference_out)
    for name, layer in layers.items():
        cap = caps[name]
        assert len(cap.sums) == 1, name
        with torch.no_grad():
            kernel = layer.generate_kernel(inputs[name])  # (B, G, K, K, Ho, Wo)
        h = inputs[name].shape[-1]
        assert cap.sums[0].shape == (2, layer.groups, math.ceil(h / layer.stride), math.ceil(h / layer.stride))
        torch.testing.assert_close(cap.kernels[0], kernel, rtol=0, atol=0)
        torch.testing.assert_close(cap.sums[0], kernel.sum((2, 3)), rtol=1e-5, atol=1e-5)
        assert cap.sums[0].std() > 0, name  # a constant map would make the check vacuous
    # Leaving the context removes the hook.
    assert all(not m.conv2._forward_hooks for m in layers.values())


def test_capture_kernel_sums_uses_eval_mode_and_restores_it(model):
    x = torch.randn(1, 3, 64, 64)
    layer = resolve_layer(model, "layer2.0.conv2")
    with KernelCapture(layer) as cap, torch.no_grad():
        model.eval()(x)
    model.train()
    try:
        sums = capture_kernel_sums(model, x, "layer2.0.conv2")
        assert model.training
    finally:
        model.eval()
    # Train-mode BatchNorm would use batch statistics and give different kernels.
    torch.testing.assert_close(sums, cap.sums[0])
    assert sums.shape == (1, 8, 8, 8)
    assert capture_kernel_sums(model, x).shape == (1, 16, 4, 4)  # default: layer3.3.conv2


def test_top_groups_orders_by_spatial_variance():
    sums = torch.zeros(5, 4, 4)
    for g, scale in enumerate([0.1, 3.0, 0.0, 1.0, 2.0]):
        sums[g] = scale * torch.arange(16.0).view(4, 4) + 100.0 * g  # offsets must not matter
    assert top_groups(sums, 3) == [1, 4, 3]
    assert top_groups(sums, None) == top_groups(sums, 5) == top_groups(sums, 9) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        top_groups(sums, 0)
    with pytest.raises(ValueError):
        top_groups(sums[None], 2)


@pytest.mark.parametrize("groups, cols, rows", [(5, 6, 1), (16, 6, 3), (2, 3, 1)])
def test_plot_writes_png_of_expected_size(tmp_path, groups, cols, rows):
    dpi = 20  # 2.5 in panels -> 50 px; small keeps the test fast
    image = np.random.default_rng(0).random((32, 32, 3))
    sums = torch.randn(groups, 4, 4)
    out = plot_kernel_maps(image, sums, tmp_path / "sub" / "maps.png", "layerX", dpi=dpi)
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert png.size == (cols * 50, rows * 50 + 10)  # + 0.5 in of title
        pixels = np.asarray(png.convert("RGB")).astype(int)
    # The heat maps put colour over a grayscale image: some pixels must be far from gray.
    assert (pixels.max(2) - pixels.min(2)).max() > 100


def test_plot_draws_chosen_groups_only(tmp_path):
    out = plot_kernel_maps(np.zeros((8, 8, 3)), torch.randn(32, 2, 2), tmp_path / "m.png", "t", groups=[3, 1], dpi=20)
    with Image.open(out) as png:
        assert png.size == (3 * 50, 50 + 10)


def test_denormalize_inverts_normalisation():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    img = torch.rand(3, 5, 7)
    x = (img - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    out = denormalize(x, mean, std)
    assert out.shape == (5, 7, 3)
    np.testing.assert_allclose(out, img.permute(1, 2, 0).numpy(), atol=1e-6)
    assert denormalize(torch.zeros(1, 4, 4), (0.5,), (0.5,)).shape == (4, 4, 3)


def test_load_image(tmp_path):
    assert load_image(None).size == (512, 512)  # the bundled astronaut
    gray = tmp_path / "gray.png"
    Image.new("L", (9, 6), 128).save(gray)
    im = load_image(gray)
    assert im.mode == "RGB" and im.size == (9, 6)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    for bad in (tmp_path / "missing.png", text, truncated, tmp_path):
        with pytest.raises(ValueError, match="cannot read image " + str(bad)):
            load_image(bad)


# ---- tools/visualize.py ------------------------------------------------------


def _run_main(argv, capsys):
    rc = visualize.main(argv)
    return rc, capsys.readouterr()


def test_cli_end_to_end_default_image(tmp_path, capsys):
    out = tmp_path / "maps.png"
    rc, io = _run_main(["--model", "rednet26", "--img-size", "64", "--top", "4", "--dpi", "20",
                        "--output", str(out), "--json"], capsys)
    assert rc == 0
    result = json.loads(io.out)
    assert result["layer"] == "layer3.3.conv2" and result["groups"] == 16 and len(result["shown"]) == 4
    assert result["image"] == "skimage:astronaut" and result["image_size"] == [64, 64]
    assert result["map_size"] == [4, 4]
    assert "random weights" in io.err  # a random model is never passed off as trained
    with Image.open(out) as png:
        assert list(png.size) == result["png_size"] == [5 * 50, 50 + 10]


def test_cli_user_image_and_layer(tmp_path, capsys):
    img = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "stem.png"
    rc, io = _run_main(["--model", "rednet26", "--image", str(img), "--layer", "stem.1", "--img-size", "48",
                        "--dpi", "20", "--output", str(out), "--json"], capsys)
    assert rc == 0
    result = json.loads(io.out)
    assert result["layer"] == "stem.1" and result["groups"] == 2 and result["map_size"] == [24, 24]
    assert out.is_file()


@pytest.mark.parametrize("name", rednet.list_models())
def test_cli_every_registered_model(name, tmp_path, capsys):
    # stem.1 with a tiny crop: the capture stops after the layer, so even RedNet-152 is quick.
    rc, io = _run_main(["--model", name, "--layer", "stem.1", "--img-size", "32", "--dpi", "10",
                        "--output", str(tmp_path / "m.png"), "--json"], capsys)
    assert rc == 0 and json.loads(io.out)["map_size"] == [16, 16]


def test_capture_of_a_layer_outside_forward_is_an_error(model):
    model.extra = Involution(16, 3)  # registered, never called
    try:
        with pytest.raises(RuntimeError, match="not used"):
            capture_kernel_sums(model, torch.randn(1, 3, 32, 32), "extra")
    finally:
        del model.extra


def test_cli_layer_list(capsys):
    rc, io = _run_main(["--model", "rednet26", "--layer", "list", "--json"], capsys)
    assert rc == 0
    rows = json.loads(io.out)
    assert [r["name"] for r in rows][:2] == ["stem.1", "layer1.0.conv2"] and len(rows) == 9
    assert rows[-1] == dict(name="layer4.0.conv2", channels=512, groups=32, kernel_size=7, stride=2)
    rc, io = _run_main(["--model", "rednet26", "--layer", "list"], capsys)
    assert "layer3.3.conv2" in io.out and "groups=16" in io.out


@pytest.mark.parametrize("argv, message", [
    (["--model", "rednet26", "--layer", "layer5.0.conv2"], "unknown involution layer 'layer5.0.conv2'"),
    (["--model", "rednet26", "--image", "/no/such/photo.jpg"], "cannot read image /no/such/photo.jpg: no such file"),
    (["--model", "resnet50"], "unknown model 'resnet50'"),
    ([], "--model is required"),
    (["--model", "rednet26", "--output", "maps.jpg"], "must be a .png"),
    (["--model", "rednet26", "--cmap", "nope"], "unknown --cmap"),
    (["--model", "rednet26", "--device", "tpu9"], "bad --device"),
])
def test_cli_errors_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        visualize.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if "unknown involution layer" in message:
        assert "layer3.3.conv2" in err  # the valid names are listed


def test_cli_rejects_non_image_file(tmp_path, capsys):
    bad = tmp_path / "weights.png"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit):
        visualize.main(["--model", "rednet26", "--image", str(bad)])
    assert f"cannot read image {bad}" in capsys.readouterr().err


def test_cli_script_runs(tmp_path):
    """As users run it: a fresh interpreter, the script path, no test imports."""
    out = tmp_path / "k.png"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="")  # the tool must pick Agg itself
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "visualize.py"), "--model", "rednet26",
                           "--layer", "layer1.0.conv2", "--img-size", "32", "--dpi", "20", "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and out.is_file()


@pytest.mark.gpu
def test_capture_on_gpu_matches_cpu(model):
    x = torch.randn(2, 3, 64, 64)
    cpu = capture_kernel_sums(model, x, "layer3.3.conv2")
    gpu_model = rednet.create_model("rednet26", num_classes=10)
    gpu_model.load_state_dict(model.state_dict())
    gpu = capture_kernel_sums(gpu_model.cuda(), x.cuda(), "layer3.3.conv2")
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


# ---- checkpoints of the trainer ------------------------------------------------


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as tools/train.py writes it for the digits demo: 32 px, 10 classes, own mean/std."""
    from rednet.engine import config_to_dict
    from rednet.engine.builder import build_model
    from rednet.engine.checkpoint import save_checkpoint
    from rednet.engine.config import Config

    cfg = Config()
    cfg.model.name, cfg.model.num_classes = "rednet26", 10
    cfg.data.dataset, cfg.data.img_size, cfg.data.eval_crop_pct = "digits", 32, 1.0
    cfg.data.mean, cfg.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    model = build_model(cfg, pretrained=False)
    path = tmp_path_factory.mktemp("run") / "last.pt"
    save_checkpoint(dict(config=config_to_dict(cfg), model=model.state_dict(), ema=None), path)
    return path


def test_cli_checkpoint_uses_its_model_and_eval_transform(digits_checkpoint, tmp_path, capsys):
    out = tmp_path / "digits.png"
    rc, io = _run_main(["--checkpoint", str(digits_checkpoint), "--layer", "layer1.0.conv2", "--dpi", "20",
                        "--output", str(out), "--json"], capsys)
    assert rc == 0
    result = json.loads(io.out)
    assert result["model"] == "rednet26"
    # The run's 32 px, uncropped, with its own normalisation: not ImageNet's 224 / 0.875.
    assert result["image_size"] == [32, 32] and result["map_size"] == [8, 8]
    dc = result["data_config"]
    assert dc["input_size"] == [3, 32, 32] and dc["crop_pct"] == 1.0 and dc["mean"] == [0.5] * 3
    assert "random weights" not in io.err and out.is_file()


def test_cli_checkpoint_for_another_model_is_refused(digits_checkpoint, capsys):
    with pytest.raises(SystemExit):
        visualize.main(["--model", "rednet50", "--checkpoint", str(digits_checkpoint)])
    err = capsys.readouterr().err
    assert "holds a rednet26, not a rednet50" in err


def test_cli_corrupt_checkpoint_is_refused(tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit):
        visualize.main(["--checkpoint", str(bad), "--layer", "list"])
    assert f"cannot load checkpoint {bad}" in capsys.readouterr().err


def test_cli_on_a_checkpoint_written_by_tools_train(tmp_path, capsys):
    """The real trainer, one step of the digits demo's config on tiny synthetic data."""
    run = tmp_path / "run"
    sets = ["data.dataset=synthetic", "data.synthetic_train_size=4", "data.synthetic_val_size=4",
            "data.batch_size=4", "data.eval_batch_size=4", "train.epochs=1", "train.log_every=1"]
    argv = ["--config", str(CONFIGS / "digits.yaml"), "--output", str(run)]
    assert load_tool("train").main(argv + [a for kv in sets for a in ("--set", kv)]) == 0
    capsys.readouterr()
    out = tmp_path / "k.png"
    rc, io = _run_main(["--checkpoint", str(run / "last.pt"), "--output", str(out), "--dpi", "10", "--json"], capsys)
    assert rc == 0
    result = json.loads(io.out)
    from rednet.engine.checkpoint import read_checkpoint

    size = read_checkpoint(run / "last.pt")["config"]["data"]["img_size"]  # the demo's own crop, not 224
    side = math.ceil(size / 16)  # stage 3 sees the input at stride 16
    assert result["model"] == "rednet26" and result["layer"] == "layer3.3.conv2"
    assert result["image_size"] == [size, size] and result["map_size"] == [side, side]
    assert out.is_file()
    if side < 4:
        assert "maps are only" in io.err  # the user is pointed to an earlier layer


def test_visualize_writes_under_runs_by_default(tmp_path, monkeypatch, capsys):
    """The README's visualize command wrote kernels_<model>_<layer>.png into the current folder."""
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "rednet26", "--layer", "stem.1", "--img-size", "32", "--dpi", "10", "--device", "cpu"]
    assert load_tool("visualize").main(argv) == 0
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")] == [
        "runs/visualize/kernels_rednet26_stem.1.png"]
