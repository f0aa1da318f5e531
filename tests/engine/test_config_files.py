"""Config files (rednet.engine.config_files): YAML read strictly and within bounds, the bundled configs by
name from any directory (and in the wheel), ``base:`` files merged. A bad file is exit 2 from the tools with
one ``error:`` line that says what to fix.

Most cases run the tool in-process (``main(argv)``) and stop before any training step.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rednet.engine import ConfigError, config_to_dict, load_config

from ..helpers import CONFIGS, ROOT, fails_cleanly, load_tool, one_error

# --- the config file --------------------------------------------------------------------


@pytest.mark.parametrize("content, pattern", [
    (b"model:\n  name: [rednet26\n", r"bad\.yaml is not valid YAML: line 3, column 1: expected ',' or ']'"),
    (b"model:\n  name: r\xe9dnet26\n", r"bad\.yaml is not UTF-8 text \(byte 0xe9 at line 2\)"),
    (b"train:\n  epochs: 1\nmodel:\n  name: resnet18\ntrain:\n  epochs: 2\n",
     r"bad\.yaml: duplicate key 'train' at line 5 \(first given at line 1\)"),
    (b"optim:\n  lr: 0.1\n  momentum: 0.8\n  lr: 0.2\n", r"duplicate key 'lr' at line 4 \(first given at line 2\)"),
], ids=["yaml-syntax", "not-utf8", "duplicate-section", "duplicate-key"])
def test_bad_config_file(tmp_path, capsys, content, pattern):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    fails_cleanly(capsys, "train", ["--config", str(bad), "--print-config"], pattern)


def test_yaml_merge_keys_are_not_duplicates(tmp_path, capsys):
    import yaml

    ok = tmp_path / "ok.yaml"
    ok.write_text("optim:\n  <<: {lr: 0.1, momentum: 0.8}\n  lr: 0.2\n")  # the merged lr gives way, as YAML says
    assert load_tool("train").main(["--config", str(ok), "--print-config"]) == 0
    optim = yaml.safe_load(capsys.readouterr().out)["optim"]
    assert (optim["lr"], optim["momentum"]) == (0.2, 0.8)


def test_duplicate_key_in_a_set_mapping(capsys):
    fails_cleanly(capsys, "train", ["--config", "digits.yaml", "--set", "model.kwargs={a: 1, a: 2}",
                                     "--print-config"], r"--set model\.kwargs: duplicate key 'a'")


# --- issue 16, item 13: YAML that would build too much, or too deep ---------------------


def _alias_bomb() -> str:
    """A "billion laughs" under model.kwargs: under 600 bytes that stand for 9**9 strings."""
    lines = ["model:", "  name: rednet26", "  kwargs:", '    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", '
             '"lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"    {name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_at_once_in_a_little_memory(tmp_path):
    import time
    import tracemalloc

    from rednet.engine import ConfigError, load_config

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    assert bomb.stat().st_size < 600
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=r"bomb\.yaml: line \d+: this value holds more than 100,000 values"):
            load_config(bomb)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5 and peak < 20 * 2**20, (elapsed, peak)


def test_yaml_alias_bomb_through_the_tool_is_exit_2(tmp_path):
    """The tool in a process of its own, with a memory cap: before the fix it grew until memory ran out."""
    import resource
    import subprocess
    import sys

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(bomb), "--print-config"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120, preexec_fn=cap_memory)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    assert "holds more than 100,000 values with its aliases expanded" in errors[0]


def test_base_chain_too_long_is_exit_2(tmp_path, capsys):
    for i in range(1500):  # each file builds on the next
        (tmp_path / f"c{i}.yaml").write_text(f"base: c{i + 1}.yaml\n" if i < 1499 else "model:\n  name: rednet26\n")
    fails_cleanly(capsys, "train", ["--config", str(tmp_path / "c0.yaml"), "--print-config"],
                   r"c0\.yaml: its base files nest more than 32 deep \(base file 32, .*c32\.yaml")
    # 32 base files are allowed.
    assert load_tool("train").main(["--config", str(tmp_path / "c1467.yaml"), "--print-config"]) == 0
    assert "rednet26" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["[" * 3000 + "]" * 3000, "{a: " * 3000 + "}" * 3000], ids=["lists", "mappings"])
def test_set_value_nested_too_deep_is_exit_2(capsys, value):
    fails_cleanly(capsys, "train", ["--config", "digits.yaml", "--set", f"model.kwargs={value}", "--print-config"],
                   r"--set model\.kwargs: line 1: values nested more than 32 levels deep")


@pytest.mark.parametrize("text, pattern", [
    ("model:\n  kwargs:\n    a: &a [1, *a]\n", r"line 3: an alias refers to the value that contains it"),
    # Each alias adds a level once expanded, though the text itself is flat.
    ("model:\n  kwargs:\n" + "".join(f"    k{i}: &k{i} [{'*k' + str(i - 1) if i else 1}]\n" for i in range(40)),
     r"values nested more than 32 levels deep with aliases expanded"),
], ids=["recursive", "deep-through-aliases"])
def test_yaml_aliases_that_recurse_or_nest_too_deep(tmp_path, capsys, text, pattern):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    fails_cleanly(capsys, "train", ["--config", str(bad), "--print-config"], pattern)


def test_yaml_anchors_within_bounds_still_work(tmp_path, capsys):
    import yaml

    ok = tmp_path / "ok.yaml"
    ok.write_text("optim: &o\n  lr: 0.1\n  momentum: 0.8\nmodel:\n  kwargs:\n    a: &a [1, 2]\n    b: [*a, *a]\n"
                  "    o:\n      <<: *o\n      lr: 0.2\n")
    assert load_tool("train").main(["--config", str(ok), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["kwargs"] == {"a": [1, 2], "b": [[1, 2], [1, 2]], "o": {"lr": 0.2, "momentum": 0.8}}
    assert printed["optim"]["lr"] == 0.1


# --- bundled configs by name ----------------------------------------------------------------------


BUNDLED = ["digits", "imagenet_recipe", "rednet26", "rednet38", "rednet50", "rednet101", "rednet152"]


@pytest.mark.parametrize("name", ["rednet50", "rednet50.yaml"])
def test_a_bundled_config_by_name_from_any_directory(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)  # not the checkout: the name must not depend on where the command runs
    assert load_tool("train").main(["--config", name, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    # rednet50.yaml's own key, and one its base (imagenet_recipe.yaml, found next to it) sets.
    assert printed["model"]["name"] == "rednet50" and printed["optim"]["base_lr"] == 0.8
    assert not list(tmp_path.iterdir())


def test_an_existing_path_wins_over_a_bundled_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("rednet50.yaml").write_text("model:\n  name: resnet18\n")
    assert load_tool("train").main(["--config", "rednet50.yaml", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["name"] == "resnet18"


def test_a_users_file_can_build_on_a_bundled_config(tmp_path, capsys):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: rednet26.yaml\noptim:\n  base_lr: 0.4\n")
    assert load_tool("train").main(["--config", str(mine), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["model"]["name"], printed["optim"]["base_lr"], printed["train"]["epochs"]) == ("rednet26", 0.4, 130)


@pytest.mark.parametrize("tool", ["train", "eval"])
def test_list_configs(capsys, tool):
    assert load_tool(tool).main(["--list-configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == BUNDLED  # rednet26 before rednet101
    listed = dict(line.split(None, 1) for line in lines)
    assert listed["rednet50"] == "RedNet-50 on ImageNet with the paper's recipe (imagenet_recipe.yaml)."
    assert listed["digits"].startswith("The `make train` demo")


@pytest.mark.parametrize("tool, argv", [("train", ["--print-config"]), ("eval", ["--pretrained"])])
def test_an_unknown_bare_name_lists_the_bundled_ones(capsys, tool, argv):
    assert load_tool(tool).main(["--config", "rednet5", *argv]) == 2
    line = one_error(capsys)
    assert "config file rednet5 does not exist, nor is it a bundled config; did you mean 'rednet50'?" in line
    assert f"(bundled: {', '.join(BUNDLED)})" in line


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_the_configs_folder_path_works_from_any_directory(tmp_path, monkeypatch, capsys, where):
    # From the checkout's root it is a file that exists; from anywhere else it names the bundled config.
    monkeypatch.chdir(ROOT if where == "checkout" else tmp_path)
    assert load_tool("train").main(["--config", "configs/rednet50.yaml", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["name"] == "rednet50" and printed["optim"]["base_lr"] == 0.8


def test_another_folder_says_what_to_give_instead(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert load_tool("train").main(["--config", "recipes/rednet50.yaml", "--print-config"]) == 2
    assert re.search(r"recipes/rednet50\.yaml does not exist; for the bundled one, give just its name: rednet50$",
                     one_error(capsys))


# Run by the interpreter with only an installed wheel on its path, in a folder outside the checkout:
# the bundled configs by each spelling, and a user's file built on one.
_FROM_THE_WHEEL = """
import contextlib, io, json, sys
from pathlib import Path
import rednet.engine.config_files as config_files
import rednet.tools.train as train
site = Path(sys.argv[1])
assert Path(config_files.__file__).is_relative_to(site), config_files.__file__
assert Path(train.__file__).is_relative_to(site), train.__file__
assert config_files.BUNDLED_CONFIG_DIR == site / "rednet" / "configs", config_files.BUNDLED_CONFIG_DIR
results = {}
for argv in (["--list-configs"], *(["--config", name, "--print-config"] for name in
             ("rednet50", "rednet50.yaml", "configs/rednet50.yaml", "mine.yaml"))):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = train.main(argv)
    results[argv[1] if len(argv) > 1 else argv[0]] = [rc, out.getvalue()]
