"""tools/train.py and tools/eval.py used as a timm user would: bundled configs by name, an eval transform
that follows the command line, the precision and device a run uses, results that say what was scored."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from .helpers import CONFIGS, ROOT, load_tool

BUNDLED = ["digits", "imagenet_recipe", "rednet26", "rednet38", "rednet50", "rednet101", "rednet152"]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# --- bundled configs by name ---------------------------------------------------------------


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
    line = _one_error(capsys)
    assert "config file rednet5 does not exist, nor is it a bundled config; did you mean 'rednet50'?" in line
    assert f"(bundled: {', '.join(BUNDLED)})" in line


def test_the_old_configs_path_says_what_to_give_instead(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert load_tool("train").main(["--config", "configs/rednet50.yaml", "--print-config"]) == 2
    assert re.search(r"configs/rednet50\.yaml does not exist; for the bundled one, give just its name: rednet50$",
                     _one_error(capsys))


def test_the_bundled_configs_ship_in_the_package():
    # An installed wheel holds what package-data names; the configs must be among it, and no
    # reference may point at the old top-level configs/ folder.
    package_data = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    assert CONFIGS.parent == ROOT / "rednet" and re.search(r'^rednet = \[.*"configs/\*\.yaml"', package_data, re.M)
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(BUNDLED) and not (ROOT / "configs").exists()
    for name in ("Makefile", "README.md", "docker/Dockerfile", "tools/train.py", "tools/eval.py",
                 *(f"rednet/configs/{n}.yaml" for n in BUNDLED)):
        assert not re.search(r"(?<![\w/])configs/", (ROOT / name).read_text()), name
