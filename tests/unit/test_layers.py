"""The layering, written down and checked: the operator and the router never import each other, the shared core
never imports either (tiergate.cli names them only as strings, imported lazily), and none imports the tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "tiergate": ROOT / "tiergate",
    "tiergate_operator": ROOT / "operator" / "tiergate_operator",
    "tiergate_router": ROOT / "router_service" / "tiergate_router",
}
# No product package imports `tests`: the test doubles live there, outside the wheel and the images.
FORBIDDEN = {
    "tiergate": {"tiergate_operator", "tiergate_router", "tests"},
    "tiergate_operator": {"tiergate_router", "torch", "transformers", "tests"},
    "tiergate_router": {"tiergate_operator", "kopf", "tests"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_package_respects_its_layer(package: str) -> None:
    offenders = []
    for path in sorted(PACKAGES[package].rglob("*.py")):
        bad = _imports(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert offenders == []


def test_the_operator_folder_cannot_shadow_the_standard_library() -> None:
    import operator

    assert operator.__file__ is not None
    assert "site-packages" not in operator.__file__
    assert str(ROOT) not in operator.__file__
    assert not (ROOT / "operator" / "__init__.py").exists()
