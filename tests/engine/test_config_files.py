"""Bad input to tools/train.py and tools/eval.py: exit 2 with one ``error:`` line that says what to fix.

Each case runs the tool in-process (``main(argv)``) and fails before any training step,
so the whole file takes seconds.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from ..helpers import CONFIGS, ROOT, load_tool, read_only_dir


def _fails_cleanly(capsys, tool: str, argv: list[str], pattern: str) -> str:
    """Run ``tools/<tool>.py argv``; assert exit 2 and exactly one ``error:`` line matching ``pattern``."""
    rc = load_tool(tool).main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert rc == 2, captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err
    assert len(errors) == 1, captured.err
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


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
    _fails_cleanly(capsys, "train", ["--config", str(bad), "--print-config"], pattern)


def test_yaml_merge_keys_are_not_duplicates(tmp_path, capsys):
    import yaml

    ok = tmp_path / "ok.yaml"
    ok.write_text("optim:\n  <<: {lr: 0.1, momentum: 0.8}\n  lr: 0.2\n")  # the merged lr gives way, as YAML says
    assert load_tool("train").main(["--config", str(ok), "--print-config"]) == 0
    optim = yaml.safe_load(capsys.readouterr().out)["optim"]
    assert (optim["lr"], optim["momentum"]) == (0.2, 0.8)


def test_duplicate_key_in_a_set_mapping(capsys):
    _fails_cleanly(capsys, "train", ["--config", "digits.yaml", "--set", "model.kwargs={a: 1, a: 2}",
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
    _fails_cleanly(capsys, "train", ["--config", str(tmp_path / "c0.yaml"), "--print-config"],
                   r"c0\.yaml: its base files nest more than 32 deep \(base file 32, .*c32\.yaml")
    # 32 base files are allowed.
    assert load_tool("train").main(["--config", str(tmp_path / "c1467.yaml"), "--print-config"]) == 0
    assert "rednet26" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["[" * 3000 + "]" * 3000, "{a: " * 3000 + "}" * 3000], ids=["lists", "mappings"])
def test_set_value_nested_too_deep_is_exit_2(capsys, value):
    _fails_cleanly(capsys, "train", ["--config", "digits.yaml", "--set", f"model.kwargs={value}", "--print-config"],
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
    _fails_cleanly(capsys, "train", ["--config", str(bad), "--print-config"], pattern)


def test_yaml_anchors_within_bounds_still_work(tmp_path, capsys):
    import yaml

    ok = tmp_path / "ok.yaml"
    ok.write_text("optim: &o\n  lr: 0.1\n  momentum: 0.8\nmodel:\n  kwargs:\n    a: &a [1, 2]\n    b: [*a, *a]\n"
                  "    o:\n      <<: *o\n      lr: 0.2\n")
    assert load_tool("train").main(["--config", str(ok), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["kwargs"] == {"a": [1, 2], "b": [[1, 2], [1, 2]], "o": {"lr": 0.2, "momentum": 0.8}}
    assert printed["optim"]["lr"] == 0.1


# --- command-line paths -----------------------------------------------------------------


def test_command_line_paths_are_strings_not_yaml(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)  # nothing may be created in the checkout
    config = str(CONFIGS / "digits.yaml")
    assert load_tool("train").main(["--config", config, "--output", "2024", "--data", "null", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["output"] == "2024" and printed["data"]["root"] == "null"


@pytest.mark.parametrize("tool, argv", [
    ("train", ["--config", "digits.yaml", "--output", "", "--print-config"]),
    ("train", ["--config", "digits.yaml", "--data", "", "--print-config"]),
    ("train", ["--config", "", "--print-config"]),
    ("eval", ["--config", "digits.yaml", "--json", ""]),
], ids=["train-output", "train-data", "train-config", "eval-json"])
def test_empty_path_is_an_error(capsys, tool, argv):
    option = argv[argv.index("") - 1]
    _fails_cleanly(capsys, tool, argv, f"{option} is empty")


# --- what the config names: model, optimizer, device, run directory -------------------

# A timm model on synthetic data: every case below fails before the first step, most before any data is read.
TINY = ["model.name=resnet10t", "model.num_classes=4", "data.dataset=synthetic", "data.img_size=16",
        "data.batch_size=4", "data.workers=0", "data.synthetic_train_size=8", "data.synthetic_val_size=4",
        "train.epochs=1", "train.max_iters_per_epoch=1"]


def _train_argv(out, *sets: str) -> list[str]:
    return ["--config", "digits.yaml", "--output", str(out),
            *[a for item in (*TINY, *sets) for a in ("--set", item)]]


@pytest.mark.parametrize("item, pattern", [
    ("model.name=rednet5", r"model\.name 'rednet5' is not a registered model; did you mean 'rednet50'"),
    ("optim.name=sgdd", r"optim\.name 'sgdd' is not a timm optimizer; did you mean 'sgd'"),
    ("model.kwargs={foo: 1}", r"model\.kwargs \{'foo': 1\} do not fit resnet10t .*unexpected keyword argument 'foo'"),
    ("data.batch_size=64", r"the training set has 8 images, fewer than one batch of 64; lower data\.batch_size"),
], ids=["model-name", "optimizer", "model-kwargs", "batch-over-dataset"])
def test_bad_config_values(tmp_path, capsys, item, pattern):
    _fails_cleanly(capsys, "train", _train_argv(tmp_path / "run", item), pattern)


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
    _fails_cleanly(capsys, "train", _train_argv(tmp_path / "run", *items), pattern)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("tool", ["train", "eval"])
def test_cuda_requested_without_cuda(tmp_path, capsys, tool):
    argv = _train_argv(tmp_path / "run", "train.device=cuda")
    if tool == "eval":
        argv = ["--config", "digits.yaml", *argv[4:]]
    _fails_cleanly(capsys, tool, argv, r"train\.device is 'cuda' but torch sees no CUDA device")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["existing-file", "under-a-file", "read-only"])
def test_unusable_run_directory(tmp_path, capsys, case):
    (tmp_path / "file").write_text("precious")
    out = {"existing-file": tmp_path / "file", "under-a-file": tmp_path / "file" / "run",
           "read-only": read_only_dir(tmp_path) if case == "read-only" else None}[case]
    try:
        _fails_cleanly(capsys, "train", _train_argv(out), r"the run directory train\.output \(--output\) .*"
                       r"(is a file, not a folder|lies under .*file, which is a file|is not writable)")
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o755)  # let pytest remove it
    assert (tmp_path / "file").read_text() == "precious"


def test_eval_results_file_that_cannot_be_written(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = ["--config", "digits.yaml", "--json", str(tmp_path / "file" / "r.json")]
    _fails_cleanly(capsys, "eval", argv, r"the folder of --json .* is a file, not a folder")


# --- weights and data -------------------------------------------------------------------


def _image_tree(root: Path, broken: tuple[str, ...] = (), per_class: int = 3) -> Path:
    """``root/{train,val}/{a,b}/*.png``; the splits named in ``broken`` hold only undecodable files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                if split in broken:
                    (root / split / c / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
                else:
                    image = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
                    image.save(root / split / c / f"{i}.png")
    return root


def test_eval_missing_pretrained_file(tmp_path, capsys):
    data = _image_tree(tmp_path / "data")
    _fails_cleanly(capsys, "eval", ["--model", "resnet10t", "--pretrained", str(tmp_path / "nope.pth"), "--data",
                                    str(data)], r"pretrained weights .*nope\.pth does not exist")


@pytest.mark.parametrize("broken", ["train", "val"])
def test_train_with_an_undecodable_split_stops_before_training(tmp_path, capsys, broken):
    data = _image_tree(tmp_path / "data", broken=(broken,))
    argv = _train_argv(tmp_path / "run", "model.num_classes=2") + ["--data", str(data)]
    _fails_cleanly(capsys, "train", argv, rf"dataset split .*{broken}: none of its 6 images can be decoded "
                                          rf"\(e\.g\. .*{broken}/a/0\.png")
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_eval_with_an_undecodable_val_split(tmp_path, capsys):
    data = _image_tree(tmp_path / "data", broken=("val",))
    argv = ["--config", "digits.yaml", "--data", str(data),
            *[a for item in (*TINY, "model.num_classes=2") for a in ("--set", item)]]
    _fails_cleanly(capsys, "eval", argv, r"dataset split .*val: none of its 6 images can be decoded")


def test_weights_pickle_naming_a_module_outside_the_allow_list(tmp_path, capsys):
    data = _image_tree(tmp_path / "data")
    evil = tmp_path / "evil.pdparams"
    evil.write_bytes(b"\x80\x02cnumpy.dtypes_evil\nEvilDType\n.")  # protocol 2, then one GLOBAL opcode
    # A RedNet: its weights go through rednet.models' readers (timm models through timm's torch.load).
    _fails_cleanly(capsys, "eval", ["--model", "rednet26", "--pretrained", str(evil), "--data", str(data)],
                   r"refusing to load .*evil\.pdparams.*numpy\.dtypes_evil")


def test_sigint_during_eval_exits_130_with_one_line(tmp_path):
    import signal
    import subprocess
    import sys

    import rednet

    data = _image_tree(tmp_path / "data", per_class=100)
    torch.save(rednet.create_model("resnet10t").state_dict(), tmp_path / "w.pth")
    args = [sys.executable, str(ROOT / "tools" / "eval.py"), "--model", "resnet10t", "--pretrained",
            str(tmp_path / "w.pth"), "--data", str(data), "--batch-size", "1", "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


# --- issue 16, item 17: the involution backend forced in the environment ------------------------

# Each tool, as it starts; none gets as far as a forward pass (a tiny train or eval fails before any data is read).
BACKEND_ARGV = {
    "train": lambda tmp: _train_argv(tmp / "run"),
    "eval": lambda tmp: ["--config", "digits.yaml", *[a for item in TINY for a in ("--set", item)]],
    "export": lambda tmp: ["--model", "rednet26", "--format", "export", "--output", str(tmp / "m.pt2")],
    "visualize": lambda tmp: ["--model", "rednet26", "--device", "cpu", "--layer", "list"],
    "complexity": lambda tmp: ["--model", "rednet26"],
    "benchmark": lambda tmp: ["op", "--device", "cpu", "--shapes", "layer4", "--json", str(tmp / "b.json")],
}


@pytest.mark.parametrize("tool", BACKEND_ARGV)
@pytest.mark.parametrize("value, pattern", [
    ("fast", r"\$REDNET_INVOLUTION_BACKEND='fast' is not an involution backend; set it to one of auto, reference, "
             r"cupy, native, or unset it"),
    ("cupy", r"\$REDNET_INVOLUTION_BACKEND=cupy: involution backend 'cupy' was forced but cannot run: .*CUDA.* "
             r"\(it takes auto, reference, cupy, native\)"),
], ids=["unknown", "cupy-on-cpu"])
def test_a_backend_that_cannot_run_stops_the_tool_as_it_starts(tmp_path, capsys, monkeypatch, tool, value, pattern):
    """It was logged, then raised (a traceback) at the first forward pass, after the data and model were loaded."""
    if value == "cupy" and torch.cuda.is_available():
        pytest.skip("cupy may run here")
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", value)
    _fails_cleanly(capsys, tool, BACKEND_ARGV[tool](tmp_path), pattern)
    assert not (tmp_path / "run").exists() and not list(tmp_path.iterdir())


def test_native_forced_without_a_compiler_is_exit_2(tmp_path):
    """In a process of its own: the native library may already be loaded in this one."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDNET_INVOLUTION_BACKEND": "native", "CXX": "/nonexistent/c++",
           "REDNET_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "rednet", "complexity", "--model", "rednet26", "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: $REDNET_INVOLUTION_BACKEND=native: involution backend 'native' was forced "
                                "but cannot run:") and "not found" in errors[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_complexity_on_cuda_without_a_gpu(capsys):
    """A traceback from torch's CUDA initialisation."""
    _fails_cleanly(capsys, "complexity", ["--model", "rednet26", "--device", "cuda"],
                   r"^error: --device cuda: no CUDA device is visible to torch; use --device cpu$")


# --- issue 16, item 18: a path with a name longer than a file system takes -----------------------

LONG = "n" * 256  # one byte over NAME_MAX


@pytest.mark.parametrize("tool, argv, option", [
    ("train", ["--config", f"/tmp/{LONG}/c.yaml", "--print-config"], "--config"),
    ("train", ["--config", "digits", "--data", f"/tmp/{LONG}", "--print-config"], "--data"),
    ("train", ["--config", "digits", "--output", f"runs/{LONG}"], "--output"),
    ("eval", ["--checkpoint", f"/tmp/{LONG}.pt"], "--checkpoint"),
    ("eval", ["--config", f"{LONG}.yaml"], "--config"),
    ("eval", ["--config", "digits", "--data", f"/data/{LONG}/imagenet"], "--data"),
    ("export", ["--model", "rednet26", "--output", f"{LONG}.onnx"], "--output"),
    ("complexity", ["--model", "rednet26", "--json", f"{LONG}.json"], "--json"),
], ids=["train-config", "train-data", "train-output", "eval-checkpoint", "eval-config", "eval-data", "export-output",
        "complexity-json"])
def test_a_name_over_255_bytes_in_a_path_option(tmp_path, capsys, monkeypatch, tool, argv, option):
    """--config and --checkpoint raised OSError (File name too long) with a traceback; --data was found late."""
    monkeypatch.chdir(tmp_path)
    shown = r"'n{20}\.\.\.[n.a-z]{12}'"  # long names are shortened in the message
    _fails_cleanly(capsys, tool, argv, rf"^error: {option}: the name {shown} is \d{{3}} bytes long, over the 255 a "
                                       r"file or folder name may have; shorten it$")
    assert not list(tmp_path.iterdir())
