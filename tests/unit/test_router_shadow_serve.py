"""`tiergate serve` with shadow routing and a canary artifact: the real command in a subprocess, real artifacts and
encoder, fake vLLM tiers, the official openai client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from tests.support.artifacts import constant_artifact
from tests.support.procs import FakeProcess, fake_tiers, small_and_large
from tests.support.router_serve import Serve, serve_refusal
from tests.unit.test_router_serve import policy_doc
from tiergate_router.shadow import in_canary


@pytest.fixture(scope="module")
def tiers() -> Iterator[dict[str, FakeProcess]]:
    yield from fake_tiers(small_and_large())


def _decisions(port: int, ids: list[str]) -> list[tuple[str, str]]:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    out = []
    for rid in ids:
        raw = client.chat.completions.with_raw_response.create(
            model="tiergate", messages=[{"role": "user", "content": "q"}], extra_headers={"x-request-id": rid}
        )
        raw.parse()
        assert raw.headers["x-request-id"] == rid
        out.append((raw.headers["x-tiergate-tier"], raw.headers["x-tiergate-decision"]))
    return out


@pytest.mark.slow
def test_serve_flags_baseline_shadow_and_a_canary(tiers: dict[str, FakeProcess], tmp_path: Path) -> None:
    primary = constant_artifact(tmp_path / "primary.json", bias=-3.0)  # score 0.05: small
    canary = constant_artifact(tmp_path / "canary.json", bias=3.0)  # score 0.95: large
    s = Serve(
        *("--tier", f"small={tiers['small'].base_url}", "--tier", f"large={tiers['large'].base_url}"),
        *("--router", str(primary), "--canary-artifact", str(canary), "--canary-share-bp", "2000"),
        *("--shadow", "Baseline=large"),
    )
    try:
        ids = [f"serve-{i}" for i in range(60)]
        got = _decisions(s.port, ids)
        assert all(tier == "large" for tier, _ in got)  # Baseline: the baseline tier answers everything
        assert [d for _, d in got] == ["large" if in_canary(rid, 2000) else "small" for rid in ids]
        metrics = s.metrics()
        assert metrics.count("tiergate_router_classifier_info{") == 2  # both artifacts reported
        canary_n = sum(in_canary(rid, 2000) for rid in ids)
        assert f'tiergate_router_artifact_decisions_total{{artifact="canary",tier="large"}} {canary_n:.1f}' in metrics
    finally:
        out = s.stop()
    assert "canary" in out
    assert "shadow Baseline against large" in out


@pytest.mark.slow
def test_serve_policy_with_shadow_and_canary(tiers: dict[str, FakeProcess], tmp_path: Path) -> None:
    primary = constant_artifact(tmp_path / "primary.json", bias=-3.0)
    canary = constant_artifact(tmp_path / "canary.json", bias=3.0)
    doc = policy_doc(tiers["small"].base_url, tiers["large"].base_url, 5000, primary)
    spec = doc["spec"]
    assert isinstance(spec, dict)
    spec["shadow"] = {"mode": "Baseline", "baselineTier": "large", "sampleRateBasisPoints": 0}
    spec["router"]["canary"] = {"classifier": {"path": str(canary)}, "shareBasisPoints": 10000}
    pol = tmp_path / "policy.yaml"
    pol.write_text(yaml.safe_dump(doc))
    s = Serve("-f", str(pol))
    try:
        assert _decisions(s.port, ["a", "b"]) == [("large", "large"), ("large", "large")]  # all canary, baseline
    finally:
        s.stop()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--shadow", "Sideways=large"], "expected MODE=BASELINE_TIER"),
        (["--shadow", "Mirror=large"], "needs a reward model"),
        (["--shadow", "Baseline=huge"], "unknown tier 'huge'"),
        (["--canary-share-bp", "20000", "--canary-artifact", "/x.json"], "outside 0..10000"),
        (["--canary-share-bp", "2000"], "give both"),
    ],
)
def test_serve_bad_shadow_flags_fail_clearly(args: list[str], needle: str) -> None:
    # One tier: no artifact is loaded, so the flags' own errors are what stops the command.
    stderr = serve_refusal("--tier", "large=http://127.0.0.1:2/v1", *args)
    assert needle in stderr, stderr
