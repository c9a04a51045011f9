"""A tier scaled to zero and woken by the router's demand, with KEDA's own operator on the real control plane.

The policy's tier `small` is in autoscaling mode KEDA with replicas.min 0 and whenScaledToZero Hold. The tiergate
operator makes its ScaledObject; KEDA's operator (built from KEDA's published module, tiergate.devcluster.keda)
reconciles it, queries the Prometheus beside the cluster (which scrapes the router pod) and, with no demand, takes
the tier to zero. Then one request routed to the tier is held by the router; it counts in
tiergate_router_tier_demand, Prometheus scrapes that, KEDA's poll finds the trigger active and scales the tier's
Deployment to one replica, kwok runs the pod, its model server binds the pod's IP, the router finds it through
EndpointSlices and the held request is answered there. Without demand KEDA takes the tier back to zero after the
cooldown (autoscaling.behavior.scaleDownStabilizationSeconds). Times are reported from the request's start.
In between (Hold), a burst asks for more than one replica: the HPA KEDA made reads the same trigger through KEDA's
metrics API server, registered as the external metrics API (Prometheus runs alone in this module: only one server
can hold that API), and the HPA controller scales the tier to its maximum.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import metrics_pipeline as mp
from tiergate.api import naming
from tiergate.devcluster.cluster import DevCluster, wait_for
from tiergate.devcluster.keda import KedaOperator
from tiergate.devcluster.loop import (
    BURST_TOKENS,
    POLICY,
    SECONDS_PER_TOKEN,
    WholeLoop,
    loop_policy,
    ready_pod_ips,
    wait_ready,
)
from tiergate.devcluster.metrics import MetricsStack

pytestmark = pytest.mark.cluster

TIER = "small"
DEPLOYMENT = naming.tier_name(POLICY, TIER)
SELECTOR = f"{naming.POLICY_LABEL}={POLICY},{naming.TIER_LABEL}={TIER}"
# KEDA's cooldown before it takes the last replica away: short, so the test sees it.
COOLDOWN_S = 5
# Far above the expected wake-up (a scrape, a poll, a pod start and a discovery), within the request's deadline.
HOLD_S = 90
SMALL_PORT = 8001
SMALL_MAX = 2
DEMAND_PER_REPLICA = 2
BURST = SMALL_MAX * DEMAND_PER_REPLICA


@pytest.fixture(scope="module")
def stack(cluster: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsStack]:
    """Prometheus alone, with the chart's scrape configs: KEDA's metrics API server serves the external metrics API
    here, which only one server can hold (the conftest's stack has prometheus-adapter hold it)."""
    if cluster.pod_netns is None:
        pytest.skip("external cluster without a pod network namespace: fake pods cannot be bound")
    workdir = tmp_path_factory.mktemp("prometheus")
    with MetricsStack(
        cluster, adapter=None, scrape_configs=mp.scrape_configs(), adapter_rules="", workdir=workdir
    ) as s:
        yield s


@pytest.fixture
def keda(cluster: DevCluster, tmp_path: Path, stack: MetricsStack) -> Iterator[KedaOperator]:
    with KedaOperator(cluster, metrics_server=True, workdir=tmp_path / "keda") as k:
        try:
            yield k
        except BaseException:
            print(k.log()[-6000:])
            raise


def keda_policy(prometheus_url: str, when: str) -> dict[str, Any]:
    doc = loop_policy(router_replicas=1)
    small = next(t for t in doc["spec"]["tiers"] if t["name"] == TIER)
    small["replicas"] = {"min": 0, "max": SMALL_MAX}
    small["engine"] = {**small["engine"], "port": SMALL_PORT}  # its own port: served ahead (serve_tier_ahead)
    small["autoscaling"] = {
        "mode": "KEDA",
        "targets": {"routerDemandPerReplica": DEMAND_PER_REPLICA},
        "prometheusServerAddress": prometheus_url,
        "pollingIntervalSeconds": 1,
        "behavior": {"scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": COOLDOWN_S},
        "whenScaledToZero": when,
        **({"maxHoldSeconds": HOLD_S} if when == "Hold" else {}),
    }
    return doc


def scaled_object(loop: WholeLoop) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        loop.cluster.kubectl("get", "scaledobject", DEPLOYMENT, "-n", loop.namespace, "-o", "json")
    )
    return out


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def router_metric(loop: WholeLoop, name: str, labels: dict[str, str]) -> float | None:
    """One sample of the router pod's /metrics, read at the pod's IP."""
    (router,) = loop.routers.values()
    with urllib.request.urlopen(f"http://{router.pod_ip}:{router.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def keda_hpa(loop: WholeLoop) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        loop.cluster.kubectl("get", "hpa", f"keda-hpa-{DEPLOYMENT}", "-n", loop.namespace, "-o", "json")
    )
    return out


def spec_replicas(loop: WholeLoop) -> int:
    d = json.loads(loop.cluster.kubectl("get", "deployment", DEPLOYMENT, "-n", loop.namespace, "-o", "json"))
    return int(d["spec"].get("replicas", 1))


