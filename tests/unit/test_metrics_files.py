"""The chart's monitoring files (charts/tiergate/files/metrics/) against the names and labels the code uses: the
adapter serves exactly the metrics the operator's HPAs ask for, the scrape configs turn the operator's pod labels
into those the rules and dashboard select on, and the dashboard only names metrics the router exports. The PromQL
itself runs against a real Prometheus in tests/cluster/test_metrics_pipeline.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.support import metrics_pipeline as mp
from tiergate.api import naming
from tiergate.devcluster import metrics
from tiergate_operator.builders import _scrape_annotations
from tiergate_router.metrics import RouterMetrics


def _meta_label(kind: str, key: str) -> str:
    """Prometheus' Kubernetes SD meta label for a pod label or annotation key (every other character -> `_`)."""
    return f"__meta_kubernetes_pod_{kind}_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def _relabels() -> list[dict[str, Any]]:
    (job,) = mp.scrape_configs()
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    rules: list[dict[str, Any]] = job["relabel_configs"]
    return rules


def _target(label: str) -> dict[str, Any]:
    (rule,) = [r for r in _relabels() if r.get("target_label") == label]
    return rule


def test_adapter_serves_exactly_the_hpa_metric_names_and_labels() -> None:
    rules = yaml.safe_load(mp.adapter_rules_text())
    (external,) = rules["externalRules"]
    # The names and labels the operator's HPAs ask for (tiergate.api.naming, read by operator/autoscaling.py).
    assert external["name"]["as"] == naming.ROUTER_TIER_DEMAND_METRIC == "tiergate_router_tier_demand"
    assert re.fullmatch(external["name"]["matches"], mp.DEMAND_METRIC)
    # The HPA selects with matchLabels {routingpolicy, tier}: the series must have both, per namespace.
    assert f'{naming.METRIC_POLICY_LABEL}!=""' in external["seriesQuery"]
    assert f'{naming.METRIC_TIER_LABEL}!=""' in external["seriesQuery"]
    assert f"by ({naming.METRIC_POLICY_LABEL}, {naming.METRIC_TIER_LABEL})" in external["metricsQuery"]
    assert external["resources"]["overrides"] == {"namespace": {"resource": "namespace"}}
    assert "<<.LabelMatchers>>" in external["metricsQuery"]
    (pods,) = rules["rules"]
    assert pods["name"]["as"] == naming.VLLM_WAITING_METRIC
    assert re.fullmatch(pods["name"]["matches"], naming.VLLM_WAITING_SERIES)
    assert pods["seriesQuery"].startswith(naming.VLLM_WAITING_SERIES + "{")
    assert pods["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "by (<<.GroupBy>>)" in pods["metricsQuery"]


def test_scrape_configs_turn_the_operators_pod_labels_into_the_rules_labels() -> None:
    assert _target(naming.METRIC_POLICY_LABEL)["source_labels"] == [_meta_label("label", naming.POLICY_LABEL)]
    assert _target(naming.METRIC_TIER_LABEL)["source_labels"] == [_meta_label("label", naming.TIER_LABEL)]
    assert _target("component")["source_labels"] == [_meta_label("label", naming.COMPONENT_LABEL)]
    assert _target("namespace")["source_labels"] == ["__meta_kubernetes_namespace"]
    assert _target("pod")["source_labels"] == ["__meta_kubernetes_pod_name"]
    keeps = {tuple(r["source_labels"]): r["regex"] for r in _relabels() if r.get("action") == "keep"}
    assert keeps[(_meta_label("label", naming.MANAGED_BY_LABEL),)] == naming.MANAGED_BY
    # The annotations the operator puts on its pods are the ones read for address and path.
    annotations = _scrape_annotations(8000)
    assert set(annotations) == {"prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path"}
    assert keeps[(_meta_label("annotation", "prometheus.io/scrape"),)] == annotations["prometheus.io/scrape"]
    address = _target("__address__")
    assert address["source_labels"][1] == _meta_label("annotation", "prometheus.io/port")
    # Prometheus anchors the regex and writes $1 where Python writes \\1.
    replacement = address["replacement"].replace("$", "\\")
    assert re.sub(f"^{address['regex']}$", replacement, "198.18.0.7;8000") == "198.18.0.7:8000"
    assert _target("__metrics_path__")["source_labels"] == [_meta_label("annotation", "prometheus.io/path")]


def _router_metric_names() -> set[str]:
    """The series names the router exports, whether or not a labelled child exists yet."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    for metric in RouterMetrics().registry.collect():
        names.update(metric.name + s for s in suffixes.get(metric.type, ("",)))
    return names


def test_dashboard_has_the_panels_and_names_only_exported_metrics() -> None:
    doc = mp.dashboard()
    titles = {p["title"] for p in doc["panels"]}
    assert {
        "Tier mix: served, decided and predicted",
        "Cost per request",
        "Latency per tier",
        "Replicas per tier",
        "Fallback rate",
    } <= titles
    exported = _router_metric_names()
    exprs = mp.dashboard_expressions(doc)
    used = {n for e in exprs for n in re.findall(r"\btiergate_router_\w+", e.promql)}
    # Counters are exported as NAME_total; after `prometheus_client` renders them, `collect()` lists both.
    assert used - exported - {mp.DEMAND_METRIC} == set()
    assert {"tiergate_router_estimated_cost_dollars_total", "tiergate_router_fallbacks_total"} <= used
    # Every query is scoped to one policy in one namespace, so two policies never mix on one graph.
    for e in exprs:
        if e.label is None and not e.needs_kube_state_metrics:
            for selector in re.findall(r"\b(?:tiergate_router_\w+|vllm:\w+)\{([^}]*)\}", e.promql):
                assert 'namespace="$namespace"' in selector, e.where
                assert 'routingpolicy="$policy"' in selector, e.where
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_expressions_include_panels_and_variables() -> None:
    exprs = mp.dashboard_expressions(mp.dashboard())
    variables = [e for e in exprs if e.label is not None]
    assert [(e.promql, e.label) for e in variables] == [
        ("tiergate_router_requests_total", "namespace"),
        ('tiergate_router_requests_total{namespace="$namespace"}', "routingpolicy"),
    ]
    targets = sum(len(p["targets"]) for p in mp.dashboard()["panels"])
    assert len(exprs) == targets + 2
    assert [e.where for e in exprs if e.needs_kube_state_metrics] == ["panel 'Replicas per tier' target B"]
    rendered = mp.render_dashboard(exprs[0].promql, "ns1", "p1")
    assert "$" not in rendered
    assert 'routingpolicy="p1"' in rendered
    assert f"[{mp.RATE_INTERVAL}]" in rendered


def test_adapter_expressions_expand_the_templates_as_the_adapter_does() -> None:
    rules = yaml.safe_load(mp.adapter_rules_text())
    exprs = {e.where: e.promql for e in mp.adapter_expressions(rules, "ns1", "p1", "small", ["a", "b"])}
    assert exprs["externalRules[0] metricsQuery"] == (
        'sum by (routingpolicy, tier) (tiergate_router_tier_demand{routingpolicy="p1",tier="small",namespace="ns1"})'
    )
    assert exprs["rules[0] metricsQuery"] == 'sum by (pod) (vllm:num_requests_waiting{namespace="ns1",pod=~"a|b"})'
    assert not any("<<" in q for q in exprs.values())


def test_prometheus_config_replaces_pod_discovery_by_the_played_file(tmp_path: Path) -> None:
    targets = tmp_path / "pod-targets.json"
    cfg = metrics.prometheus_config(mp.scrape_configs(), targets)
    (job,) = cfg["scrape_configs"]
    assert "kubernetes_sd_configs" not in job
    assert job["file_sd_configs"] == [{"files": [str(targets)], "refresh_interval": f"{metrics.SCRAPE_INTERVAL_S}s"}]
    assert job["relabel_configs"] == mp.scrape_configs()[0]["relabel_configs"]
    assert cfg["global"]["scrape_interval"] == f"{metrics.SCRAPE_INTERVAL_S}s"
    json.dumps(cfg)  # written as JSON (which Prometheus reads as YAML)


def test_pod_targets_carry_what_kubernetes_discovery_would() -> None:
    pod = {
        "metadata": {
            "name": "p-router-abc",
            "namespace": "ns1",
            "uid": "u1",
            "labels": {
                naming.POLICY_LABEL: "p",
                naming.COMPONENT_LABEL: "router",
                naming.MANAGED_BY_LABEL: naming.MANAGED_BY,
            },
            "annotations": _scrape_annotations(8080),
        },
        "spec": {
            "nodeName": "n1",
            "containers": [
                {
                    "name": "router",
                    "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}],
                }
            ],
        },
        "status": {"podIP": "198.18.0.9", "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    no_ip = {"metadata": {"name": "pending", "namespace": "ns1"}, "spec": {}, "status": {"phase": "Pending"}}
    groups = metrics.pod_targets([pod, no_ip])
    assert [g["targets"] for g in groups] == [["198.18.0.9:8080"], ["198.18.0.9:9090"]]
    labels = groups[0]["labels"]
    assert labels[_meta_label("label", naming.POLICY_LABEL)] == "p"
    assert labels[_meta_label("annotation", "prometheus.io/port")] == "8080"
    assert labels["__meta_kubernetes_pod_ready"] == "true"
    assert labels["__meta_kubernetes_pod_phase"] == "Running"
    assert labels["__meta_kubernetes_pod_container_port_name"] == "http"
    # Every meta label the shipped relabel_configs read is one the played discovery sets.
    read = {lbl for r in _relabels() for lbl in r["source_labels"]}
    assert read <= set(labels) | {_meta_label("label", naming.TIER_LABEL)}


def test_adapter_objects_register_both_metrics_apis_at_the_adapter_address() -> None:
    objs = metrics.adapter_objects("198.18.15.254", 6443)
    services = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "APIService"}
    assert set(services) == {"v1beta1.custom.metrics.k8s.io", "v1beta1.external.metrics.k8s.io"}
    for spec in services.values():
        assert spec["service"] == {"namespace": metrics.ADAPTER_NAMESPACE, "name": metrics.ADAPTER_SERVICE, "port": 443}
    (eps,) = [o for o in objs if o["kind"] == "EndpointSlice"]
    assert eps["endpoints"][0]["addresses"] == ["198.18.15.254"]
    assert eps["metadata"]["labels"]["kubernetes.io/service-name"] == metrics.ADAPTER_SERVICE
    (svc,) = [o for o in objs if o["kind"] == "Service"]
    assert svc["spec"]["ports"][0]["name"] == eps["ports"][0]["name"]
    assert eps["ports"][0]["port"] == 6443
