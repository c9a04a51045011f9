"""The observed tier mix: parsing a router's /metrics, the window over several replicas and restarts, the report
and its MixDrift verdict, and how the status carries them. Real router metrics, not hand-written text: the router's
own RouterMetrics renders what the operator parses."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from tiergate.api.policy import RoutingPolicy, parse_policy
from tiergate_operator.observed_mix import (
    MIX_OUTSIDE_BAND,
    MIX_WITHIN_BAND,
    NO_PREDICTION,
    NOT_ENOUGH_TRAFFIC,
    ROUTER_METRICS_UNAVAILABLE,
    Counts,
    MixObserver,
    MixWindow,
    PodRead,
    RouterSample,
    mix_report,
    most_expensive_tier,
    parse_metrics,
)
from tiergate_operator.status import compute_status, status_changed
from tiergate_router.metrics import RouterMetrics

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"


def policy(**observed_mix: int) -> RoutingPolicy:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update({"namespace": "ns", "uid": "u", "generation": 3})
    if observed_mix:
        doc["spec"]["observedMix"] = observed_mix
    return parse_policy(doc)


def rendered(small: int, large: int, *, failed: int = 0, fallbacks: int = 0, predicted: tuple[int, int] | None) -> str:
    m = RouterMetrics()
    if small:
        m.requests.labels("small", "small", "success").inc(small)
    if large:
        m.requests.labels("large", "forced", "success").inc(large)
    if failed:
        m.requests.labels("large", "large", "upstream_error").inc(failed)
    if fallbacks:
        m.fallbacks.labels("small", "large", "upstream_error").inc(fallbacks)
    m.set_predicted_mix(("small", "large"), predicted)
    return m.render().decode()


def sample(small: int, large: int, **kw: Any) -> RouterSample:
    """One read of a router that started at the same time as every other `sample` (restarts are made explicit)."""
    kw.setdefault("predicted", (7000, 3000))
    return dataclasses.replace(parse_metrics(rendered(small, large, **kw)), started=1_700_000_000.0)


def test_parse_reads_served_by_tier_all_requests_fallbacks_and_the_prediction() -> None:
    s = sample(70, 30, failed=5, fallbacks=4)
    assert s.counts.served == {"small": 70.0, "large": 30.0}
    assert s.counts.requests == 105.0
    assert s.counts.fallbacks == 4.0
    assert s.predicted == {"small": 0.7, "large": 0.3}
    assert parse_metrics(rendered(1, 0, predicted=None)).started > 1_700_000_000
    assert parse_metrics(rendered(1, 0, predicted=None)).predicted == {}


def test_window_adds_replicas_and_survives_a_restart() -> None:
    w = MixWindow()
    # The first pass after the operator started: the replicas' counts so far are history (a baseline only).
    assert (
        w.observe(0.0, [PodRead("a", 0, False, sample(50, 50)), PodRead("b", 0, False, sample(10, 0))], 60).served == {}
    )
    # Both replicas serve more; the window holds the increases of both.
    t = w.observe(10.0, [PodRead("a", 0, False, sample(60, 55)), PodRead("b", 0, False, sample(20, 5))], 60)
    assert t.served == {"small": 20.0, "large": 10.0}
    # Replica a restarts (counters from zero, restart count unchanged in the pod yet): its new value is the increase.
    t = w.observe(20.0, [PodRead("a", 0, False, sample(3, 1)), PodRead("b", 0, False, sample(20, 5))], 60)
    assert t.served == {"small": 23.0, "large": 11.0}
    # A container restart the pod reports counts from zero too, even when the counters grew past the old ones.
    t = w.observe(30.0, [PodRead("a", 1, False, sample(80, 60)), PodRead("b", 0, False, sample(20, 5))], 60)
    assert t.served == {"small": 103.0, "large": 71.0}
    # A replica created while we watched counts from zero from its first read; one that did not answer is kept.
    t = w.observe(40.0, [PodRead("a", 1, False, None), PodRead("c", 0, True, sample(4, 4))], 60)
    assert t.served == {"small": 107.0, "large": 75.0}
    # A router process restarted between two reads, its new counters already past the old ones: its start time
    # tells, so nothing is lost.
    before = sample(80, 60)
    w.observe(50.0, [PodRead("a", 1, False, before), PodRead("c", 0, True, sample(4, 4))], 60)
    restarted = RouterSample(sample(90, 70).counts, before.predicted, before.started + 5)
    t = w.observe(55.0, [PodRead("a", 1, False, restarted), PodRead("c", 0, True, sample(4, 4))], 60)
    assert t.served == {"small": 20.0 + 3.0 + 80.0 + 4.0 + 90.0, "large": 10.0 + 1.0 + 60.0 + 4.0 + 70.0}
    # Increases older than the window fall out of it.
    t = w.observe(75.0, [PodRead("a", 1, False, restarted), PodRead("c", 0, True, sample(4, 4))], 60)
    assert t.served == {"small": 3.0 + 80.0 + 4.0 + 90.0, "large": 1.0 + 60.0 + 4.0 + 70.0}
    t = w.observe(100.0, [PodRead("a", 1, False, restarted), PodRead("c", 0, True, sample(4, 4))], 60)
    assert t.served == {"small": 90.0, "large": 70.0}


def test_most_expensive_tier_is_by_price() -> None:
    doc = yaml.safe_load(SAMPLE.read_text())
    assert most_expensive_tier(parse_policy(doc)) == "large"
    doc["spec"]["tiers"][0]["price"] = {"inputPerMillion": "5", "outputPerMillion": "5"}
    assert most_expensive_tier(parse_policy(doc)) == "small"


def totals(small: int, large: int) -> Counts:
    return Counts({"small": float(small), "large": float(large)}, float(small + large))


def test_report_within_and_outside_the_band() -> None:
    p = policy(driftBandPercentagePoints=5, minRequests=100)
    within = mix_report(p, totals(680, 320), {"small": 0.7, "large": 0.3}, 2)
    assert within.observed_mix() == [
        {"tier": "small", "shareBasisPoints": 6800, "requests": 680, "predictedShareBasisPoints": 7000},
        {"tier": "large", "shareBasisPoints": 3200, "requests": 320, "predictedShareBasisPoints": 3000},
    ]
    assert within.observed_mix_window()["requests"] == 1000
    assert within.observed_mix_window()["routers"] == 2
    assert (within.drift.status, within.drift.reason) == ("False", MIX_WITHIN_BAND)
    outside = mix_report(p, totals(640, 360), {"small": 0.7, "large": 0.3}, 2)
    assert (outside.drift.status, outside.drift.reason) == ("True", MIX_OUTSIDE_BAND)
    assert "36.0%" in outside.drift.message
    assert "30.0%" in outside.drift.message
    # Too little traffic, no prediction, no router answering: Unknown, each with its reason.
    assert mix_report(p, totals(60, 30), {"small": 0.7, "large": 0.3}, 1).drift.reason == NOT_ENOUGH_TRAFFIC
    assert mix_report(p, totals(680, 320), {}, 1).drift.reason == NO_PREDICTION
    down = mix_report(p, totals(680, 320), {"large": 0.3}, 0, ["GET http://x/metrics: refused"])
    assert (down.drift.status, down.drift.reason) == ("Unknown", ROUTER_METRICS_UNAVAILABLE)
    assert "refused" in down.drift.message


def test_status_carries_the_mix_and_the_condition_and_rewrites_on_change() -> None:
    p = policy()
    report = mix_report(p, totals(680, 320), {"small": 0.7, "large": 0.3}, 1)
    st = compute_status(p, {}, [], mix=report)
    assert st["observedMix"][1]["shareBasisPoints"] == 3200
    assert st["observedMixWindow"]["windowSeconds"] == 300
    (c,) = [c for c in st["conditions"] if c["type"] == "MixDrift"]
    assert (c["status"], c["observedGeneration"]) == ("False", 3)
    moved = compute_status(p, {}, [], mix=mix_report(p, totals(500, 500), {"small": 0.7, "large": 0.3}, 1))
    assert status_changed(st, moved)
    # Before the first read, neither the mix nor the condition is claimed.
    assert "observedMix" not in compute_status(p, {}, [])


def router_pod(uid: str, ip: str) -> dict[str, Any]:
    return {
        "metadata": {
            "uid": uid,
            "name": uid,
            "creationTimestamp": "2020-01-01T00:00:00Z",
            "labels": {"app.kubernetes.io/component": "router"},
        },
        "status": {"podIP": ip, "containerStatuses": [{"restartCount": 0}]},
    }


def test_observer_reads_each_router_pod_and_requeues_on_change() -> None:
    p = policy(minRequests=10)
    texts = {"10.0.0.1": rendered(0, 0, predicted=(7000, 3000)), "10.0.0.2": rendered(0, 0, predicted=(7000, 3000))}
    asked: list[str] = []

    def fetch(url: str, timeout: float) -> str:
        asked.append(url)
        ip = url.split("//")[1].split(":")[0]
        if ip not in texts:
            raise OSError("connection refused")
        return texts[ip]

    clock = iter(float(i) for i in range(100))
    obs = MixObserver(interval_s=1, fetch=fetch, clock=lambda: next(clock))
    changed: list[tuple[str, str]] = []
    key = ("ns", "chat")
    pods = [router_pod("a", "10.0.0.1"), router_pod("b", "10.0.0.2"), router_pod("c", "10.0.0.3")]
    pool = ThreadPoolExecutor(2)
    asyncio.run(obs.pass_once(pool, [(key, p)], lambda _: pods, changed.append))
    assert sorted(asked) == [f"http://10.0.0.{i}:8080/metrics" for i in (1, 2, 3)]
    texts["10.0.0.1"] = rendered(14, 6, predicted=(7000, 3000))
    texts["10.0.0.2"] = rendered(0, 20, predicted=(7000, 3000))
    asyncio.run(obs.pass_once(pool, [(key, p)], lambda _: pods, changed.append))
    report = obs.get(key)
    assert report is not None
    assert [e["requests"] for e in report.observed_mix()] == [14, 26]
    assert report.observed_mix_window()["routers"] == 2
    assert (report.drift.status, report.drift.reason) == ("True", MIX_OUTSIDE_BAND)
    assert changed == [key, key]
    # The same figures again: no requeue. The policy gone: its report goes too.
    asyncio.run(obs.pass_once(pool, [(key, p)], lambda _: pods, changed.append))
    assert changed == [key, key]
    asyncio.run(obs.pass_once(pool, [], lambda _: pods, changed.append))
    assert obs.get(key) is None
    pool.shutdown()
