import pytest
import torch

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