print(json.dumps(results))
"""


@pytest.mark.slow
def test_the_bundled_configs_ship_in_the_wheel(wheel, installed, tmp_path):
    """configs/ is the one copy; a built wheel holds it as rednet/configs next to every module of rednet/,
    and the train command, installed from that wheel alone, finds the configs from another directory."""
    import zipfile

    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(BUNDLED)
    assert not (ROOT / "rednet" / "configs").exists()
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"rednet/configs/{n}.yaml" for n in BUNDLED} <= names, sorted(names)
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rednet").rglob("*")
               if p.suffix in (".py", ".cu", ".cpp", ".h")}
    assert sources <= names, sorted(sources - names)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.yaml").write_text("base: imagenet_recipe.yaml\nmodel:\n  name: rednet26\n")
    proc = subprocess.run([sys.executable, "-c", _FROM_THE_WHEEL, str(installed)], cwd=elsewhere,
                          env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    rc, listed = results.pop("--list-configs")
    assert rc == 0 and [line.split()[0] for line in listed.splitlines()] == BUNDLED
    for name, (rc, printed) in results.items():
        printed = yaml.safe_load(printed)
        assert rc == 0 and printed["optim"]["base_lr"] == 0.8, name
        assert printed["model"]["name"] == ("rednet26" if name == "mine.yaml" else "rednet50"), name


# --- base files -----------------------------------------------------------------------------------


def test_print_config_shows_the_base_file_merged(capsys):
    import yaml

    assert load_tool("train").main(["--config", "rednet50.yaml", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "base" not in printed and printed["model"]["name"] == "rednet50"
    assert printed["optim"]["base_lr"] == 0.8 and printed["train"]["amp"] == "bf16"  # from imagenet_recipe.yaml


def test_paper_configs_resolve_to_the_recipe():
    from rednet.engine.builder import peak_lr

    for depth in (26, 38, 50, 101, 152):
        cfg = load_config(f"rednet{depth}.yaml")
        assert cfg.model.name == f"rednet{depth}"
        assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.9, 1e-4)
        assert (cfg.train.epochs, cfg.train.label_smoothing, cfg.optim.warmup_factor) == (130, 0.1, 0.25)
        assert (cfg.data.img_size, round(cfg.data.img_size / cfg.data.eval_crop_pct)) == (224, 256)
        assert peak_lr(cfg, world_size=64) == pytest.approx(0.8)  # 32 x 64 = 2048
        assert peak_lr(cfg, world_size=8) == pytest.approx(0.1)


# configs/rednet50.yaml as it was before the recipe moved into configs/imagenet_recipe.yaml
# (git show e2c67ba:configs/rednet50.yaml, comments dropped); the other depths differed only
# in model.name and train.output.
_PAPER_CONFIG_BEFORE_BASE_FILES = """
model:
  name: rednet{depth}
  num_classes: 1000
