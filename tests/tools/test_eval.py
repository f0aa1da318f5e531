"""tools/eval.py used as a timm user would: a plain ImageFolder, an eval transform that follows the command
line, the precision and threads it runs on, the model's classes against the folder's, results that say what was
scored and survive a file that cannot be written; and its refusals, exit 2 with one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from ..helpers import AS_NOBODY, ROOT, fails_cleanly, image_tree, load_tool, one_error, why_nobody_cannot_run

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


# --- precision on a CPU (the rule itself: engine/test_config.py) --------------------------


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
    assert "'data.eval_crop_pct' expects a number in (0, 1], got 1.5" in one_error(capsys)


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
            "--num-classes 3 (or --set model.num_classes=3)") in one_error(capsys)
    assert evaluate.main([*config, "--num-classes", "3"]) == 0
    plain = ["--model", "rednet26", "--data", str(three_classes), "--img-size", "16", "--workers", "0"]
    # 1000-class weights (ImageNet's count) on 3 folders: scored with no warning; now refused, subsets too.
    imagenet = _weights(tmp_path / "w1000.pth", 1000)
    capsys.readouterr()
    assert evaluate.main([*plain, "--pretrained", str(imagenet)]) == 2
    error = one_error(capsys)
    assert f"has 3 classes but the model has 1000 (the classifier of {imagenet}): evaluate on data of the " \
           "model's 1000 classes" in error and "would need a mapping" in error
    # A count given wins over the weights': their classifier is dropped with a warning, and the folder decides.
    four = _weights(tmp_path / "w4.pth", 4)
    assert evaluate.main([*plain, "--pretrained", str(four), "--num-classes", "3"]) == 0
    assert "classifier has 4 classes, the model 3: fc was left at its fresh initialisation" in capsys.readouterr().out
    assert evaluate.main([*plain, "--pretrained", str(four), "--num-classes", "4"]) == 2
    assert "has 3 classes but the model has 4 (model.num_classes): pass --num-classes 3" in one_error(capsys)


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


# --- --json alone (issue 20, item 9; the other tools: tools/test_cli.py) --------------------


def test_json_alone_prints_the_results_of_eval(folder_and_weights, tmp_path, capsys):
    """`--json` alone meant a file named by the next argument in eval, stdout in the other tools; now stdout."""
    data, weights = folder_and_weights
    argv = ["--model", "test_resnet", "--pretrained", str(weights), "--data", str(data), "--workers", "0", "--json"]
    assert load_tool("eval").main(argv) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["count"] == 6 and result["model"] == "test_resnet"
    assert not list(tmp_path.iterdir())


# --- bad input, weights and a timm model ---------------------------------------------------


def test_eval_results_file_that_cannot_be_written(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = ["--config", "digits.yaml", "--json", str(tmp_path / "file" / "r.json")]
    fails_cleanly(capsys, "eval", argv, r"the folder of --json .* is a file, not a folder")


def test_eval_missing_pretrained_file(tmp_path, capsys):
    data = image_tree(tmp_path / "data")
    fails_cleanly(capsys, "eval", ["--model", "resnet10t", "--pretrained", str(tmp_path / "nope.pth"), "--data",
                                    str(data)], r"pretrained weights .*nope\.pth does not exist")


def test_sigint_during_eval_exits_130_with_one_line(tmp_path):
    import signal
    import subprocess
    import sys

    import rednet

    data = image_tree(tmp_path / "data", per_class=100)
    # The folder's 2 classes: a 1000-class head is refused (exit 2) once the data is read.
    torch.save(rednet.create_model("resnet10t", num_classes=2).state_dict(), tmp_path / "w.pth")
    args = [sys.executable, str(ROOT / "tools" / "eval.py"), "--model", "resnet10t", "--pretrained",
            str(tmp_path / "w.pth"), "--data", str(data), "--batch-size", "1", "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # A shell ignores SIGINT in the jobs it starts in the background, and a child inherits that (Python then
    # installs no KeyboardInterrupt handler): the tool gets the default, as from a terminal.
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:  # logged just before the evaluation pass (200 images at 224 px, one by one)
            if "eval transform" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err
    assert [line for line in err.splitlines() if line.strip()] == ["interrupted by SIGINT; no results written"]


def test_eval_tool_with_a_timm_model_and_a_weights_file(tmp_path, capsys):
    """--model NAME --pretrained FILE --data DIR: transform from the model's pretrained config, JSON out."""
    import numpy as np
    import torch
    from PIL import Image

    import rednet

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / "val" / c).mkdir(parents=True)
        for i in range(3):
            image = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
            image.save(tmp_path / "data" / "val" / c / f"{i}.png")
    model = rednet.create_model("resnet10t", num_classes=2)  # the folder's classes (eval takes the weights' count)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "r.json"
    rc = load_tool("eval").main(["--model", "resnet10t", "--pretrained", str(tmp_path / "w.pth"), "--data",
                             str(tmp_path / "data"), "--batch-size", "4", "--workers", "0", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["count"] == 6 and result["model"] == "resnet10t" and 0 <= result["top1"] <= 100
    assert "eval transform from the pretrained config" in capsys.readouterr().out


def test_eval_tool_bad_weights_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"not weights at all")
    rc = load_tool("eval").main(["--model", "rednet26", "--pretrained", str(bad), "--data", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert rc == 2 and "unrecognised format" in err and "Traceback" not in err
    assert "weights_only" not in err
