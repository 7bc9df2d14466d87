"""The installed package must contain every subpackage of the source tree."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_every_subpackage_is_listed_in_pyproject():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    src = ROOT / "src"
    found = {
        ".".join(init.parent.relative_to(src).parts) for init in src.rglob("__init__.py")
    } | {"subspace_optim.kernels"}
    assert found == listed


def test_kernels_are_importable_as_a_subpackage():
    import subspace_optim.kernels  # noqa: F401
