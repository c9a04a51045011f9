"""The committed gRPC stubs are exactly what scripts/gen_protos.py makes from protos/ (CI fails on drift)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "router_service" / "tiergate_router" / "_proto"


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(out)], check=True, capture_output=True
    )
    fresh = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    committed = {p.name: p.read_text() for p in COMMITTED.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "stub file set differs: run `python scripts/gen_protos.py`"
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} drifted from protos/: run `python scripts/gen_protos.py`"


def test_stubs_import_as_part_of_the_router_package() -> None:
    from tiergate_router._proto import router_pb2, router_pb2_grpc

    assert router_pb2.DESCRIPTOR.package == "tiergate.v1"
    assert router_pb2.DESCRIPTOR.name == "tiergate/v1/router.proto"
    assert hasattr(router_pb2_grpc, "RouterServiceServicer")
