import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rednet

from .helpers import PIP_ENV, build_sdist, build_wheel, unpack_sdist

# Tests run many tiny ops: on a 2-core machine with anything else running, two OpenMP
# threads spin against each other and a small forward pass ran 40x slower than on one.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The package as it ships, built once per session for every test that needs it.


@pytest.fixture(scope="session")
def sdist(tmp_path_factory) -> Path:
    """The source distribution (``rednet-<version>.tar.gz``)."""
    pytest.importorskip("setuptools", minversion="77")  # the build backend pyproject.toml names
    return build_sdist(tmp_path_factory.mktemp("sdist"))


@pytest.fixture(scope="session")
def wheel(sdist, tmp_path_factory) -> Path:
    """The wheel, built from the unpacked sdist (so the sdist holds all a wheel needs)."""
    tree = unpack_sdist(sdist, tmp_path_factory.mktemp("sdist-for-wheel"))
    return build_wheel(tree, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed alone into a folder (``pip install --target``): the package, and the scripts in bin/."""
    site = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheel)], env=PIP_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return site


# Weights with a known output, shared by the tests of the weights files (models/test_weights.py) and of the
# command that converts them (tools/test_convert_weights.py): built once.


@pytest.fixture(scope="session")
def trained():
    """A rednet26 with non-trivial weights and BN statistics, its input and output."""
    torch.manual_seed(0)
    model = rednet.create_model("rednet26")
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.dim() == 1:  # BN scales and shifts (the zero-initialised last ones too), biases
                t.uniform_(0.5, 1.0) if name.endswith("weight") and "fc" not in name else t.normal_(0, 0.05)
        # Involution is quadratic in its input, so random statistics blow up within a few
        # blocks; calibrate real ones instead (momentum None: a plain average).
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64))
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    assert torch.isfinite(y).all() and y.std() > 0
    return model.state_dict(), x, y
