"""A real `tiergate serve` says which classifier it serves, refuses a reload that changes a start-time input, and
serves the new artifact once restarted (what the operator's rollout does in a cluster)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.artifacts import constant_artifact
from tests.support.procs import FakeProcess, fake_tiers, small_and_large
from tests.support.router_serve import Serve


@pytest.fixture(scope="module")
def tiers() -> Iterator[dict[str, FakeProcess]]:
    yield from fake_tiers(small_and_large())


PRICE = {"inputPerMillion": "1", "outputPerMillion": "1"}


def _policy(tiers: dict[str, FakeProcess], artifact: Path) -> str:
    doc = {
        "apiVersion": "tiergate.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "local"},
        "spec": {
            "tiers": [
                {
                    "name": n,
                    "model": f"{n}-model",
                    "servedModelName": f"{n}-model",
                    "endpoint": {"url": tiers[n].base_url},
                    "price": PRICE,
                }
                for n in ("small", "large")
            ],
            "router": {"thresholdBasisPoints": 5000, "classifier": {"path": str(artifact)}},
        },
    }
    return yaml.safe_dump(doc)


def _info(s: Serve) -> list[str]:
    return [line for line in s.metrics().splitlines() if line.startswith("tiergate_router_classifier_info{")]


@pytest.mark.slow
def test_serve_reports_its_classifier_and_refuses_to_swap_it_on_reload(
    tiers: dict[str, FakeProcess], tmp_path: Path
) -> None:
    a = constant_artifact(tmp_path / "a.json", bias=-3.0)  # score 0.05: small
    b = constant_artifact(tmp_path / "b.json", bias=3.0)  # score 0.95: large
    sha_a, sha_b = (json.loads(p.read_text())["sha256"] for p in (a, b))
    pol = tmp_path / "policy.yaml"
    pol.write_text(_policy(tiers, a))
    s = Serve("-f", str(pol))
    try:
        assert _info(s) == [f'tiergate_router_classifier_info{{kind="two_tier",sha256="{sha_a}",source="{a}"}} 1.0']
        assert s.chat("q")[0] == "small"
        pol.write_text(_policy(tiers, b))
        deadline = time.monotonic() + 10
        while 'tiergate_router_policy_reloads_total{result="error"} 1.0' not in s.metrics():
            assert time.monotonic() < deadline, "policy change not looked at"
            time.sleep(0.2)
        assert s.chat("q")[0] == "small"  # the last good policy and its classifier keep serving
        assert f'sha256="{sha_a}"' in _info(s)[0]
    finally:
        out = s.stop()
    assert f"serving classifier {a} (two_tier, sha256 {sha_a})" in out
    assert "spec.router.classifier changed; the router reads that only at start" in out
    # Restarted (the operator's rollout): the new artifact serves, and says so.
    s = Serve("-f", str(pol))
    try:
        assert f'sha256="{sha_b}"' in _info(s)[0]
        assert s.chat("q")[0] == "large"
    finally:
        s.stop()