@pytest.mark.parametrize("when", ["Hold", "Fallback"])
def test_keda_wakes_a_tier_from_zero_on_router_demand_and_takes_it_back(
    keda: KedaOperator, loop: WholeLoop, stack: MetricsStack, when: str
) -> None:
    loop.start_operator()
    loop.apply_policy(keda_policy(stack.prometheus_url, when))
    wait_ready(loop, 180)  # includes AutoscalerReady: KEDA's own Ready condition on the ScaledObject
    so = scaled_object(loop)
    assert [(o["kind"], o["name"]) for o in so["metadata"]["ownerReferences"]] == [("RoutingPolicy", POLICY)]
    assert so["spec"]["minReplicaCount"] == 0
    assert so["spec"]["cooldownPeriod"] == COOLDOWN_S
    assert so["spec"]["pollingInterval"] == 1
    assert condition(so, "Ready").get("status") == "True"

    # Nothing has asked for the tier: KEDA takes it to zero (the Deployment starts at one replica).
    wait_for("tier small scaled to zero by KEDA", lambda: spec_replicas(loop) == 0 or None, 120)
    wait_for("no tier small pod", lambda: not ready_pod_ips(loop.cluster, loop.namespace, SELECTOR) or None, 60)
    loop.wait_pods(naming.COMPONENT_TIER, 1)  # tier large
    loop.serve_tiers()
    loop.wait_pods(naming.COMPONENT_ROUTER, 1)
    loop.serve_routers()
    assert condition(scaled_object(loop), "Active").get("status") == "False"

    # The tier's model server listens before its pod exists, as a real pod's would before it is Ready.
    ahead = loop.serve_tier_ahead(TIER)

    # Requests for the tier, one after another: each counts in the tier's demand (held, or answered by the fallback
    # tier), which wakes the tier; Hold answers the first one there, Fallback the first one after the wake-up.
    t0 = time.monotonic()
    raised_s = ready_s = float("nan")
    answers: list[tuple[str, str, float]] = []  # (answering tier, pod, seconds from t0)
    with ThreadPoolExecutor(1) as pool:
        while not answers or answers[-1][0] != TIER:
            assert time.monotonic() - t0 < HOLD_S + 30, f"tier {TIER} never answered: {answers}"
            answer = pool.submit(loop.ask, f"wake up {len(answers)}", TIER)
            while not answer.done():
                if math.isnan(raised_s) and spec_replicas(loop) >= 1:
                    raised_s = time.monotonic() - t0
                if math.isnan(ready_s) and ready_pod_ips(loop.cluster, loop.namespace, SELECTOR):
                    ready_s = time.monotonic() - t0
                time.sleep(0.2)
            answers.append((*answer.result(), round(time.monotonic() - t0, 1)))
    answer_s = BURST_TOKENS * SECONDS_PER_TOKEN  # the pod server's own time for an answer
    print(
        f"[keda {when}] request start -> Deployment raised to 1 by KEDA {raised_s:.1f}s, pod Ready {ready_s:.1f}s; "
        f"answers (tier, pod, s; each {answer_s:.1f}s of answering): {answers}"
    )
    # The server of tier small's port answers only through an endpoint the router discovered: a small pod, Ready.
    # (The times above come from polls, so they are reported, not compared.)
    tier, pod, _answered_s = answers[-1]
    assert (tier, pod) == (TIER, ahead)
    if when == "Hold":
        assert len(answers) == 1  # held, then answered by the woken tier: not by the fallback
        assert router_metric(loop, "tiergate_router_holds_total", {"tier": TIER, "outcome": "endpoint"}) == 1.0
    else:
        # The first request had no small pod: the fallback tier answered it, and its demand woke the tier.
        assert answers[0][:2] != (TIER, ahead)
        assert answers[0][0] == "large"
        assert router_metric(loop, "tiergate_router_holds_total", {"tier": TIER, "outcome": "endpoint"}) is None
    so = scaled_object(loop)
    assert condition(so, "Ready").get("status") == "True"
    assert so["status"].get("lastActiveTime")  # KEDA found the demand trigger active: it woke the tier

    if when == "Hold":
        # One to N, the HPA KEDA made: a burst of long requests keeps the demand at BURST, twice the target per
        # replica for the maximum; the HPA controller reads it through KEDA's metrics API server and scales up.
        t2 = time.monotonic()
        with ThreadPoolExecutor(BURST) as pool:
            while spec_replicas(loop) < SMALL_MAX:
                assert time.monotonic() - t2 < 120, f"KEDA's HPA never scaled to {SMALL_MAX}: {keda_hpa(loop)}"
                burst = list(pool.map(lambda i: loop.ask(f"burst {i}", TIER)[0], range(BURST)))
                assert burst == [TIER] * BURST
        hpa = keda_hpa(loop)
        print(
            f"[keda] burst start -> KEDA's HPA scaled to {SMALL_MAX}: {time.monotonic() - t2:.1f}s; its metrics "
            f"{hpa['status'].get('currentMetrics')}"
        )
        assert [(o["kind"], o["name"]) for o in hpa["metadata"]["ownerReferences"]] == [("ScaledObject", DEPLOYMENT)]
        (metric,) = hpa["status"]["currentMetrics"]
        assert metric["type"] == "External"

    # Without demand KEDA takes the tier back to zero after the cooldown (the HPA first to one).
    t1 = time.monotonic()
    wait_for("tier small back at zero", lambda: spec_replicas(loop) == 0 or None, COOLDOWN_S + 90)
    print(f"[keda {when}] last answer -> back at zero {time.monotonic() - t1:.1f}s (cooldown {COOLDOWN_S}s)")
    assert loop.condition("AutoscalerReady").get("status") == "True"
