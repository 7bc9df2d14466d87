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

# Inductor's on-disk cache does not key its generated C++ on ATEN_CPU_CAPABILITY: a graph
# compiled with AVX-512 code and found again under ATEN_CPU_CAPABILITY=default is compiled
# without the vector headers and fails ("'at::vec' has not been declared"). Each
# capability gets its own cache, so that the suite runs under any of them on one machine.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"subspace_optim_inductor_{os.environ['ATEN_CPU_CAPABILITY']}")


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
