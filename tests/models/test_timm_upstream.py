"""timm's own model tests (``tests/test_models.py`` of the locked timm) on rednet26 and rednet50.

``make env`` extracts timm's file from the locked timm's source distribution into the
environment folder; ``timm_upstream_plugin`` narrows it to RedNet and says what it leaves out.
"""
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ..helpers import ROOT
from .timm_upstream_plugin import DESELECTED, MODELS

TIMM_TESTS = Path(sys.prefix) / "timm-tests"  # $(VENV)/timm-tests in the Makefile
# Every test of timm's file that runs on RedNet; each must pass on both MODELS.
EXPECTED = (
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs",
    "test_model_forward_torchscript",
    "test_model_forward_features",
    "test_model_forward_intermediates_features",
    "test_model_forward_intermediates",
    "test_prune_intermediate_layers_contract",
    "test_model_forward_fx",
    "test_model_backward_fx",
    "test_model_forward_fx_torchscript",
    "test_model_forward_torchscript_with_features_fx",
)
# Environment variables timm's file reads (GITHUB_ACTIONS drops tests and models): not inherited.
TIMM_KNOBS = ("GITHUB_ACTIONS", "TORCH_DEVICE", "TORCH_BACKEND", "TIMEOUT")


def _outcomes(junit: Path) -> dict[tuple[str, str], str]:
    """{(test function, model): 'passed' | 'failed' | 'error' | 'skipped'} from a JUnit XML report."""
    outcomes = {}
    for case in ET.parse(junit).iter("testcase"):
        function, _, params = case.get("name").partition("[")
        model = params.rstrip("]").split("-")[-1].split(".")[0]
        children = {child.tag for child in case}
        outcome = next((tag for tag in ("failure", "error", "skipped") if tag in children), "passed")
        outcomes[(function, model)] = {"failure": "failed"}.get(outcome, outcome)
    return outcomes


def test_timm_model_tests_pass_on_rednet(tmp_path):
    test_file = TIMM_TESTS / "tests" / "test_models.py"
    lock_hash = hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()[:12]
    if not (TIMM_TESTS / f".extracted-{lock_hash}").is_file():
        pytest.skip(f"timm's own tests for this requirements.lock are not in {TIMM_TESTS}: run make env")
    junit = tmp_path / "junit.xml"
    cmd = [
        sys.executable, "-m", "pytest", str(test_file),
        # timm's pytest configuration (its markers), not this repository's.
        "-c", str(TIMM_TESTS / "pyproject.toml"), "--rootdir", str(TIMM_TESTS),
        "-p", "tests.models.timm_upstream_plugin", "-p", "no:cacheprovider",
        # pytest-timeout is not in the lock: timm's timeout marks are inert.
        "-W", "ignore::pytest.PytestUnknownMarkWarning",
        "-q", "-rfEs", f"--junitxml={junit}",
    ]
    env = {k: v for k, v in os.environ.items() if k not in TIMM_KNOBS}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    outcomes = _outcomes(junit)
    assert {k: v for k, v in outcomes.items() if v != "passed"} == {}
    assert {(f, m) for f in EXPECTED for m in MODELS} <= set(outcomes)
    assert not any(f in DESELECTED for f, _ in outcomes)


# Stands in for the environment's python in the Makefile's one call, `python -m pip download ...
# -r REQUIREMENT -d DEST`: records the call and the requirement file, and "downloads" SDIST.
FAKE_PIP = """#!{python}
import shutil, sys
from pathlib import Path
args = sys.argv[1:]
requirement = Path(args[args.index("-r") + 1]).read_text()
Path({record!r}).write_text(" ".join(args) + "\\n" + requirement)
shutil.copy({sdist!r}, Path(args[args.index("-d") + 1]) / "timm-1.0.31.tar.gz")
"""


def _sdist(path: Path) -> None:
    # More than the Makefile keeps: another test file and timm's code.
    with tarfile.open(path, "w:gz") as tar:
        for name in ("tests/test_models.py", "tests/test_layers.py", "pyproject.toml", "timm/__init__.py"):
            data = f"# {name}\n".encode()
            info = tarfile.TarInfo(f"timm-1.0.31/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_make_env_fetches_only_timms_test_file_checked_against_the_lock(tmp_path):
    # An environment that looks installed (no network: the python is FAKE_PIP).
    venv, lock = tmp_path / "env", (ROOT / "requirements.lock").read_text()
    lock_hash = hashlib.sha256(lock.encode()).hexdigest()[:12]
    (venv / "bin").mkdir(parents=True)
    (venv / f".installed-{lock_hash}").touch()
    project_hash = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    (venv / f".project-{project_hash}").touch()  # the package is installed too: only timm's tests are missing
    _sdist(tmp_path / "sdist.tar.gz")
    fake = venv / "bin" / "python"
    fake.write_text(FAKE_PIP.format(python=sys.executable, record=str(tmp_path / "pip-call.txt"),
                                    sdist=str(tmp_path / "sdist.tar.gz")))
    fake.chmod(0o755)
    make = ["make", "--no-print-directory", "-C", str(ROOT), "env", f"VENV={venv}"]
    res = subprocess.run(make, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    call, requirement = (tmp_path / "pip-call.txt").read_text().split("\n", 1)
    assert call.startswith("-m pip download") and "--require-hashes" in call and "--no-binary :all:" in call
    entry = re.search(r"^timm==.*?(?=^ *#)", lock, re.M | re.S).group(0)  # the lock's timm entry, hashes included
    assert requirement == entry and "--hash=sha256:" in entry
    kept = sorted(str(p.relative_to(venv / "timm-tests")) for p in (venv / "timm-tests").rglob("*"))
    assert kept == [f".extracted-{lock_hash}", "pyproject.toml", "tests", "tests/test_models.py",
                    "timm-requirement.txt"]
    (tmp_path / "pip-call.txt").unlink()
    assert subprocess.run(make, capture_output=True, text=True, timeout=120).returncode == 0
    assert not (tmp_path / "pip-call.txt").exists()  # keyed by the lock: fetched once
