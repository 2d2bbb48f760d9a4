"""Layering: the model layer never imports the parallel or training layers, and errors.py imports nothing of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "safety_jax"
FORBIDDEN_IN_MODEL = ("safety_jax.parallel", "safety_jax.train")


def _imports(path: Path, root: Path = PACKAGE) -> list[str]:
    """Every module a file of package ``root`` imports (lazy imports included), as absolute dotted names."""
    package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def _is_within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


@pytest.mark.parametrize("path", sorted((PACKAGE / "model").rglob("*.py")), ids=lambda p: p.name)
def test_model_layer_does_not_import_parallel_or_train(path):
    bad = [n for n in _imports(path) if any(_is_within(n, m) for m in FORBIDDEN_IN_MODEL)]
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}; the model layer takes shardings as data"


def test_errors_module_imports_nothing_from_the_package():
    bad = [n for n in _imports(PACKAGE / "errors.py") if _is_within(n, "safety_jax")]
    assert not bad, f"safety_jax/errors.py imports {bad}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    fake = tmp_path / "safety_jax" / "model" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..train import trainer\n    import safety_jax.parallel\n")
    names = _imports(fake, tmp_path / "safety_jax")
    assert "safety_jax.train.trainer" in names and "safety_jax.parallel" in names
