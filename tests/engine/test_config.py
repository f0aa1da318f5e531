"""The config schema (rednet.engine.config): unknown keys name the nearest, values are checked (with
what to fix) before anything is read or written, overrides keep their types; and the same through
tools/train.py, exit 2 with one line."""
from __future__ import annotations

import pytest
import torch

from rednet.engine import ConfigError, config_to_dict, load_config

from ..helpers import CONFIGS, fails_cleanly, load_tool, train_argv

# --- keys and values ------------------------------------------------------------------------------


def test_config_unknown_keys_name_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'train\.lr'.*did you mean 'optim\.lr'"):
        load_config(None, ["train.lr=0.1"])
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"'data\.batch_sise'.*'data\.batch_size'"):
        load_config(f)
    f.write_text("trian:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=r"'trian'.*'train'"):
        load_config(f)


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=abc", r"'data\.batch_size' expects an integer, got 'abc'"),
    ("data.batch_size=0", r"'data\.batch_size' expects an integer >= 1, got 0"),
    ("train.amp=fp8", r"'train\.amp' expects one of 'none', 'bf16', 'fp16'"),
    ("data.scale=[0.5]", r"'data\.scale' expects a list of 2 values"),
    ("train.deterministic=1", r"'train\.deterministic' expects true or false"),
    ("train.eval_ema=true", r"'train\.eval_ema' expects false unless train\.ema is true"),
    ("optim.lr=-1", r"'optim\.lr' expects null or a number > 0"),
    ("model.kwargs=3", r"'model\.kwargs' expects a mapping"),
])
def test_config_wrong_values_name_key_and_expectation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("optim.warmup_epochs=.inf", r"'optim\.warmup_epochs' expects a finite number, got inf"),
    ("optim.base_lr=.inf", r"'optim\.base_lr' expects a finite number"),
    ("optim.weight_decay=.nan", r"'optim\.weight_decay' expects a finite number, got nan"),
    ("data.scale=[0.5, .inf]", r"'data\.scale' expects finite numbers"),
    ("data.mean=[0.5, .inf, 0.5]", r"'data\.mean' expects finite numbers"),
    ("data.color_jitter=-.inf", r"'data\.color_jitter' expects a finite number"),
    ("train.seed=4294967296", r"'train\.seed' expects an integer in \[0, 2\*\*32\)"),
    ("train.seed=-1", r"'train\.seed' expects an integer in \[0, 2\*\*32\)"),
    ("data.split_seed=4294967296", r"'data\.split_seed' expects an integer in \[0, 2\*\*32\)"),
    ("train.cpu_threads=1025", r"'train\.cpu_threads' expects null or an integer in \[1, 1024\]"),
])
def test_config_values_that_would_fail_later(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_config_bounds_take_their_edges():
    cfg = load_config(None, ["train.seed=4294967295", "data.split_seed=4294967295", "train.cpu_threads=1024",
                             "train.cutmix=1.0", "data.batch_size=2"])
    assert (cfg.train.seed, cfg.data.split_seed, cfg.train.cpu_threads) == (2**32 - 1, 2**32 - 1, 1024)


def test_config_overrides_types_and_roundtrip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  name: resnet18\noptim:\n  lr: 0.5\n")
    cfg = load_config(f, ["optim.lr=0.1", "data.scale=[0.5, 1]", "optim.clip_grad=null", "train.ema=true",
                          "model.kwargs={drop_path_rate: 0.1}", "data.root=/x=y"])
    assert cfg.model.name == "resnet18" and cfg.optim.lr == 0.1 and cfg.data.scale == (0.5, 1.0)
    assert cfg.train.ema is True and cfg.model.kwargs == {"drop_path_rate": 0.1} and cfg.data.root == "/x=y"
    assert isinstance(cfg.optim.weight_decay, float)
    from rednet.engine.config_data import config_from_dict

    assert config_from_dict(config_to_dict(cfg)) == cfg


# --- through the train command --------------------------------------------------------------------


def test_print_config_and_config_errors(capsys):
    train = load_tool("train")
    assert train.main(["--config", "digits.yaml", "--set", "optim.lr=0.2", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "name: rednet26" in out and "lr: 0.2" in out
    assert train.main(["--config", "digits.yaml", "--set", "optim.lrr=0.2"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


def test_command_line_paths_are_strings_not_yaml(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)  # nothing may be created in the checkout
    config = str(CONFIGS / "digits.yaml")
    assert load_tool("train").main(["--config", config, "--output", "2024", "--data", "null", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["output"] == "2024" and printed["data"]["root"] == "null"


@pytest.mark.parametrize("item, pattern", [
    ("model.name=rednet5", r"model\.name 'rednet5' is not a registered model; did you mean 'rednet50'"),
    ("optim.name=sgdd", r"optim\.name 'sgdd' is not a timm optimizer; did you mean 'sgd'"),
    ("model.kwargs={foo: 1}", r"model\.kwargs \{'foo': 1\} do not fit resnet10t .*unexpected keyword argument 'foo'"),
    ("data.batch_size=64", r"the training set has 8 images, fewer than one batch of 64; lower data\.batch_size"),
], ids=["model-name", "optimizer", "model-kwargs", "batch-over-dataset"])
def test_bad_config_values(tmp_path, capsys, item, pattern):
    fails_cleanly(capsys, "train", train_argv(tmp_path / "run", item), pattern)


# Issue 16, item 14: values that passed validation and failed once training had started (an
# OverflowError computing steps or crops, an overflowing seed or thread count, timm's mixup, a
# FileNotFoundError from timm): now each is refused before anything is read or written.
@pytest.mark.parametrize("items, pattern", [
    (["optim.warmup_epochs=.inf"], r"'optim\.warmup_epochs' expects a finite number, got inf"),
    (["data.ratio=[0.75, .inf]"], r"'data\.ratio' expects finite numbers, got \(0\.75, inf\)"),
    ([f"train.seed={2**70}"], r"'train\.seed' expects an integer in \[0, 2\*\*32\), got 1180591620717411303424"),
    (["train.cpu_threads=100000000000"], r"'train\.cpu_threads' expects null or an integer in \[1, 1024\]"),
    (["train.mixup=0.2", "data.batch_size=3"], r"'data\.batch_size' expects an even number when train\.mixup"),
    (["model.kwargs={checkpoint_path: /nonexistent/w.pth}"],
     r"model\.kwargs\.checkpoint_path '/nonexistent/w\.pth' does not exist"),
], ids=["warmup-inf", "ratio-inf", "seed-2**70", "cpu-threads", "mixup-odd-batch", "checkpoint-path"])
def test_values_that_would_fail_once_training_started(tmp_path, capsys, items, pattern):
    fails_cleanly(capsys, "train", train_argv(tmp_path / "run", *items), pattern)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("tool", ["train", "eval"])
def test_cuda_requested_without_cuda(tmp_path, capsys, tool):
    argv = train_argv(tmp_path / "run", "train.device=cuda")
    if tool == "eval":
        argv = ["--config", "digits.yaml", *argv[4:]]
    fails_cleanly(capsys, tool, argv, r"train\.device is 'cuda' but torch sees no CUDA device")
    assert not (tmp_path / "run").exists()


# --- precision on a CPU ---------------------------------------------------------------------------


def test_the_recipes_amp_applies_on_cuda_and_on_a_cpu_only_when_asked():
    from rednet.engine import load_config
    from rednet.engine.builder import autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # only the device type is read
    recipe = load_config("rednet26")
    assert (recipe.train.amp, recipe.train.amp_on_cpu) == ("bf16", False)
    assert autocast_dtype(recipe, cuda) == torch.bfloat16 and autocast_dtype(recipe, cpu) is None
    # train.amp named on the command line (--set, eval's --amp) is a request for this run, CPU included...
    asked = load_config("rednet26", ["train.amp=bf16"])
    assert asked.train.amp_on_cpu and autocast_dtype(asked, cpu) == torch.bfloat16
    # ...unless the same command line says otherwise; and a file can ask for it by itself.
    assert autocast_dtype(load_config("rednet26", ["train.amp=fp16", "train.amp_on_cpu=false"]), cpu) is None
    assert autocast_dtype(load_config("rednet26", ["train.amp_on_cpu=true"]), cpu) == torch.bfloat16
