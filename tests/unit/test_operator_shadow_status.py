"""status.shadow: the routers' shadow judging counters (judged pairs, agreement, reward gap sums) read like the
observed mix, summed over replicas and a window, restarts handled, and the windowed PGR per artifact. The router's
own Shadower accounts the judged pairs and renders what the operator parses: no hand-written metrics text."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from tiergate.api.policy import RoutingPolicy, parse_policy
from tiergate_operator.observed_mix import Counts, MixWindow, PodRead, RouterSample, mix_report, parse_metrics
from tiergate_operator.status import compute_status
from tiergate_router.shadow import CANARY, PRIMARY, Shadower, ShadowPlan

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"
STARTED = 1_700_000_000.0


def policy(*, shadow: bool = True, canary: bool = False) -> RoutingPolicy:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update({"namespace": "ns", "uid": "u", "generation": 3})
    if shadow:
        doc["spec"]["shadow"] = {
            "mode": "Mirror",
            "baselineTier": "large",
            "sampleRateBasisPoints": 500,
            "rewardUrl": "http://reward:8000",
        }
    if canary:
        doc["spec"]["router"]["canary"] = {"classifier": {"path": "/models/b.json"}, "shareBasisPoints": 2000}
    return parse_policy(doc)


class Router:
    """One router replica's shadow accounting, as it runs after each judged pair."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The dispatcher is only used for the background calls, not for accounting a judged pair.
        self.shadower = Shadower(cast(Any, None), self.registry)

    def judged(self, decided: str, r_cheap: float, r_base: float, artifact: str = PRIMARY) -> None:
        """A pair judged: the router chose `decided` (large: the baseline, paired with the cheapest tier)."""
        plan = ShadowPlan("Mirror", "large", decided, decided, "small" if decided == "large" else "large", artifact)
        self.shadower._account(plan, "small", "large", r_cheap, r_base)

    def sample(self) -> RouterSample:
        return dataclasses.replace(parse_metrics(generate_latest(self.registry).decode()), started=STARTED)

    def pgr_gauge(self, artifact: str = PRIMARY) -> float | None:
        return self.registry.get_sample_value("tiergate_router_shadow_pgr_estimate", {"artifact": artifact})


def shadow_of(p: RoutingPolicy, totals: Counts) -> dict[str, Any] | None:
    return mix_report(p, totals, None, 1).shadow_status()


def by_artifact(st: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    assert st is not None
    return {a["artifact"]: a for a in st["artifacts"]}


def test_one_router_the_windowed_figures_match_its_own_estimate() -> None:
    r = Router()
    r.judged("small", 1.0, 1.0)  # agrees, gap 0
    r.judged("small", 0.0, 2.0)  # disagrees, gap 2 not recovered
    r.judged("large", 1.0, 3.0)  # the router sent it to the baseline: gap 2 recovered
    r.judged("large", 2.5, 2.0)  # the cheap answer scored higher: gap -0.5, recovered
    counts = r.sample().counts
    (row,) = shadow_of(policy(), counts)["artifacts"]  # type: ignore[index]
    gauge = r.pgr_gauge()
    assert gauge is not None
    assert gauge == pytest.approx(1.5 / 3.5)
    assert row == {"artifact": PRIMARY, "judged": 4, "agreementBasisPoints": 5000, "pgrBasisPoints": round(gauge * 1e4)}


def test_replicas_add_up_and_a_restart_counts_from_zero() -> None:
    a, b = Router(), Router()
    w = MixWindow()
    p = policy()
    window = float(p.spec.observed_mix.window_seconds)

    def observe(now: float, *reads: PodRead) -> dict[str, Any]:
        return by_artifact(shadow_of(p, w.observe(now, reads, window)))[PRIMARY]

    # History before the operator started is a baseline only.
    a.judged("small", 0.0, 4.0)
    assert observe(0.0, PodRead("a", 0, False, a.sample()), PodRead("b", 0, False, b.sample())) == {
        "artifact": PRIMARY,
        "judged": 0,
    }
    # Replica a sends everything to the baseline (recovers), replica b nothing: the PGR of both is the ratio of the
    # summed gaps, not the mean of the two replicas' gauges.
    a.judged("large", 0.0, 1.0)
    b.judged("small", 0.0, 3.0)
    b.judged("small", 1.0, 1.0)
    row = observe(10.0, PodRead("a", 0, False, a.sample()), PodRead("b", 0, False, b.sample()))
    assert row == {"artifact": PRIMARY, "judged": 3, "agreementBasisPoints": 5000, "pgrBasisPoints": 2500}
    # Replica b restarts: its counters begin at zero; what it counts after the restart is all new.
    b2 = Router()
    b2.judged("large", 0.0, 1.0)
    row = observe(20.0, PodRead("a", 0, False, a.sample()), PodRead("b", 0, False, b2.sample()))
    assert row == {"artifact": PRIMARY, "judged": 4, "agreementBasisPoints": 5000, "pgrBasisPoints": 4000}
    # Past the window, only the last increase remains.
    row = observe(20.0 + window, PodRead("a", 0, False, a.sample()), PodRead("b", 0, False, b2.sample()))
    assert row == {"artifact": PRIMARY, "judged": 0}


def test_status_carries_the_artifacts_side_by_side_and_nothing_without_shadowing() -> None:
    r = Router()
    r.judged("small", 0.0, 1.0, artifact=CANARY)
    r.judged("large", 0.0, 1.0)
    counts = r.sample().counts
    st = compute_status(policy(canary=True), {}, [], mix=mix_report(policy(canary=True), counts, None, 1))
    assert st["shadow"]["windowSeconds"] == 300
    rows = by_artifact(st["shadow"])
    assert rows[PRIMARY] == {"artifact": PRIMARY, "judged": 1, "pgrBasisPoints": 10000}
    assert rows[CANARY] == {"artifact": CANARY, "judged": 1, "agreementBasisPoints": 0, "pgrBasisPoints": 0}
    assert st["shadowMode"] == "Mirror"
    # Without a canary only the primary artifact is reported; without spec.shadow, no status.shadow at all.
    assert list(by_artifact(shadow_of(policy(), counts))) == [PRIMARY]
    no_shadow = policy(shadow=False)
    assert "shadow" not in compute_status(no_shadow, {}, [], mix=mix_report(no_shadow, counts, None, 1))
    # Every figure is an integer: the status has no floats.
    assert all(isinstance(v, int) for row in rows.values() for k, v in row.items() if k != "artifact")
