"""What every command shares: --help, paths checked as they are given, one vocabulary of options (--output,
--img-size, --json, --pretrained), an involution backend forced in the environment, and names longer than a
file system takes; each refusal exit 2 with one line."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from ..helpers import ROOT, TINY_TRAIN, fails_cleanly, load_tool, one_error, train_argv

# --- help, paths and one vocabulary ---------------------------------------------------------------


@pytest.mark.parametrize("name, option", [("train", "--resume"), ("eval", "--json")])
def test_help(name, option, capsys):
    with pytest.raises(SystemExit) as e:
        load_tool(name).main(["--help"])
    assert e.value.code == 0 and option in capsys.readouterr().out


@pytest.mark.parametrize("tool, argv", [
    ("train", ["--config", "digits.yaml", "--output", "", "--print-config"]),
    ("train", ["--config", "digits.yaml", "--data", "", "--print-config"]),
    ("train", ["--config", "", "--print-config"]),
    ("eval", ["--config", "digits.yaml", "--json", ""]),
], ids=["train-output", "train-data", "train-config", "eval-json"])
def test_empty_path_is_an_error(capsys, tool, argv):
    option = argv[argv.index("") - 1]
    fails_cleanly(capsys, tool, argv, f"{option} is empty")


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


def test_json_file_of_a_tool_that_printed(tmp_path, capsys):
    out = tmp_path / "sub" / "c.json"
    assert load_tool("complexity").main(["--model", "rednet26", "--json", str(out)]) == 0
    assert capsys.readouterr().out == "" and json.loads(out.read_text())["params"] == 9_233_166
    # Checked before counting: a folder is no file.
    assert load_tool("complexity").main(["--model", "rednet26", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a folder" in one_error(capsys)


# --- issue 16, item 17: the involution backend forced in the environment --------------------------


# Each tool, as it starts; none gets as far as a forward pass (a tiny train or eval fails before any data is read).
BACKEND_ARGV = {
    "train": lambda tmp: train_argv(tmp / "run"),
    "eval": lambda tmp: ["--config", "digits.yaml", *[a for item in TINY_TRAIN for a in ("--set", item)]],
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
    fails_cleanly(capsys, tool, BACKEND_ARGV[tool](tmp_path), pattern)
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


# --- issue 16, item 18: a path with a name longer than a file system takes ------------------------


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
    fails_cleanly(capsys, tool, argv, rf"^error: {option}: the name {shown} is \d{{3}} bytes long, over the 255 a "
                                       r"file or folder name may have; shorten it$")
    assert not list(tmp_path.iterdir())
