"""The whole loop on the real control plane, as `make demo-cluster` runs it (tiergate.devcluster.loop): a
RoutingPolicy, the operator, tier pods on kwok GPU nodes served at their IPs, two router replicas (`tiergate serve`)
that find the tier pods through EndpointSlices and are reached at their own pod IPs, a load generator with a known
tier mix, and the policy's status.observedMix and MixDrift condition as the operator writes them from the routers'
/metrics. One router is restarted mid-way (its counters start from zero) and the window still counts every request.
Then the tier `small` (autoscaling mode HPA on the routers' demand) gets a burst of long requests: with the metric
pipeline beside the cluster (Prometheus and prometheus-adapter, tests/support/metrics_pipeline.chart_stack) the HPA
controller scales it up, kwok runs the new pods, the routers find them and every new pod answers; without load it
scales back down.
"""

from __future__ import annotations

import json
import math

from tiergate.api import naming
from tiergate.devcluster.cluster import wait_for
from tiergate.devcluster.loop import (
    POLICY,
    SCALE_CONCURRENCY,
    SCALE_MAX,
    SCALE_MIN,
    SCALED_TIER,
    WholeLoop,
    loop_policy,
    scale_tier,
    wait_ready,
)

BAND_PP = 5


def test_observed_mix_drift_and_an_autoscaled_tier_scaling_on_router_demand(loop: WholeLoop) -> None:
    loop.start_operator()
    loop.apply_policy(loop_policy(router_replicas=2, band_percentage_points=BAND_PP, min_requests=50))
    wait_ready(loop, 180)
    loop.wait_pods(naming.COMPONENT_TIER, 3)
    tiers = loop.serve_tiers()
    assert len(tiers) == 3
    assert all(ip.startswith("198.18.") for ip in tiers.values())
    loop.wait_pods(naming.COMPONENT_ROUTER, 2)
    routers = loop.serve_routers()
    assert len(routers) == 2

    # The routers export their operating point's prediction; the operator puts it next to each tier.
    def predicted() -> dict[str, int] | None:
        obs = loop.observed()
        got = {t: e.get("predictedShareBasisPoints") for t, e in obs.items() if t != "window"}
        return got if got and all(v is not None for v in got.values()) else None

    pred = wait_for("the predicted mix in status", predicted, 60)
    assert sum(pred.values()) == 10_000
    assert 0 < pred["large"] <= 3000  # targetStrongShareBasisPoints 3000: the calibrated threshold keeps within it

    # A load generator sending the predicted mix (tiers forced by model name: no classifier noise), half of it,
    # then one router restarts (its counters from zero), then the other half.
    n = 200
    large = round(n * pred["large"] / 10_000)
    half = ["large"] * (large // 2) + ["small"] * (n // 2 - large // 2)
    rest = ["large"] * (large - large // 2) + ["small"] * (n - n // 2 - (large - large // 2))
    sent = loop.send(half)
    loop.wait_observed_requests(n // 2)
    loop.restart_router(sorted(routers)[0])
    sent += loop.send(rest)
    assert sent == {"large": large, "small": n - large}
    obs = loop.wait_observed_requests(n)
    assert obs["window"]["routers"] == 2
    assert obs["window"]["requests"] == n
    sent_bp = round(large * 10_000 / n)
    print(f"predicted large {pred['large']} bp; sent {sent_bp} bp; observed {obs['large']['shareBasisPoints']} bp")
    assert abs(obs["large"]["shareBasisPoints"] - sent_bp) <= 100  # rounding only: every request is counted
    drift = wait_for(
        "MixDrift False", lambda: (lambda c: c if c.get("status") == "False" else None)(loop.condition("MixDrift")), 30
    )
    assert drift["reason"] == "MixWithinBand"

    # Push the mix out of the band: enough large-only traffic that its share passes prediction + band.
    extra = 0
    while (large + extra) * 10_000 / (n + extra) <= pred["large"] + BAND_PP * 100 + 500:
        extra += 10
    loop.send(["large"] * extra)
    obs = loop.wait_observed_requests(n + extra)
    assert obs["large"]["shareBasisPoints"] > pred["large"] + BAND_PP * 100
    print(f"after {extra} large-only requests: observed large {obs['large']['shareBasisPoints']} bp")
    drift = wait_for(
        "MixDrift True", lambda: (lambda c: c if c.get("status") == "True" else None)(loop.condition("MixDrift")), 30
    )
    assert drift["reason"] == "MixOutsideBand"
    assert "tier large" in drift["message"]

    # A burst on the autoscaled tier: 8 long requests in flight make the routers' demand 8 against 2 per replica,
    # so its HPA scales it from SCALE_MIN to SCALE_MAX; every new pod answers; without load it scales back.
    assert loop.replicas()[naming.tier_name(POLICY, SCALED_TIER)] == f"{SCALE_MIN}/{SCALE_MIN}"
    result = scale_tier(loop, report=print)
    print(
        f"[whole loop] load start -> replicas raised {result.replicas_raised_s:.1f}s (HPA lastScaleTime; seen "
        f"{result.replicas_seen_s:.1f}s), first new pod serving "
        f"{result.first_new_pod_serving_s:.1f}s, all new pods serving {result.all_new_pods_serving_s:.1f}s; "
        f"load stop -> back to {SCALE_MIN} {result.back_to_min_s:.1f}s; answers by pod {result.answers_by_pod}; "
        f"errors {result.errors}"
    )
    assert result.peak_replicas == SCALE_MAX
    assert result.replicas_seen_s < result.all_new_pods_serving_s
    assert result.peak_demand == SCALE_CONCURRENCY  # every request in flight, summed over both routers
    assert not math.isnan(result.first_new_pod_serving_s)
    assert result.first_new_pod_serving_s <= result.all_new_pods_serving_s
    assert len(result.answers_by_pod) == SCALE_MAX
    assert all(n > 0 for n in result.answers_by_pod.values())
    assert result.errors == []
    # The report went up to the maximum under load and back to the minimum without it.
    assert max(s.replicas for s in result.timeline if s.phase == "load") == SCALE_MAX
    assert result.timeline[-1].phase == "idle"
    assert result.timeline[-1].replicas == SCALE_MIN
    hpa = json.loads(
        loop.cluster.kubectl("get", "hpa", naming.tier_name(POLICY, SCALED_TIER), "-n", loop.namespace, "-o", "json")
    )
    assert [(o["kind"], o["name"]) for o in hpa["metadata"]["ownerReferences"]] == [("RoutingPolicy", POLICY)]
    ready = wait_for(
        "AutoscalerReady True",
        lambda: (lambda c: c if c.get("status") == "True" else None)(loop.condition("AutoscalerReady")),
        30,
    )
    assert ready["type"] == "AutoscalerReady"
