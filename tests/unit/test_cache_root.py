"""One cache-root environment variable: `TIERGATE_CACHE` moves every cache tiergate keeps, through one helper."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tiergate.cache import cache_root

ROOT = Path(__file__).resolve().parents[2]


def _users() -> dict[str, Path]:
    from tiergate.devcluster.build import default_cache_dir as devcluster_dir
    from tiergate.training.embeddings import default_cache_dir as embeddings_dir
    from tiergate_router.demo.models import cache_root as demo_models_dir
    from tiergate_router.onnx_encoder import cache_dir as onnx_dir

    return {
        "devcluster": devcluster_dir(),
        "embeddings": embeddings_dir(),
        "onnx": onnx_dir(),
        "demo models": demo_models_dir(),
    }


def test_every_cache_lives_under_tiergate_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERGATE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    users = _users()
    assert users["devcluster"] == tmp_path / "c"
    assert users["embeddings"] == tmp_path / "c" / "embeddings"
    assert users["onnx"] == tmp_path / "c" / "onnx"
    assert users["demo models"] == tmp_path / "c" / "models"


def test_without_the_variable_the_xdg_cache_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIERGATE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "tiergate"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "tiergate"
    assert all(p.is_relative_to(tmp_path / "home" / ".cache" / "tiergate") for p in _users().values())


def test_no_code_reads_another_cache_variable() -> None:
    # Only tiergate/cache.py reads the variable, and no second name (TIERGATE_CACHE_DIR was one) splits the caches.
    reads = re.compile(r"""(environ\.get|getenv|environ\[)\(?\s*["']TIERGATE_CACHE""")
    offenders = []
    for folder in ("tiergate", "operator", "router_service", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "test_cache_root.py":
                continue
            text = path.read_text(encoding="utf-8")
            if "TIERGATE_CACHE_DIR" in text or (reads.search(text) and path != ROOT / "tiergate" / "cache.py"):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
