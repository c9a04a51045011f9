"""Issue 11, "Must show": for the shipped 9-tier artifact, `tiergate calibrate --budget B` and a router serving a policy
with `budgetPerMillion: B` choose the same cost weight for every B in 0.20 .. 1.99 $/Mtok.

Both sides are reached the way users reach them: calibrate through its command module (and, for a handful of
budgets, the real CLI in a subprocess, so a CLI that printed something else would fail), the router through
`from_policy` with a loaded classifier, the path a policy load and reload take. Both are also checked against the
documented rule computed here from the raw JSON (best quality within the budget, the smaller weight on ties), so
a side that bypassed `operating_points.cost_weight_for_budget` with another rule fails on the budgets where the
rules differ (54 of these 180 for "smallest weight that fits", the router's rule before issue 11).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tiergate.api.policy import RoutingPolicy
from tiergate.routing.artifact import DEFAULT_MULTI_TIER, RouterArtifact, load_artifact
from tiergate.routing.errors import NoOperatingPoint
from tiergate.routing.scorer import Scorer
from tiergate.training import cmd_calibrate
from tiergate_router.artifact_classifier import LoadedClassifier
from tiergate_router.classifier import MicroBatcher
from tiergate_router.config import ConfigError, from_policy

BUDGETS = [f"{i / 100:.2f}" for i in range(20, 200)]
ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _raw_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(DEFAULT_MULTI_TIER.read_text(encoding="utf-8"))["calibration"]
    return rows


@functools.cache
def _artifact() -> RouterArtifact:
    return load_artifact(DEFAULT_MULTI_TIER)


def _documented_rule(budget: float) -> int | None:
    rows = _raw_rows()
    fits = [r for r in rows if r["cost"] <= budget + 1e-12]
    if not fits:
        return None
    return int(max(fits, key=lambda r: (r["quality"], -r["cost_weight_bp"]))["cost_weight_bp"])


def _router_weight(budget: str) -> int | None:
    art = _artifact()
    loaded = LoadedClassifier(MicroBatcher(lambda prompts: []), DEFAULT_MULTI_TIER, art, Scorer(art, None))
    # The artifact's own prices (0.2 and 1.8 $/Mtok), which its calibration was measured at.
    tiers = [
        {
            "name": "gemma",
            "model": "gemma-2-9b-it",
            "endpoint": {"url": "http://a/v1"},
            "price": {"inputPerMillion": "0.1", "outputPerMillion": "0.1"},
        },
        {
            "name": "nemo",
            "model": "llama-3.1-nemotron-51b-instruct",
            "endpoint": {"url": "http://b/v1"},
            "price": {"inputPerMillion": "0.9", "outputPerMillion": "0.9"},
        },
    ]
    doc: dict[str, Any] = {
        "apiVersion": "tiergate.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "budget"},
        "spec": {"tiers": tiers, "router": {"budgetPerMillion": budget}},
    }
    policy = RoutingPolicy.model_validate(doc)
    if _documented_rule(float(budget)) is None:
        with pytest.raises(
            ConfigError, match=rf"budgetPerMillion {float(budget)}: .*no calibrated operating point costs"
        ):
            from_policy(policy, multi=loaded)
        return None
    cfg = from_policy(policy, multi=loaded)
    assert cfg.multi_tier is not None
    return cfg.multi_tier.cost_weight_bp


def _calibrate_weight(budget: str) -> int | None:
    try:
        table = _artifact().calibration
        return cmd_calibrate.choose_multi_tier(table, float(budget)).cost_weight_bp
    except NoOperatingPoint:
        return None


def test_calibrate_and_router_choose_the_same_weight_for_every_budget() -> None:
    chosen = {}
    for b in BUDGETS:
        want = _documented_rule(float(b))
        assert _calibrate_weight(b) == want, f"calibrate, budget {b}"
        assert _router_weight(b) == want, f"router, budget {b}"
        chosen[b] = want
    # The range exercises real choices and the refusal: 0.20 is below the cheapest calibrated point (0.206).
    assert chosen["0.20"] is None
    assert len({w for w in chosen.values() if w is not None}) >= 10
    # A larger budget never buys less quality.
    rows = {r["cost_weight_bp"]: r for r in _raw_rows()}
    qualities = [rows[w]["quality"] for w in chosen.values() if w is not None]
    assert qualities == sorted(qualities)


@pytest.mark.parametrize("budget", ["0.20", "0.35", "0.50", "0.87", "1.25", "1.99"])
def test_the_calibrate_cli_prints_the_weight_the_router_serves(budget: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "operator"), str(ROOT / "router_service")])
    r = subprocess.run(
        [sys.executable, "-m", "tiergate.cli", "calibrate", "--router", str(DEFAULT_MULTI_TIER), "--budget", budget],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    want = _router_weight(budget)
    if want is None:
        assert r.returncode == 2
        assert "no calibrated operating point costs at most 0.2 $/Mtok (cheapest 0.206 $/Mtok)" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    snippet = yaml.safe_load(r.stdout)  # the comment lines are YAML comments
    assert snippet["kind"] == "RoutingPolicy"
    assert snippet["spec"]["router"] == {"costWeightBasisPoints": want}


def test_calibrate_and_router_agree_on_strong_share_targets() -> None:
    from tests.support.routing import tiny_artifact
    from tiergate.routing.artifact import DEFAULT_TWO_TIER

    art = load_artifact(DEFAULT_TWO_TIER)
    loaded = LoadedClassifier(MicroBatcher(lambda prompts: []), DEFAULT_TWO_TIER, art, Scorer(art, None))
    for share_bp in range(0, 10001, 50):
        want = cmd_calibrate.choose_two_tier(art.calibration, share_bp / 10000, None).threshold_bp
        assert loaded.threshold_for_share_bp(share_bp) == want
    # No threshold keeps to the share (the tiny table's lowest is 0.2): refused as a policy error, not "route nothing".
    tiny = tiny_artifact()
    small = LoadedClassifier(MicroBatcher(lambda prompts: []), Path("tiny.json"), tiny, Scorer(tiny, None))
    with pytest.raises(ConfigError, match=r"targetStrongShareBasisPoints 1000: .*lowest calibrated 0\.2000"):
        small.threshold_for_share_bp(1000)
    with pytest.raises(NoOperatingPoint):
        cmd_calibrate.choose_two_tier(tiny.calibration, 0.1, None)
