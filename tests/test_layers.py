"""The layers point one way: ``distributed/``, ``layerwise.py`` and ``train/`` use
``optim/``; ``optim/`` uses ``functional/``, ``projectors/``, ``ops/``, ``rules/``,
``quant/``; nothing points back up. Checked on the source (an AST scan of every import,
function-level ones included), so a lazy import inside a function cannot hide a circle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "subspace_optim"

# layer -> what it must not import
FORBIDDEN = {
    "optim": ("distributed", "train", "layerwise", "cli", "named_groups", "grads"),
    "functional": ("optim", "distributed", "train", "layerwise"),
    "projectors": ("optim", "distributed", "train", "layerwise", "functional"),
    "ops": ("optim", "distributed", "train", "layerwise", "functional", "projectors"),
    "rules": ("optim", "distributed", "train", "layerwise", "functional", "projectors"),
    "quant": ("optim", "distributed", "train", "layerwise", "functional", "projectors"),
}


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """Absolute names of the modules ``path`` imports (relative ones resolved)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return out


@pytest.mark.parametrize("layer", FORBIDDEN)
def test_no_layer_imports_a_layer_above_it(layer):
    bad = []
    for path in sorted((PACKAGE / layer).glob("*.py")):
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] == "subspace_optim" and len(parts) > 1 and parts[1] in FORBIDDEN[layer]:
                bad.append(f"{path.name}:{line} imports {name}")
    assert not bad, bad


def test_the_scan_sees_relative_and_lazy_imports():
    """The scanner itself: a relative import inside a function is resolved and found (the
    circle this test guards against was such an import in optim/base.py)."""
    engine = PACKAGE / "optim" / "engine.py"
    assert "subspace_optim.optim.sharded" in {name for _, name in _imports(engine)}
    lazy = "def f():\n    from ..distributed import fsdp\n"
    assert "subspace_optim.distributed.fsdp" in {name for _, name in _imports(engine, lazy)}
