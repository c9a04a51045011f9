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
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import metrics_pipeline as mp
from tests.support.operator_cluster import Operator, install_crd, operator_running
from tiergate.api import naming
from tiergate.api.policy import parse_policy
from tiergate.devcluster import scaling
from tiergate.devcluster.cluster import DevCluster, wait_for
from tiergate.devcluster.errors import StartError
from tiergate.devcluster.metrics import MetricsStack
from tiergate_operator.autoscaling import demand_query, waiting_query


def _labels_of(series: list[dict[str, Any]], label: str) -> set[str]:
    return {s["metric"].get(label, "") for s in series}


def test_every_promql_expression_of_the_dashboard_and_adapter_rules_runs(
    cluster: DevCluster, namespace: str, k8s_api: Any, stack: MetricsStack
) -> None:
    """A router with three tiers (small and large with a pod each, `spare` with none) gets routed, hard and forced
    requests (the last fall back from `spare`). Then every expression in the dashboard and the adapter rules, with
    this policy's values, parses in the real Prometheus and returns series, except those over kube-state-metrics
    (documented as needed, not run here) and those over the predicted mix (none for three tiers over a two-tier
    artifact), which must return none; so do the operator's KEDA trigger queries; the
    metrics APIs answer through the API server."""
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
        # Each pod's first scrape comes within a scrape interval of its fake starting: wait for both tiers'.
        waiting_q = f'vllm:num_requests_waiting{{namespace="{namespace}"}}'
        waiting = wait_for(
            "both tiers' vLLM series",
            lambda: (lambda s: s if _labels_of(s, "tier") == {"small", "large"} else None)(stack.query(waiting_q)),
            timeout=60,
        )
        assert _labels_of(waiting, "routingpolicy") == {policy}

        exprs = mp.dashboard_expressions(mp.dashboard())
        small_pods = sorted(p for p in bed.fakes if p.startswith(naming.tier_name(policy, "small")))
        rules = yaml.safe_load(mp.adapter_rules_text())
        exprs += mp.adapter_expressions(rules, namespace, policy, "small", small_pods)
        # And the queries the operator writes into a KEDA ScaledObject's prometheus triggers, for this policy.
        typed = parse_policy({**autoscaled_policy(policy), "metadata": {"name": policy, "namespace": namespace}})
        small = typed.spec.tier("small")
        exprs += [
            mp.Expression("KEDA trigger router-demand", demand_query(typed, small)),
            mp.Expression("KEDA trigger vllm-waiting", waiting_query(typed, small)),
        ]
        assert len(exprs) >= 15, [e.where for e in exprs]
        checked = []
        for e in exprs:
            q = mp.render_dashboard(e.promql, namespace, policy)
            if e.needs_kube_state_metrics or e.needs_prediction:
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


def autoscaled_policy(name: str) -> dict[str, Any]:
    """One autoscaled tier (`small`: 1..4 replicas, HPA on the router's demand, 2 per replica, scale-down window
    5 s), one more tier the classifier never picks here (`large`, no pods), one router replica, the shipped
    classifier."""
    tier = {
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "pool": "gpu-small",
        "resources": {"gpus": 1, "cpu": "1", "memory": "1Gi"},
        "price": {"inputPerMillion": "0.10", "outputPerMillion": "0.30"},
    }
    return {
        "apiVersion": "tiergate.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": name},
        "spec": {
            "tiers": [
                {
                    **tier,
                    "name": "small",
                    "replicas": {"min": 1, "max": MAX_REPLICAS},
                    "autoscaling": {
                        "mode": "HPA",
                        "targets": {"routerDemandPerReplica": AVERAGE_DEMAND},
                        "behavior": {"scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 5},
                    },
                },
                {**tier, "name": "large", "replicas": {"min": 0}},
            ],
            "router": {"replicas": 1, "pool": "cpu", "httpPort": mp.ROUTER_PORT},
        },
    }


@pytest.fixture
def operator(cluster: DevCluster, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    install_crd(cluster)
    yield from operator_running(Operator(cluster, tmp_path, "--namespace", namespace))


def test_operator_hpa_scales_a_tier_on_router_demand_and_back(
    cluster: DevCluster, namespace: str, k8s_api: Any, stack: MetricsStack, operator: Operator
) -> None:
    """A RoutingPolicy with tier `small` in autoscaling mode HPA: the operator makes the tier's Deployment and its
    HPA (External tiergate_router_tier_demand {routingpolicy, tier}, 2 per replica). 8 requests at a time (each held
    1.5 s by the fake) through the router to the tier's one pod make the router's demand 8, so the HPA controller
    scales the Deployment 1 -> 4; kwok runs the pods, the router discovers them and every new pod answers. Without
    load the demand drops to 0 and the HPA scales back to 1."""
    policy = "auto"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(autoscaled_policy(policy)))
    hpa_name = naming.tier_name(policy, "small")
    hpa = wait_for("the operator's HPA", lambda: cluster.kubectl("get", "hpa", hpa_name, "-n", namespace, check=False))
    assert hpa_name in hpa
    bed = mp.PolicyBed(cluster, namespace, policy, {"small": 1}, k8s_api, latency_s=1.5, make_objects=False)
    with bed:
        wait_for("the tier pod served", lambda: len(bed.sync()) == 1, timeout=120)
        wait_for("the router discovering it", lambda: bed.endpoints("small"))
        result = scaling.run_scale_scenario(
            bed, "small", concurrency=CONCURRENCY, min_replicas=1, max_replicas=MAX_REPLICAS
        )
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
    # The HPA was the operator's, owned by the policy, and the operator left the replicas to it.
    owner = json.loads(cluster.kubectl("get", "hpa", hpa_name, "-n", namespace, "-o", "json"))["metadata"]
    assert [(o["kind"], o["name"]) for o in owner["ownerReferences"]] == [("RoutingPolicy", policy)]
