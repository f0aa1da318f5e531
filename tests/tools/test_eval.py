"""tools/train.py and tools/eval.py used as a timm user would: bundled configs by name, an eval transform
that follows the command line, the precision and device a run uses, results that say what was scored."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from rednet.ops import can_use_native_kernel

from ..helpers import AS_NOBODY, CONFIGS, ROOT, load_tool, why_nobody_cannot_run

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
               if p.suffix in (".py", ".cu", ".cpp")}
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


# --- evaluating a plain ImageFolder -------------------------------------------------------


@pytest.fixture(scope="module")
def folder_and_weights(tmp_path_factory):
    """``val/{a,b}/*.png`` (40x50 RGB) and a weights file of timm's test_resnet (pretrained config: 160 px,
    crop_pct 0.95, mean/std 0.5), the smallest timm model with a full pretrained config, with a
    classifier of the folder's 2 classes."""
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
    torch.save(rednet.create_model("test_resnet", num_classes=2).state_dict(), root / "w.pth")
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
    # The recipe trains channels_last (the CUDA kernels' fast path); eval follows it.
    assert len(execution) == 3 and "device cpu (" in execution[0] and "memory format channels_last" in execution[0]
    assert "involution backend none (the model has no involution layers)" in execution[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule: needs a machine without CUDA")
def test_train_logs_how_it_runs_and_keeps_the_recipes_amp_off_a_cpu(tmp_path, capsys):
    from rednet.engine.checkpoint import read_checkpoint

    config = tmp_path / "mine.yaml"  # the recipe (train.amp: bf16, optim sgd) on a few synthetic images
    config.write_text("base: rednet26\nmodel:\n  num_classes: 4\ndata:\n  dataset: synthetic\n  img_size: 16\n"
                      "  batch_size: 4\n  workers: 0\n  synthetic_train_size: 8\n  synthetic_val_size: 4\n"
                      "optim:\n  lr: 0.01\ntrain:\n  epochs: 1\n  max_iters_per_epoch: 1\n  amp: fp16\n")
    assert load_tool("train").main(["--config", str(config), "--output", str(tmp_path / "run"), "--json",
                                    str(tmp_path / "final.json")]) == 0
    assert set(json.loads((tmp_path / "final.json").read_text())) >= {"top1", "best_top1", "epochs"}
    lines = [line for line in capsys.readouterr().out.splitlines() if "execution:" in line]
    assert len(lines) == 1, lines
    assert "precision fp32 (train.amp fp16 applies on CUDA" in lines[0] and "device cpu" in lines[0]
    assert "memory format channels_last" in lines[0]  # the recipe's
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


# --- the model's classes against the folder's -----------------------------------------------


def _val_folder(root: Path, classes, size: int = 20) -> Path:
    """``root/val/<class>/{0,1}.png``; returns ``root`` (what --data takes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / "val" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "val" / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    return _val_folder(tmp_path_factory.mktemp("three"), ("a", "b", "c"))


def _weights(path: Path, num_classes: int, answer: int | None = None, name: str = "rednet26") -> Path:
    """Weights of ``name`` with ``num_classes`` classes, saved as torch.save or save_weights by suffix; with
    ``answer``, a classifier that answers that class for every image (zero weights, one bias)."""
    import rednet
    from rednet.models import save_weights

    model = rednet.create_model(name, num_classes=num_classes)
    if answer is not None:
        with torch.no_grad():
            model.fc.weight.zero_()
            model.fc.bias.zero_()
            model.fc.bias[answer] = 5.0
    if path.suffix == ".safetensors":
        save_weights(model.state_dict(), path)
    else:
        torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("model, name", [("rednet26", "weights32.pth"), ("rednet26", "weights32.safetensors"),
                                         ("test_resnet", "weights32.pth")])
def test_the_readme_example_scores_the_weights_own_classifier(three_classes, tmp_path, capsys, model, name):
    """README's `--model rednet26 --pretrained weights32.pth --img-size 32 --crop-pct 1.0` with weights of a few
    classes scored a fresh 1000-class classifier instead of theirs: 0.00% top-1, exit 0 (a timm model: a
    traceback, its loader comparing the file's classifier with 1000 classes)."""
    weights = _weights(tmp_path / name, 3, answer=2, name=model)  # class c for every image: 2 of the 6 are right
    out = tmp_path / "r.json"
    argv = ["--model", model, "--pretrained", str(weights), "--data", str(three_classes), "--img-size", "32",
            "--crop-pct", "1.0", "--workers", "0", "--json", str(out)]
    assert load_tool("eval").main(argv) == 0
    result = json.loads(out.read_text())
    assert result["count"] == 6 and result["top1"] == pytest.approx(100 / 3)
    log = capsys.readouterr().out
    assert f"the classifier of {weights} has 3 classes: model.num_classes=3" in log
    assert "fresh initialisation" not in log


def test_num_classes_and_a_model_of_another_class_count(three_classes, tmp_path, capsys):
    evaluate = load_tool("eval")
    # No weights: the digits config's 10 classes on 3 folders were scored, exit 0.
    config = ["--config", "digits", "--data", str(three_classes), "--img-size", "16"]
    assert evaluate.main(config) == 2
    assert (f"the folder {three_classes / 'val'} has 3 classes but the model has 10 (model.num_classes): pass "
            "--num-classes 3 (or --set model.num_classes=3)") in _one_error(capsys)
    assert evaluate.main([*config, "--num-classes", "3"]) == 0
    plain = ["--model", "rednet26", "--data", str(three_classes), "--img-size", "16", "--workers", "0"]
    # 1000-class weights (ImageNet's count) on 3 folders: scored with no warning; now refused, subsets too.
    imagenet = _weights(tmp_path / "w1000.pth", 1000)
    capsys.readouterr()
    assert evaluate.main([*plain, "--pretrained", str(imagenet)]) == 2
    error = _one_error(capsys)
    assert f"has 3 classes but the model has 1000 (the classifier of {imagenet}): evaluate on data of the " \
           "model's 1000 classes" in error and "would need a mapping" in error
    # A count given wins over the weights': their classifier is dropped with a warning, and the folder decides.
    four = _weights(tmp_path / "w4.pth", 4)
    assert evaluate.main([*plain, "--pretrained", str(four), "--num-classes", "3"]) == 0
    assert "classifier has 4 classes, the model 3: fc was left at its fresh initialisation" in capsys.readouterr().out
    assert evaluate.main([*plain, "--pretrained", str(four), "--num-classes", "4"]) == 2
    assert "has 3 classes but the model has 4 (model.num_classes): pass --num-classes 3" in _one_error(capsys)


# --- threads --------------------------------------------------------------------------------


def test_eval_runs_on_the_threads_asked_for(folder_and_weights, tmp_path, capsys, monkeypatch):
    import rednet.engine.evaluation as evaluation

    before = torch.get_num_threads()
    wanted = before + 1  # differs from what the process runs on, whatever the machine
    seen = []
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    for extra in (["--threads", str(wanted)], ["--set", f"train.cpu_threads={wanted}"]):
        argv = _eval_argv(folder_and_weights, tmp_path / "r.json", "--workers", "0", "--device", "cpu", *extra)
        assert load_tool("eval").main(argv) == 0
    assert seen == [wanted, wanted]
    lines = [line for line in capsys.readouterr().out.splitlines() if "execution:" in line]
    assert len(lines) == 2 and all(f"device cpu ({wanted} threads)" in line for line in lines), lines
    assert torch.get_num_threads() == before  # given back to the caller's process


# --- the results file -----------------------------------------------------------------------

# Runs tools/eval.py once per case in one process, recording which steps of the evaluation ran.
_JSON_CASES = """
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import rednet.engine.evaluation as evaluation
from tests.helpers import load_tool

ran = []
for name in ("build_model", "evaluate"):
    real = getattr(evaluation, name)
    setattr(evaluation, name, lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k))
results = {}
for case, argv in json.loads(sys.argv[2]).items():
    ran.clear()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = load_tool("eval").main(argv)
    results[case] = [rc, list(ran), err.getvalue()]
print(json.dumps(results))
"""


def test_a_results_file_that_cannot_be_written_stops_eval_before_it_runs(tmp_path):
    """A read-only results file was found only when the results were written, after the whole pass."""
    if os.geteuid() == 0 and why_nobody_cannot_run():
        pytest.skip(why_nobody_cannot_run())
    root = Path(tempfile.mkdtemp(prefix="rednet-json-"))  # pytest's own folders are private to their user
    try:
        root.chmod(0o755)
        data = _val_folder(root / "data", ("a", "b"))
        weights = _weights(root / "w.pth", 2, name="test_resnet")
        writable, locked = root / "writable", root / "locked"
        writable.mkdir()
        locked.mkdir()
        (writable / "r.json").write_text("old results\n")
        if os.geteuid() == 0:  # root writes anything: run as nobody, in a folder nobody may write
            prefix = AS_NOBODY
            os.chown(writable, 65534, 65534)
        else:
            prefix = []
            (writable / "r.json").chmod(0o444)
            locked.chmod(0o555)
        base = ["--model", "test_resnet", "--pretrained", str(weights), "--data", str(data), "--img-size", "16",
                "--workers", "0", "--device", "cpu", "--set", "model.num_classes=2", "--json"]
        cases = {"read-only file": str(writable / "r.json"), "read-only folder": str(locked / "r.json"),
                 "a folder": str(writable), "writable": str(writable / "new.json")}
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(root), "PYTHONDONTWRITEBYTECODE": "1",
               "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([*prefix, sys.executable, "-c", _JSON_CASES, str(ROOT),
                               json.dumps({case: [*base, path] for case, path in cases.items()})],
                              env=env, cwd=root, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout.splitlines()[-1])
        assert results["writable"][:2] == [0, ["build_model", "evaluate"]], results["writable"]
        expected = {"read-only file": f"--json {writable / 'r.json'} cannot be written (Permission denied)",
                    "read-only folder": f"the folder of --json {locked} is not writable (Permission denied)",
                    "a folder": f"--json {writable} is a folder; give a file name"}
        for case, message in expected.items():
            rc, ran, err = results[case]
            assert (rc, ran) == (2, []), (case, err)  # refused before the model was built or anything scored
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, (case, err)
        assert (writable / "r.json").read_text() == "old results\n"
    finally:
        shutil.rmtree(root)


def test_results_are_printed_when_the_file_cannot_be_written_at_the_end(folder_and_weights, tmp_path):
    """A full disk at the end cost the whole evaluation (a traceback, no results): RLIMIT_FSIZE stands in."""
    import resource

    out = tmp_path / "r.json"
    out.write_text("old results\n")

    def small_files_only():
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))  # the results take about 1 KB

    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"),
                           *_eval_argv(folder_and_weights, out, "--workers", "0", "--device", "cpu", "--set",
                                       "model.num_classes=2")],
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
                          preexec_fn=small_files_only, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors == [f"error: --json {out} was not written (File too large); the results were printed on stdout "
                      "instead"]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["count"] == 6 and result["model"] == "test_resnet" and 0 <= result["top1"] <= 100
    assert out.read_text() == "old results\n" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


# --- one vocabulary across the tools (issue 20, item 9) -------------------------------------

# tool -> (the arguments it needs to parse, its documented options, {old spelling: (value, attribute, parsed)})
VOCABULARY = {
    "train": ([], ["--output", "--config", "--data"], {}),
    "eval": ([], ["--img-size", "--json", "--pretrained"], {}),
    "export": (["--model", "rednet26"], ["--output", "--img-size", "--json", "--pretrained"],
               {"--input-size": ("64", "img_size", 64)}),
    "convert_weights": (["in.pth", "out.safetensors"], ["--output", "--json"], {}),
    "complexity": (["--model", "rednet26"], ["--img-size", "--json"], {"--input-size": ("64", "img_size", 64)}),
    "visualize": ([], ["--output", "--img-size", "--json", "--pretrained"],
                  {"--out": ("k.png", "output", "k.png"), "--input-size": ("64", "img_size", 64)}),
    "benchmark": (["op"], ["--output", "--img-size", "--json"], {"--race-size": ("64", "img_size", 64)}),
    "make_shards": (["src", "out"], ["--output", "--json"], {}),
}


@pytest.mark.parametrize("tool", VOCABULARY)
def test_one_vocabulary_across_the_tools(tool, capsys):
    """--output, --img-size, --json [FILE] and --pretrained [PATH|URL] are spelled and mean the same in every
    tool; the old spellings still parse, hidden from --help, with a one-line warning."""
    needed, documented, old = VOCABULARY[tool]
    parser = load_tool(tool).build_parser()
    text = parser.format_help()
    for option in documented:
        assert re.search(rf"(^|[\s\[]){option}\b", text), option
    for spelling in ("--out ", "--input-size", "--race-size", "--out="):
        assert spelling not in text
    assert "alone, on stdout; with FILE, written to FILE" in " ".join(text.split())
    args = parser.parse_args([*needed, "--json"])
    assert args.json == "-"  # alone: the result on stdout
    assert parser.parse_args([*needed, "--json", "r.json"]).json == "r.json"
    if "--pretrained" in documented:
        assert parser.parse_args([*needed, "--pretrained"]).pretrained == "default"  # the model's own weights
        assert parser.parse_args([*needed, "--pretrained", "w.pth"]).pretrained == "w.pth"
    capsys.readouterr()
    for spelling, (value, attribute, parsed) in old.items():
        assert getattr(parser.parse_args([*needed, spelling, value]), attribute) == parsed
        current = next(o for o in documented if o.lstrip("-").replace("-", "_") == attribute)
        assert capsys.readouterr().err == f"warning: {spelling} is now {current}; the old spelling goes in the next " \
                                          "release\n"


def test_json_alone_prints_the_results_of_eval(folder_and_weights, tmp_path, capsys):
    """`--json` alone meant a file named by the next argument in eval, stdout in the other tools; now stdout."""
    data, weights = folder_and_weights
    argv = ["--model", "test_resnet", "--pretrained", str(weights), "--data", str(data), "--workers", "0", "--json"]
    assert load_tool("eval").main(argv) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["count"] == 6 and result["model"] == "test_resnet"
    assert not list(tmp_path.iterdir())


def test_json_file_of_a_tool_that_printed(tmp_path, capsys):
    out = tmp_path / "sub" / "c.json"
    assert load_tool("complexity").main(["--model", "rednet26", "--json", str(out)]) == 0
    assert capsys.readouterr().out == "" and json.loads(out.read_text())["params"] == 9_233_166
    # Checked before counting: a folder is no file.
    assert load_tool("complexity").main(["--model", "rednet26", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a folder" in _one_error(capsys)


# --- default outputs (issue 20, items 8 and 10) ----------------------------------------------


@pytest.mark.parametrize("argv, output", [
    (["--config", "rednet50"], "runs/rednet50"),
    (["--config", "rednet50", "--set", "model.name=resnet50"], "runs/resnet50"),  # was runs/rednet50: the same run
    (["--config", "rednet50", "--set", "model.name=resnet50", "--output", "elsewhere"], "elsewhere"),
    (["--config", "digits", "--set", "model.name=resnet50"], "runs/digits"),  # a config that names its run
    (["--config", "rednet50", "--set", "model.name=hf-hub:timm/resnet18.a1_in1k"], "runs/hf-hub_timm_resnet18.a1_in1k"),
])
def test_the_run_directory_follows_the_model(capsys, argv, output):
    assert load_tool("train").main([*argv, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["output"] == output


def test_visualize_writes_under_runs_by_default(tmp_path, monkeypatch, capsys):
    """The README's visualize command wrote kernels_<model>_<layer>.png into the current folder."""
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "rednet26", "--layer", "stem.1", "--img-size", "32", "--dpi", "10", "--device", "cpu"]
    assert load_tool("visualize").main(argv) == 0
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")] == [
        "runs/visualize/kernels_rednet26_stem.1.png"]
