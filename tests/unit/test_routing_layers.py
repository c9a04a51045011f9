"""Run-time vs offline routing code: `tiergate.routing` is what the router image carries (numpy and the standard
library at import), `tiergate.training` the offline toolchain on top of it; neither the run-time package nor the
router imports training code."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "tiergate" / "routing"
HEAVY = {"torch", "transformers", "matplotlib", "tqdm", "sklearn", "scipy", "onnx", "onnxruntime"}


def _imports(path: Path, *, module_level_only: bool) -> set[str]:
    """Dotted names imported by `path`: every import, or only those run at import time (not inside a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes: list[ast.AST] = []
    if module_level_only:
        stack: list[ast.AST] = list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            # `if TYPE_CHECKING:` blocks never run.
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                stack.extend(node.orelse)
                continue
            nodes.append(node)
            stack.extend(ast.iter_child_nodes(node))
    else:
        nodes = list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(RUNTIME.rglob("*.py")), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_runtime_routing_imports_only_numpy_and_the_stdlib_at_import(path: Path) -> None:
    names = _imports(path, module_level_only=True)
    top = {n.split(".")[0] for n in names}
    assert top <= {*sys.stdlib_module_names, "__future__", "numpy", "tiergate"}, sorted(top)
    assert not any(n.startswith("tiergate.training") for n in _imports(path, module_level_only=False))
    assert not {
        n for n in names if n.startswith("tiergate.") and not n.startswith(("tiergate.routing", "tiergate.cache"))
    }


def test_the_router_never_imports_training_code() -> None:
    offenders = [
        f"{p.relative_to(ROOT)}: {sorted(n for n in _imports(p, module_level_only=False) if 'training' in n)}"
        for p in sorted((ROOT / "router_service" / "tiergate_router").rglob("*.py"))
        if any(n.startswith("tiergate.training") for n in _imports(p, module_level_only=False))
    ]
    assert offenders == []


def test_loading_and_applying_an_artifact_pulls_in_nothing_heavy() -> None:
    code = (
        "import sys, json\n"
        "from tiergate.routing.artifact import DEFAULT_MULTI_TIER, load_artifact\n"
        "from tiergate.routing.scorer import Scorer\n"
        "from tiergate.routing.operating_points import cost_weight_for_budget\n"
        "import tiergate_router.artifact_classifier, tiergate_router.decision, tiergate_router.onnx_encoder\n"
        "import numpy as np\n"
        "art = load_artifact(DEFAULT_MULTI_TIER)\n"
        "Scorer(art, None).choose_embeddings(np.zeros((2, art.encoder.dim)), None, ['a', 'b'])\n"
        "cost_weight_for_budget(art.calibration.cost_weights, 1.0)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "operator"), str(ROOT / "router_service")])
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout))
    assert "tiergate.routing.scorer" in loaded
    assert not {m.split(".")[0] for m in loaded} & HEAVY
    assert not {m for m in loaded if m.startswith("tiergate.training")}
