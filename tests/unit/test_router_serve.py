"""`tiergate serve` end to end: the real command in a subprocess, real artifacts and encoder, fake vLLM tiers."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.artifacts import constant_artifact
from tests.support.procs import FakeProcess, fake_tiers, small_and_large
from tests.support.router_serve import REFUSED_ONCE, RELOADED_ONCE, Serve, serve_refusal
from tests.support.waiting import wait_for, write_atomically


@pytest.fixture(scope="module")
def tiers() -> Iterator[dict[str, FakeProcess]]:
    yield from fake_tiers(small_and_large())


@pytest.mark.slow
def test_serve_with_tier_flags_and_an_artifact_routes(tiers: dict[str, FakeProcess], tmp_path: Path) -> None:
    art = constant_artifact(tmp_path / "router.json", bias=3.0)  # score 0.95 -> strong
    s = Serve(
        "--tier", f"small={tiers['small'].base_url}", "--tier", f"large={tiers['large'].base_url}", "--router", str(art)
    )
    try:
        tier, body = s.chat("anything")
        assert tier == "large"
        assert body["tiergate"]["score"] == pytest.approx(0.9526, abs=1e-3)  # type: ignore[index]
        tier, _ = s.chat("anything", model="small")
        assert tier == "small"
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/metrics") as r:
            metrics = r.read().decode()
        assert 'tiergate_router_requests_total{decision="large",outcome="success",tier="large"} 1.0' in metrics
    finally:
        out = s.stop()
    assert "OpenAI API on http://127.0.0.1:" in out


def test_serve_single_tier_needs_no_classifier(tiers: dict[str, FakeProcess]) -> None:
    s = Serve("--tier", f"only={tiers['small'].base_url}")
    try:
        tier, body = s.chat("hi")
        assert tier == "only"
        assert body["model"] == "small-model"
    finally:
        s.stop()


def policy_doc(small: str, large: str, threshold_bp: int, artifact: Path) -> dict[str, object]:
    return {
        "apiVersion": "tiergate.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "local"},
        "spec": {
            "tiers": [
                {
                    "name": "small",
                    "model": "small-model",
                    "servedModelName": "small-model",
                    "endpoint": {"url": small},
                    "price": {"inputPerMillion": "0.1", "outputPerMillion": "0.3"},
                },
                {
                    "name": "large",
                    "model": "large-model",
                    "servedModelName": "large-model",
                    "endpoint": {"url": large},
                    "price": {"inputPerMillion": 1, "outputPerMillion": 3},
                },
            ],
            "router": {"thresholdBasisPoints": threshold_bp, "classifier": {"path": str(artifact)}},
        },
    }


@pytest.mark.slow
def test_serve_policy_file_hot_reload(tiers: dict[str, FakeProcess], tmp_path: Path) -> None:
    art = constant_artifact(tmp_path / "router.json", bias=0.0)  # score 0.5
    pol = tmp_path / "policy.yaml"
    pol.write_text(yaml.safe_dump(policy_doc(tiers["small"].base_url, tiers["large"].base_url, 6000, art)))
    s = Serve("-f", str(pol))
    try:
        assert s.chat("q")[0] == "small"  # 0.5 < 0.6
        write_atomically(pol, yaml.safe_dump(policy_doc(tiers["small"].base_url, tiers["large"].base_url, 4000, art)))
        wait_for("the new threshold to route to large", lambda: s.chat("q")[0] == "large", interval=0.2)
        # a broken policy is refused and the last good one keeps serving
        write_atomically(
            pol,
            "apiVersion: tiergate.io/v1alpha1\nkind: RoutingPolicy\nmetadata: {name: local}\nspec: {tiers: []}\n",
        )
        # Wait for the watcher to report it has read the broken file, then check what is served.
        wait_for("the broken policy refused", lambda: REFUSED_ONCE in s.metrics(), interval=0.2)
        assert s.chat("q")[0] == "large"
        metrics = s.metrics()
        assert REFUSED_ONCE in metrics
        assert RELOADED_ONCE in metrics
    finally:
        out = s.stop()
    assert "spec.tiers" in out  # the refusal names the field


def test_serve_says_which_policy_sections_it_does_not_act_on(tiers: dict[str, FakeProcess], tmp_path: Path) -> None:
    art = constant_artifact(tmp_path / "router.json", bias=0.0)
    doc = policy_doc(tiers["small"].base_url, tiers["large"].base_url, 6000, art)
    pol = tmp_path / "policy.yaml"
    pol.write_text(yaml.safe_dump(doc))
    s = Serve("-f", str(pol))
    try:
        assert s.chat("q")[0] == "small"
        spec = doc["spec"]
        assert isinstance(spec, dict)
        # Best-of-N is served now (on `large`, which "q" does not go to): no longer reported as ignored.
        spec["bestOfN"] = {"tier": "large", "maxSamples": 4, "rewardModel": {"model": "org/reward"}}
        write_atomically(pol, yaml.safe_dump(doc))
        wait_for("the policy change picked up", lambda: RELOADED_ONCE in s.metrics(), interval=0.2)
        assert s.chat("q")[0] == "small"  # still routed as before
    finally:
        out = s.stop()
    assert "spec.bestOfN" not in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "give -f POLICY.yaml or at least one --tier"),
        (["--tier", "small"], "expected NAME=BASE_URL"),
        (["--tier", "small=http://127.0.0.1:1/v2"], "must be an OpenAI-compatible base URL ending in /v1"),
        (["--tier", "a=http://127.0.0.1:1/v1", "--tier", "a=http://127.0.0.1:2/v1"], "given twice"),
        (["-f", "/nonexistent/policy.yaml"], "cannot read"),
        (
            ["--tier", "a=http://127.0.0.1:1/v1", "--tier", "b=http://127.0.0.1:2/v1", "--router", "/nope.json"],
            "cannot load router artifact",
        ),
    ],
)
def test_serve_bad_arguments_fail_clearly(args: list[str], needle: str) -> None:
    assert needle in serve_refusal(*args)
