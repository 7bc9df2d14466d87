import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU the Triton kernels run in Triton's interpreter (set before any kernel module
# is imported: the decorator reads it). Nothing else is affected: kernels run only where the
# tests ask for them (SUBSPACE_OPTIM_KERNELS=triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    from subspace_optim._warn import reset_warnings

    reset_warnings()
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
