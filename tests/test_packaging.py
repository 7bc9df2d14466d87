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
    } | {"subspace_optim.kernels", "subspace_optim.configs"}
    assert found == listed


def test_kernels_are_importable_as_a_subpackage():
    import subspace_optim.kernels  # noqa: F401


def _run(code, cwd, env=None):
    import os
    import subprocess

    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_nothing_named_kernels_is_importable_from_the_repository_root():
    """bitsandbytes and transformers import Hugging Face's ``kernels``; the repository's
    kernels/ folder must not answer to that name (it did: ``cannot import name
    'get_kernel' from 'kernels'``, and transformers' probe, which imports the name, failed
    to import LlamaForCausalLM when the folder raised ModuleNotFoundError)."""
    probe = ("import kernels; assert kernels.__file__ is None and not hasattr(kernels, 'adamw')\n"
             "try:\n    from kernels import get_kernel\nexcept ImportError:\n    print('absent')")
    result = _run(probe, ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "absent"
    result = _run("from transformers import LlamaForCausalLM; import bitsandbytes", ROOT)
    assert result.returncode == 0, result.stderr


def test_a_real_kernels_package_still_wins_from_the_repository_root(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("def get_kernel(): return 'hub'\n")
    result = _run("from kernels import get_kernel; print(get_kernel())", ROOT,
                  env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hub"


def test_a_wheel_install_finds_its_configs_from_any_directory(tmp_path):
    """A non-editable install could not run the default config (known: [])."""
    import subprocess
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "subspace_optim/configs/train/default.yaml" in names
    assert "subspace_optim/configs/model/llama_7b.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import subspace_optim.train.config as c; cfg = c.load_config(None); "
            "print(c.CONFIG_ROOT, cfg.model, cfg.model_config.hidden_size)")
    result = _run(code, elsewhere, env={"PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"})
    assert result.returncode == 0, result.stderr
    root, model, hidden = result.stdout.split()
    assert root.startswith(str(site)) and (model, hidden) == ("tiny", "128")
