"""The metric pipeline for real: Prometheus scraping a policy's router and tier pods with the chart's scrape configs,
prometheus-adapter serving the custom and external metrics APIs with the chart's rules, and the HPA controller of
the real controller-manager scaling a tier on the router's demand while kwok runs the new pods and the router
discovers them through EndpointSlices.

Needs root (the pod network namespace), Prometheus (Debian's package; .ci/run installs it) and the
prometheus-adapter build (tiergate.devcluster.build, cached like the control plane)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support import metrics_pipeline as mp
from tiergate.api import naming
from tiergate.devcluster import build
from tiergate.devcluster.cluster import DevCluster, wait_for
from tiergate.devcluster.errors import StartError
from tiergate.devcluster.metrics import MetricsStack


@pytest.fixture(scope="module")
def stack(cluster: DevCluster) -> Iterator[MetricsStack]:
    if cluster.pod_netns is None:
        pytest.skip("external cluster without a pod network namespace: the adapter and fake pods cannot be bound")
    bins = build.ensure_all()
    with MetricsStack(
        cluster,
        adapter=bins["prometheus-adapter"],
        scrape_configs=mp.scrape_configs(),
        adapter_rules=mp.adapter_rules_text(),
    ) as s:
        yield s


def _labels_of(series: list[dict[str, Any]], label: str) -> set[str]:
    return {s["metric"].get(label, "") for s in series}


def test_every_promql_expression_of_the_dashboard_and_adapter_rules_runs(
    cluster: DevCluster, namespace: str, k8s_api: Any, stack: MetricsStack
) -> None:
    """A router with three tiers (small and large with a pod each, `spare` with none) gets routed, hard and forced
    requests (the last fall back from `spare`). Then every expression in the dashboard and the adapter rules, with
    this policy's values, parses in the real Prometheus and returns series, except those over kube-state-metrics
    (documented as needed, not run here), which must return none; the metrics APIs answer through the API server."""
    policy = "mon"
    bed = mp.PolicyBed(cluster, namespace, policy, {"small": 1, "large": 1}, k8s_api, absent=("spare",))
    with bed:
        wait_for("a fake server per tier pod", lambda: len(bed.sync()) == 2)
        wait_for("the router discovering both tiers", lambda: bed.endpoints("small") and bed.endpoints("large"))
        for i in range(12):
            assert bed.ask(f"easy question {i}")[0] == "small"
        for i in range(6):
            assert bed.ask(f"HARD question {i}")[0] == "large"
        for i in range(3):
            # Forced to the pod-less tier: answered by the next one, a fallback.
            assert bed.ask(f"spare question {i}", model="spare")[0] != "spare"

        # Scraped with the labels the rules and dashboard need: the router's own series carry the policy as
        # routingpolicy; the tier pods' vLLM series carry it too, and their tier.
        routed = stack.wait_for_series(f'tiergate_router_requests_total{{namespace="{namespace}"}}')
        assert _labels_of(routed, "routingpolicy") == {policy}
        assert all(p.startswith(naming.router_name(policy) + "-") for p in _labels_of(routed, "pod"))
        waiting = stack.wait_for_series(f'vllm:num_requests_waiting{{namespace="{namespace}"}}')
        assert _labels_of(waiting, "tier") == {"small", "large"}
        assert _labels_of(waiting, "routingpolicy") == {policy}

        exprs = mp.dashboard_expressions(mp.dashboard())
        small_pods = sorted(p for p in bed.fakes if p.startswith(naming.tier_name(policy, "small")))
        rules = yaml.safe_load(mp.adapter_rules_text())
        exprs += mp.adapter_expressions(rules, namespace, policy, "small", small_pods)
        assert len(exprs) >= 15, [e.where for e in exprs]
        checked = []
        for e in exprs:
            q = mp.render_dashboard(e.promql, namespace, policy)
            if e.needs_kube_state_metrics:
                assert stack.query(q) == [], f"{e.where}: {q}"
                checked.append(e.where)
                continue
            # Rates need two scrapes after the traffic: wait for the series rather than a fixed time.
            series = stack.wait_for_series(q, timeout=30)
            if e.label is not None:
                values = _labels_of(series, e.label)
                assert (namespace if e.label == "namespace" else policy) in values, f"{e.where}: {values}"
            checked.append(e.where)
        assert checked == [e.where for e in exprs]
        assert any("Fallback rate" in w for w in checked)
        assert any("externalRules" in w for w in checked)

        # The same through the API server, as the HPA controller reads them.
        sel = f"routingpolicy={policy},tier=small"
        # The adapter lists series names every ADAPTER_RELIST_S: NotFound until it has seen them.
        external = wait_for(
            "the external metric served",
            lambda: _served(
                stack, f"external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{mp.DEMAND_METRIC}?labelSelector={sel}"
            ),
            timeout=60,
        )
        assert external[0]["metricLabels"] == {"routingpolicy": policy, "tier": "small"}
        custom = wait_for(
            "the pods metric served",
            lambda: _served(
                stack, f"custom.metrics.k8s.io/v1beta1/namespaces/{namespace}/pods/*/vllm_num_requests_waiting"
            ),
            timeout=60,
        )
        assert {i["describedObject"]["name"] for i in custom} == set(bed.fakes)


def _served(stack: MetricsStack, path: str) -> list[dict[str, Any]] | None:
    try:
        items: list[dict[str, Any]] = stack.metrics_api(path)["items"]
    except StartError as e:
        if "NotFound" not in str(e):
            raise
        return None
    return items


CONCURRENCY = 8
AVERAGE_DEMAND = 2
MAX_REPLICAS = CONCURRENCY // AVERAGE_DEMAND


def test_hpa_scales_a_tier_on_router_demand_and_back(
    cluster: DevCluster, namespace: str, k8s_api: Any, stack: MetricsStack
) -> None:
    """8 requests at a time (each held 1.5 s by the fake) through the router to one tier pod: the router's demand
    for the tier is 8, four times the HPA's target of 2 per pod, so the HPA (External metric, the operator's shape)
    scales the Deployment 1 -> 4; kwok runs the pods, the router discovers them and every new pod answers. Without
    load the demand drops to 0 and the HPA scales back to 1."""
    policy = "auto"
    bed = mp.PolicyBed(cluster, namespace, policy, {"small": 1}, k8s_api, latency_s=1.5)
    with bed:
        wait_for("the tier pod served", lambda: len(bed.sync()) == 1)
        wait_for("the router discovering it", lambda: bed.endpoints("small"))
        hpa = mp.hpa_object(policy, "small", average_demand=AVERAGE_DEMAND, min_replicas=1, max_replicas=MAX_REPLICAS)
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(hpa))
        result = mp.run_scale_scenario(bed, "small", concurrency=CONCURRENCY, min_replicas=1, max_replicas=MAX_REPLICAS)
    print(
        f"[hpa] load start -> replicas raised {result.replicas_raised_s:.1f}s, first new pod serving "
        f"{result.first_new_pod_serving_s:.1f}s, all {MAX_REPLICAS - 1} new pods serving "
        f"{result.all_new_pods_serving_s:.1f}s; load stop -> back to 1 replica {result.back_to_min_s:.1f}s; "
        f"peak demand {result.peak_demand:.0f} (per pod, as the HPA saw it: {result.peak_demand_per_pod:.2f}); "
        f"answers by pod {result.answers_by_pod}; errors {result.errors}"
    )
    assert result.peak_replicas == MAX_REPLICAS
    # The HPA read the router's demand through the adapter: every request in flight, above the target for one pod.
    assert result.peak_demand == CONCURRENCY
    assert not math.isnan(result.replicas_raised_s)
    assert not math.isnan(result.first_new_pod_serving_s)
    assert result.replicas_raised_s < result.all_new_pods_serving_s
    assert result.first_new_pod_serving_s <= result.all_new_pods_serving_s
    assert len(result.answers_by_pod) == MAX_REPLICAS
    assert all(n > 0 for n in result.answers_by_pod.values())
    assert result.errors == []
