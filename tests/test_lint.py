"""Lint is part of the test suite, so CI keeps the code base clean: ruff (rules in pyproject.toml), and the
package's layering: each package imports only packages below it, and nothing reaches into another package's
private modules or another object's private attributes."""

import ast
import pathlib
import subprocess
import sys

import pytest
from e2e import REPO

# Lower layers know nothing of higher ones; packages in one layer do not import each other.
LAYERS = {
    "files": 0,
    "config": 1, "safetensors_io": 1, "optim": 1,
    "sharding": 1.5,  # above config: its `mesh` section is a config Section; below everything that lays out arrays
    "data": 2, "model": 2, "geometry": 2, "sae": 2, "stats": 2, "crosscoder": 2.5,
    "lora": 3,
    "corpus": 4, "train": 4,
    "analysis": 5,
    "report": 6,
    "study": 7,
    "stages": 8,
    "cli": 9,
}


def test_ruff_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "lgeo_jax", "tests", "scripts"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]


def _imported(node: ast.AST) -> list[str]:
    """Dotted names a statement imports (`from a.b import c` counts as `a.b.c`, so `from lgeo_jax.x import _y`
    is seen as private too)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [f"{node.module}.{a.name}" for a in node.names]
    return []


def layer_violations(package_root: pathlib.Path) -> list[str]:
    """Every layering problem under `package_root` (the `lgeo_jax` directory), one line each."""
    problems = []
    for path in sorted(package_root.rglob("*.py")):
        parts = path.relative_to(package_root).with_suffix("").parts
        if parts == ("__init__",):
            continue  # the root's curated face re-exports from every layer
        own = parts[0]
        where = f"lgeo_jax/{'/'.join(parts)}.py"
        if own not in LAYERS:
            problems.append(f"{where}: package '{own}' is not in the layer table of tests/test_lint.py; add it")
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _imported(node):
                bits = name.split(".")
                if bits[0] != "lgeo_jax":
                    continue
                if len(bits) == 1 or bits[1] == "__init__":
                    problems.append(f"{where}:{node.lineno}: imports the root package lgeo_jax (it imports everything)")
                    continue
                other = bits[1]
                if other == own:
                    continue
                if other not in LAYERS:
                    problems.append(f"{where}:{node.lineno}: imports unknown package lgeo_jax.{other}")
                elif LAYERS[other] >= LAYERS[own]:
                    problems.append(f"{where}:{node.lineno}: {own} (layer {LAYERS[own]}) imports {other} "
                                    f"(layer {LAYERS[other]}); only lower layers may be imported")
                private = [b for b in bits[2:] if b.startswith("_") and not b.startswith("__")]
                if private:
                    problems.append(f"{where}:{node.lineno}: imports {name}, a private name of lgeo_jax.{other}")
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                problems.append(f"{where}:{node.lineno}: uses private attribute .{node.attr} of another object")
    return problems


def test_package_layering():
    assert layer_violations(REPO / "lgeo_jax") == []


@pytest.mark.parametrize("planted, expected", [
    ("from lgeo_jax.stages._layout import records_path\n", "a private name of lgeo_jax.stages"),
    ("from lgeo_jax.config import _convert\n", "a private name of lgeo_jax.config"),
    ("from lgeo_jax.analysis import AnalysisConfig\n", "sae (layer 2) imports analysis (layer 5)"),
    ("import lgeo_jax.model\n", "sae (layer 2) imports model (layer 2)"),
    ("def f(model):\n    return model._prepare\n", "uses private attribute ._prepare"),
])
def test_layering_check_catches_a_planted_violation(tmp_path, planted, expected):
    import shutil

    copy = tmp_path / "lgeo_jax"
    shutil.copytree(REPO / "lgeo_jax", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "sae" / "_planted.py").write_text(planted)
    found = layer_violations(copy)
    assert found and all(f.startswith("lgeo_jax/sae/_planted.py:") for f in found), found
    assert any(expected in f for f in found), found