data:
  dataset: imagenet
  root: null
  img_size: 224
  batch_size: 32
  workers: 8
  scale: [0.08, 1.0]
  ratio: [0.75, 1.3333333]
  hflip: 0.5
  color_jitter: null
  auto_augment: null
  reprob: 0.0
  interpolation: bilinear
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
  eval_crop_pct: 0.875
optim:
  name: sgd
  lr: null
  base_lr: 0.8
  base_batch_size: 2048
  momentum: 0.9
  weight_decay: 1.0e-4
  decay_bn_and_bias: true
  warmup_epochs: 5
  warmup_factor: 0.25
  min_lr_factor: 0.0
train:
  epochs: 130
  amp: bf16
  channels_last: false
  sync_bn: false
  label_smoothing: 0.1
  ema: false
  val_every: 1
  log_every: 50
  ckpt_every_iters: 2000
  keep_last: 3
  output: runs/rednet{depth}
"""


@pytest.mark.parametrize("depth", [26, 38, 50, 101, 152])
def test_paper_configs_resolve_as_before_base_files(tmp_path, depth):
    before = tmp_path / "before.yaml"
    before.write_text(_PAPER_CONFIG_BEFORE_BASE_FILES.format(depth=depth))
    # Changes on purpose since: the schema's data.workers became null (min(8, CPUs) per process),
    # which the old file spelled out as the old default, 8; the recipe trains channels_last
    # (the CUDA kernels' fast path, issue 18).
    now_default = ["data.workers=null", "train.channels_last=true"]
    assert config_to_dict(load_config(f"rednet{depth}.yaml")) == config_to_dict(load_config(before, now_default))


def test_config_base_file_is_merged_under_the_including_file(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "root.yaml").write_text("optim:\n  lr: 0.3\n  momentum: 0.5\ntrain:\n  epochs: 7\n")
    (tmp_path / "recipes" / "mid.yaml").write_text("base: root.yaml\noptim:\n  momentum: 0.8\ndata:\n")
    (tmp_path / "run.yaml").write_text("base: recipes/mid.yaml\nmodel:\n  name: resnet18\ntrain:\n")
    cfg = load_config(tmp_path / "run.yaml", ["optim.lr=0.2"])  # overrides come last
    assert cfg.model.name == "resnet18" and cfg.optim.lr == 0.2 and cfg.optim.momentum == 0.8
    assert cfg.train.epochs == 7 and cfg.data == load_config(None).data  # an empty section keeps the base's


def test_config_base_file_errors_name_the_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"base file .*missing\.yaml does not exist"):
        load_config(f)
    f.write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"'base' expects a file name"):
        load_config(f)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    f.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(f)
    f.write_text("base: run.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(f)
