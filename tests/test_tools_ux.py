"""tools/train.py and tools/eval.py used as a timm user would: bundled configs by name, an eval transform
that follows the command line, the precision and device a run uses, results that say what was scored."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from rednet.ops import can_use_native_kernel

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
                     _one_error(capsys))


# Run by the interpreter with only an installed wheel on its path, in a folder outside the checkout:
# the bundled configs by each spelling, and a user's file built on one.
_FROM_THE_WHEEL = """
import contextlib, importlib.util, io, json, sys
from pathlib import Path
import rednet.engine.config_files as config_files
site, tool = Path(sys.argv[1]), sys.argv[2]
assert Path(config_files.__file__).is_relative_to(site), config_files.__file__
assert config_files.BUNDLED_CONFIG_DIR == site / "rednet" / "configs", config_files.BUNDLED_CONFIG_DIR
spec = importlib.util.spec_from_file_location("train_tool", tool)
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
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
def test_the_bundled_configs_ship_in_the_wheel(tmp_path):
    """configs/ is the one copy; a built wheel holds it as rednet/configs next to every module of rednet/,
    and the tool, installed from that wheel alone, finds the configs from another directory."""
    import shutil
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools", minversion="68")  # the build backend pyproject.toml names
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(BUNDLED)
    assert not (ROOT / "rednet" / "configs").exists()
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and rednet.egg-info/ there
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("rednet", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "dist")],
                   check=True, env=env, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("rednet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"rednet/configs/{n}.yaml" for n in BUNDLED} <= names, sorted(names)
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rednet").rglob("*")
               if p.suffix in (".py", ".cu", ".cpp")}
    assert sources <= names, sorted(sources - names)

    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, env=env,
                   capture_output=True)
    elsewhere.mkdir()
    (elsewhere / "mine.yaml").write_text("base: imagenet_recipe.yaml\nmodel:\n  name: rednet26\n")
    proc = subprocess.run([sys.executable, "-c", _FROM_THE_WHEEL, str(site), str(ROOT / "tools" / "train.py")],
                          cwd=elsewhere, env={**env, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    rc, listed = results.pop("--list-configs")
    assert rc == 0 and [line.split()[0] for line in listed.splitlines()] == BUNDLED
    for name, (rc, printed) in results.items():
        printed = yaml.safe_load(printed)
        assert rc == 0 and printed["optim"]["base_lr"] == 0.8, name
        assert printed["model"]["name"] == ("rednet26" if name == "mine.yaml" else "rednet50"), name


# --- evaluating a plain ImageFolder -------------------------------------------------------


@pytest.fixture(scope="module")
def folder_and_weights(tmp_path_factory):
    """``val/{a,b}/*.png`` (40x50 RGB) and a weights file of timm's test_resnet (pretrained config: 160 px,
    crop_pct 0.95, mean/std 0.5), the smallest timm model with a full pretrained config."""
    import numpy as np
    from PIL import Image

    import rednet

    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        folder = root / "data" / "val" / c
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    torch.save(rednet.create_model("test_resnet").state_dict(), root / "w.pth")
    return root / "data", root / "w.pth"


def _eval_argv(folder_and_weights, json_path, *extra):
    data, weights = folder_and_weights
    return ["--model", "test_resnet", "--pretrained", str(weights), "--data", str(data), "--batch-size", "6",
            "--json", str(json_path), *extra]


@pytest.fixture
def loaders(monkeypatch):
    """The evaluation loaders the tool builds, recorded as it builds them."""
    import rednet.engine.evaluation

    built = []
    real = rednet.engine.evaluation.build_eval_loader

    def recording(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(rednet.engine.evaluation, "build_eval_loader", recording)
    return built


def test_eval_results_say_which_folder_and_split(folder_and_weights, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert load_tool("eval").main(_eval_argv(folder_and_weights, out, "--workers", "0")) == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "imagenet" and result["split"] == "val" and result["count"] == 6
    assert result["data_root"] == str(folder_and_weights[0].resolve())


def test_default_workers_are_capped_at_the_cpus_this_process_may_use(monkeypatch):
    from rednet.data import build_eval_loader, default_workers
    from rednet.engine import load_config

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_workers() == 64 and default_workers(most=8) == 8  # no fixed cap of 8 any more (issue 17)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # a node of 8 GPUs: its CPUs shared by 8 processes
    assert default_workers() == 8
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: four processes share the two CPUs
    assert default_workers() == 1
    # Only the default is capped: a value in a file or on the command line is the user's.
    assert load_config("rednet50").data.workers is None and load_config("digits").data.workers == 0
    assert load_config(None, ["data.workers=12"]).data.workers == 12
    with pytest.warns(UserWarning, match="12 worker processes"):  # torch's warning: the user's choice stands
        assert build_eval_loader(list(range(4)), 2, workers=12).num_workers == 12


def test_eval_on_a_small_machine_uses_no_more_workers_than_cpus(folder_and_weights, tmp_path, monkeypatch, loaders):
    import warnings

    # One CPU, as torch's DataLoader sees it too: 8 workers made it warn on every evaluation.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_tool("eval").main(_eval_argv(folder_and_weights, tmp_path / "r.json")) == 0
    assert [loader.num_workers for loader in loaders] == [1]
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]


# --- precision on a CPU -------------------------------------------------------------------


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


def _recipe_config(tmp_path: Path, folder_and_weights) -> Path:
    """A user's config on top of the bundled RedNet-26 recipe (train.amp: bf16) that scores the test weights."""
    data, weights = folder_and_weights
    path = tmp_path / "mine.yaml"
    path.write_text(f"base: rednet26\nmodel:\n  name: test_resnet\n  pretrained: {weights}\n"
                    f"data:\n  root: {data}\n  workers: 0\n  eval_batch_size: 6\n")
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule: needs a machine without CUDA")
def test_eval_on_a_cpu_scores_fp32_unless_amp_is_asked_for(folder_and_weights, tmp_path, capsys):
    config = _recipe_config(tmp_path, folder_and_weights)
    results = {}
    for name, extra in {"default": [], "none": ["--amp", "none"], "bf16": ["--amp", "bf16"]}.items():
        out = tmp_path / f"{name}.json"
        assert load_tool("eval").main(["--config", str(config), "--json", str(out), *extra]) == 0
        results[name] = json.loads(out.read_text())
    log = capsys.readouterr().out
    # The recipe's bf16 is a GPU setting: on a CPU the default scores exactly what fp32 scores.
    assert [results["default"][k] for k in ("loss", "top1")] == [results["none"][k] for k in ("loss", "top1")]
    assert results["bf16"]["loss"] != results["none"]["loss"]
    assert results["default"]["execution"]["precision"].startswith("fp32 (train.amp bf16 applies on CUDA")
    assert results["bf16"]["execution"]["precision"] == "bf16 autocast"
    execution = [line for line in log.splitlines() if "execution:" in line]
    assert len(execution) == 3 and "device cpu (" in execution[0] and "memory format contiguous" in execution[0]
    assert "involution backend none (the model has no involution layers)" in execution[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule: needs a machine without CUDA")
def test_train_logs_how_it_runs_and_keeps_the_recipes_amp_off_a_cpu(tmp_path, capsys):
    from rednet.engine.checkpoint import read_checkpoint

    config = tmp_path / "mine.yaml"  # the recipe (train.amp: bf16, optim sgd) on a few synthetic images
    config.write_text("base: rednet26\nmodel:\n  num_classes: 4\ndata:\n  dataset: synthetic\n  img_size: 16\n"
                      "  batch_size: 4\n  workers: 0\n  synthetic_train_size: 8\n  synthetic_val_size: 4\n"
                      "optim:\n  lr: 0.01\ntrain:\n  epochs: 1\n  max_iters_per_epoch: 1\n  amp: fp16\n")
    assert load_tool("train").main(["--config", str(config), "--output", str(tmp_path / "run")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "execution:" in line]
    assert len(lines) == 1, lines
    assert "precision fp32 (train.amp fp16 applies on CUDA" in lines[0] and "device cpu" in lines[0]
    assert "memory format contiguous" in lines[0]
    # RedNet-26 has involutions: on a CPU, the native kernel where it builds.
    native, why = can_use_native_kernel(torch.empty(0))
    assert (f"involution backend {'native' if native else f'reference ({why}'}") in lines[0]
    assert read_checkpoint(tmp_path / "run" / "last.pt")["scaler"] is None  # no fp16, so no loss scaling


# --- the eval transform -------------------------------------------------------------------

PRETRAINED = "the pretrained config"  # test_resnet's: 160 px, crop_pct 0.95, bilinear, mean/std 0.5


@pytest.mark.parametrize("extra, size, crop_pct, interpolation, source", [
    ([], 160, 0.95, "bilinear", PRETRAINED),
    (["--set", "data.img_size=32"], 32, 0.95, "bilinear", f"{PRETRAINED}, data.img_size from the command line"),
    (["--img-size", "48", "--crop-pct", "1.0", "--interpolation", "bicubic"], 48, 1.0, "bicubic",
     f"{PRETRAINED}, data.img_size, data.eval_crop_pct, data.interpolation from the command line"),
], ids=["pretrained-config", "set-img-size", "flags"])
def test_eval_transform_the_command_line_gives_wins_over_the_pretrained_config(
        folder_and_weights, tmp_path, capsys, loaders, extra, size, crop_pct, interpolation, source):
    out = tmp_path / "r.json"
    assert load_tool("eval").main(_eval_argv(folder_and_weights, out, "--workers", "0", *extra)) == 0
    assert loaders[0].dataset[0][0].shape == (3, size, size)  # what the model was fed
    transform = json.loads(out.read_text())["transform"]
    assert transform == {"input_size": [3, size, size], "crop_pct": crop_pct, "interpolation": interpolation,
                         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_mode": "center", "source": source}
    lines = [line for line in capsys.readouterr().out.splitlines() if "eval transform" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"eval transform from {source}: input 3x{size}x{size}, crop_pct {crop_pct:g}, crop_mode center, "
        f"interpolation {interpolation}, mean 0.5/0.5/0.5, std 0.5/0.5/0.5")


def test_eval_transform_of_a_run_config_follows_its_overrides(folder_and_weights, tmp_path, loaders):
    config = _recipe_config(tmp_path, folder_and_weights)  # the recipe: 224 px, crop_pct 0.875, ImageNet mean
    out = tmp_path / "r.json"
    assert load_tool("eval").main(["--config", str(config), "--json", str(out), "--img-size", "32"]) == 0
    transform = json.loads(out.read_text())["transform"]
    assert (transform["input_size"], transform["crop_pct"], transform["source"]) == ([3, 32, 32], 0.875,
                                                                                     "the run config")
    assert transform["mean"] == pytest.approx([0.485, 0.456, 0.406]) and loaders[0].dataset[0][0].shape[-1] == 32


def test_eval_transform_flags_are_checked_like_the_config(folder_and_weights, tmp_path, capsys):
    assert load_tool("eval").main(_eval_argv(folder_and_weights, tmp_path / "r.json", "--crop-pct", "1.5")) == 2
    assert "'data.eval_crop_pct' expects a number in (0, 1], got 1.5" in _one_error(capsys)
