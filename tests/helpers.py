"""What several test files share: the repository root, loading a command, building the sdist and
wheel, the published facts of the five RedNets (docs/reference.md), the small runs, image trees and
error checks the tests of several layers use, and weights in the layouts others publish; each written
once."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The bundled configs (the one copy; a wheel ships them as rednet/configs, and `--config NAME`
# finds them from any directory).
CONFIGS = ROOT / "configs"

# Tests of what another user sees run tools as uid 65534 ("nobody"), which root can switch to.
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@functools.cache
def why_nobody_cannot_run() -> str | None:
    """Why uid 65534 cannot run rednet with this interpreter (None when it can). Besides root and
    setpriv, it needs to read the environment: one under a private home (/root is 0700) it cannot."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root, to run a tool as another user (uid 65534) with setpriv"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux), to run a tool as another user"
    probe = subprocess.run([*AS_NOBODY, sys.executable, "-c", "import timm, torch"], cwd="/",
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return (f"uid 65534 cannot import torch and timm from the environment at {sys.prefix}: a folder above it "
                "is private; put the environment where other users can read it (.ci/run does, as root)")
    return None


# Blocks per stage of each released variant.
DEPTHS = {
    "rednet26": (1, 2, 4, 1),
    "rednet38": (2, 3, 5, 2),
    "rednet50": (3, 4, 6, 3),
    "rednet101": (3, 4, 23, 3),
    "rednet152": (3, 8, 36, 3),
}
# Exact parameter counts of the released architecture (1000 classes) and the paper's
# GFLOPs column (multiply-accumulates at 224x224).
PARAMS = {"rednet26": 9_233_166, "rednet38": 12_386_986, "rednet50": 15_540_806, "rednet101": 25_652_950,
          "rednet152": 33_984_582}
PAPER_GMACS = {"rednet26": 1.73, "rednet38": 2.22, "rednet50": 2.71, "rednet101": 4.74, "rednet152": 6.79}


# Operator test shapes (B, C, G, H, W, K, stride, dilation): odd sizes, stride 2, dilation 2,
# K = 1..7, G = 1 and G = C.
OP_SHAPES = [
    (2, 4, 1, 7, 9, 3, 1, 1),
    (1, 6, 6, 9, 7, 3, 2, 1),
    (2, 8, 2, 11, 10, 5, 1, 2),
    (1, 4, 4, 13, 9, 7, 2, 1),
    (2, 6, 3, 5, 6, 1, 1, 1),
    (1, 8, 1, 9, 11, 7, 1, 1),
    (2, 4, 2, 10, 9, 5, 2, 2),
]


def live_eval_model(name: str, **kwargs):
    """An eval-mode RedNet in which every block changes the output, yet outputs stay finite.

    The residual branches are live but scaled down (last BN weight 0.1): a random involution
    block is quadratic in its input, so at full scale the activations of a deep eval-mode
    net overflow to inf and NaN (and NaN compares equal in numpy). BatchNorm statistics are
    measured on one batch.
    """
    import torch
    import torch.nn as nn

    import rednet
    from rednet.models import Bottleneck

    model = rednet.create_model(name, **kwargs)
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.constant_(m.bn3.weight, 0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64))
    return model.eval()


def load_tool(name: str) -> ModuleType:
    """The command ``name``: a fresh copy of ``rednet/tools/<name>.py``, so that what one test sets on it never
    reaches another; ``rednet.tools.<name>`` itself for a command that is a package (its tests patch its modules
    with ``monkeypatch``, which undoes it); ``tools/<name>.py`` for the developer tools that live only there."""
    path = ROOT / "rednet" / "tools" / f"{name}.py"
    if (ROOT / "rednet" / "tools" / name / "__init__.py").is_file():
        return importlib.import_module(f"rednet.tools.{name}")
    # Named inside rednet.tools, for its relative imports, but never entered in sys.modules.
    spec = importlib.util.spec_from_file_location(f"rednet.tools.{name}", path) if path.is_file() else \
        importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# What a copy of the sources leaves out: environments, run outputs, caches, build leftovers, weights.
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                      ".pytest_cache", "*.onnx", "*.pt2", "*.safetensors", "*.pt", "*.pth",
                                      "*.pdparams")
# pip as the tests run it: no index (everything it needs is installed), no version check.
PIP_ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}


def build_sdist(dest: Path) -> Path:
    """The sdist, built with setuptools' PEP 517 backend from a copy of the checkout (a build in place would leave
    rednet.egg-info in it), into ``dest``."""
    src = dest / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCES)
    built = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                            "print(build_meta.build_sdist(sys.argv[1]))", str(dest)], cwd=src, env=PIP_ENV,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    return dest / built.stdout.split()[-1]


