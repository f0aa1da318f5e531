"""Bad input to tools/train.py and tools/eval.py: exit 2 with one ``error:`` line that says what to fix.

Each case runs the tool in-process (``main(argv)``) and fails before any training step,
so the whole file takes seconds.
"""
from __future__ import annotations

import re

import pytest

from .helpers import load_tool


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