def unpack_sdist(sdist: Path, dest: Path) -> Path:
    """The sdist's one top folder, unpacked under ``dest``."""
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    (top,) = dest.iterdir()
    return top


def build_wheel(tree: Path, dest: Path) -> Path:
    """The wheel of the source tree ``tree`` (an unpacked sdist, as ``python -m build`` makes it), into ``dest``."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(dest), str(tree)], env=PIP_ENV, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dest.glob("rednet-*.whl")
    return wheel


def read_only_dir(tmp_path: Path) -> Path:
    """``tmp_path/ro``, a folder this process cannot write (mode 0555; /sys when root ignores the mode)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").touch()
    except PermissionError:
        return ro
    (ro / "probe").unlink()  # root ignores the mode bits; /sys refuses root as well
    if Path("/sys").is_dir() and _unwritable("/sys"):
        return Path("/sys")
    pytest.skip("no read-only folder to try")


def _unwritable(folder: str) -> bool:
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return True
    return False


# --- what the refusals of several commands are checked with --------------------------------


def fails_cleanly(capsys, tool: str, argv: list[str], pattern: str) -> str:
    """Run ``tools/<tool>.py argv``; assert exit 2 and exactly one ``error:`` line matching ``pattern``."""
    rc = load_tool(tool).main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert rc == 2, captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err
    assert len(errors) == 1, captured.err
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def one_error(capsys) -> str:
    """The one ``error:`` line a command wrote on stderr (asserting there is one, and no traceback)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# A timm model on synthetic data, for the refusals of tools/train.py and tools/eval.py: every case that uses
# it fails before the first step, most before any data is read.
TINY_TRAIN = ["model.name=resnet10t", "model.num_classes=4", "data.dataset=synthetic", "data.img_size=16",
              "data.batch_size=4", "data.workers=0", "data.synthetic_train_size=8", "data.synthetic_val_size=4",
              "train.epochs=1", "train.max_iters_per_epoch=1"]


def train_argv(out, *sets: str) -> list[str]:
    """tools/train.py's arguments for a TINY_TRAIN run into ``out``, with ``sets`` (``key=value``) on top."""
    return ["--config", "digits.yaml", "--output", str(out),
            *[a for item in (*TINY_TRAIN, *sets) for a in ("--set", item)]]


def image_tree(root: Path, broken: tuple[str, ...] = (), per_class: int = 3) -> Path:
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


def digits_cfg(*extra: str):
    """RedNet-26 on scikit-learn's digits at 32 px, with ``extra`` overrides."""
    from rednet.engine import load_config

    return load_config(None, ["model.name=rednet26", "model.num_classes=10", "data.dataset=digits", "data.img_size=32",
                              *extra])


# --- weights in the layouts others publish (models/test_weights.py, tools/test_convert_weights.py) -


def to_paddle(sd: dict[str, torch.Tensor]) -> dict:
    """What PaddleClas publishes: _mean/_variance, no num_batches_tracked, fc as (in, out)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        a = v.detach().cpu().numpy()
        if k == "fc.weight":
            a = np.ascontiguousarray(a.T)
        out[k.replace("running_mean", "_mean").replace("running_var", "_variance")] = a
    out["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(out)}
    return out


def to_mmcls(sd: dict[str, torch.Tensor], meta: object = None) -> dict:
    """The authors' release: backbone./head.fc. prefixes inside state_dict, plus meta."""
    state = {(f"head.{k}" if k.startswith("fc.") else f"backbone.{k}"): v for k, v in sd.items()}
    return {"state_dict": state, "meta": meta if meta is not None else {"epoch": 130, "CLASSES": ("tench",)}}


def write_weights(kind: str, sd: dict, path: Path) -> Path:
    """``sd`` written to ``path`` in the layout ``kind`` (rednet, mmcls, mmcls_legacy, paddle2, paddle4)."""
    from rednet.models import save_weights

    if kind == "rednet":
        save_weights(sd, path)
    elif kind == "mmcls":
        torch.save(to_mmcls(sd), path)
    elif kind == "mmcls_legacy":
        torch.save(to_mmcls(sd), path, _use_new_zipfile_serialization=False)
    elif kind.startswith("paddle"):
        with open(path, "wb") as f:
            pickle.dump(to_paddle(sd), f, protocol=int(kind[-1]))
    else:
        raise AssertionError(kind)
    return path


def with_nonfinite(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``sd`` with 3 NaN or infinite values in 2 tensors."""
    bad = {k: v.clone() for k, v in sd.items()}
    bad["layer1.0.conv1.weight"].view(-1)[:2] = float("nan")
    bad["fc.bias"][7] = float("-inf")
    return bad
