"""Pure builders of a tier's autoscaler: RoutingPolicy tier -> its HorizontalPodAutoscaler or KEDA ScaledObject.

`spec.tiers[].autoscaling.mode` HPA: an autoscaling/v2 HPA the policy owns, scaling the tier's Deployment between
`replicas.min` and `replicas.max` on per-replica targets:
  - routerDemandPerReplica: the External metric `tiergate_router_tier_demand` selected by {routingpolicy, tier}
    (the router's gauge, summed over its replicas by the metrics adapter), AverageValue per tier replica;
  - vllmWaitingPerReplica: the Pods metric `vllm_num_requests_waiting` (vLLM's `vllm:num_requests_waiting`),
    AverageValue over the tier's pods.
The chart's prometheus-adapter rules serve exactly these names and labels (tiergate.api.naming holds them).

Mode KEDA: a keda.sh/v1alpha1 ScaledObject with a prometheus trigger per target, querying the Prometheus the
policy names (`autoscaling.prometheusServerAddress`); KEDA makes and owns the HPA itself and scales to zero when
`replicas.min` is 0 (the router's demand, which counts requests that fell back while the tier was at zero, wakes
it). Mode External: nothing is built; the operator only leaves the replicas alone.
"""

from __future__ import annotations

from typing import Any

from tiergate.api import naming
from tiergate.api.policy import AutoscalingBehavior, AutoscalingMode, RoutingPolicy, Tier

from .autoscaler_status import HPA_KIND, KEDA_KIND
from .status import KEDA_NOT_INSTALLED, SpecProblem

Obj = dict[str, Any]

HPA_API_VERSION = "autoscaling/v2"
KEDA_API_VERSION = "keda.sh/v1alpha1"
# KEDA copies a ScaledObject's labels onto the HPA it makes, over its own (`app.kubernetes.io/managed-by:
# keda-operator`), unless this annotation lists them. Ours would mark KEDA's HPA as the operator's child of the policy
# (our child watches select on tiergate.io/policy, and `managed-by` would say tiergate-operator): all are excluded.
KEDA_EXCLUDED_LABELS_ANNOTATION = "scaledobject.keda.sh/hpa-excluded-labels"
# Trigger names: KEDA names the HPA's external metrics after them, so they stay stable across reconciles.
DEMAND_TRIGGER = "router-demand"
WAITING_TRIGGER = "vllm-waiting"


class AutoscalingBuildError(ValueError):
    """The tier has no autoscaler to build (no autoscaling, mode External, or no bounds)."""


def _bounds(tier: Tier) -> tuple[int, int]:
    # The typed model guarantees max for HPA and KEDA (Tier._autoscaling_fits); say so if that ever breaks.
    if tier.replicas.max is None:
        raise AutoscalingBuildError(f"tier {tier.name}: autoscaling needs replicas.max")
    return tier.replicas.min, tier.replicas.max


def _scale_target(policy: RoutingPolicy, tier: Tier) -> Obj:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": naming.tier_name(policy.name, tier.name)}


def hpa_behavior(behavior: AutoscalingBehavior | None) -> Obj:
    """The HPA's `behavior`: only the stabilization windows (the API server defaults the rate policies)."""
    b = behavior or AutoscalingBehavior()
    return {
        "scaleUp": {"stabilizationWindowSeconds": b.scale_up_stabilization_seconds},
        "scaleDown": {"stabilizationWindowSeconds": b.scale_down_stabilization_seconds},
    }


def hpa_metrics(policy: RoutingPolicy, tier: Tier) -> list[Obj]:
    """The HPA's metrics: one per target set, router demand first."""
    targets = tier.autoscaling.targets if tier.autoscaling is not None else None
    out: list[Obj] = []
    if targets is not None and targets.router_demand_per_replica is not None:
        selector = {naming.METRIC_POLICY_LABEL: policy.name, naming.METRIC_TIER_LABEL: tier.name}
        out.append(
            {
                "type": "External",
                "external": {
                    "metric": {"name": naming.ROUTER_TIER_DEMAND_METRIC, "selector": {"matchLabels": selector}},
                    "target": {"type": "AverageValue", "averageValue": str(targets.router_demand_per_replica)},
                },
            }
        )
    if targets is not None and targets.vllm_waiting_per_replica is not None:
        out.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": naming.VLLM_WAITING_METRIC},
                    "target": {"type": "AverageValue", "averageValue": str(targets.vllm_waiting_per_replica)},
                },
            }
        )
    return out


def build_tier_hpa(policy: RoutingPolicy, tier: Tier, meta: Obj) -> Obj:
    """The tier's HorizontalPodAutoscaler (mode HPA). `meta`: the child metadata every object of the tier carries
    (name, namespace, labels, owner reference), from builders."""
    if tier.autoscaling is None or tier.autoscaling.mode is not AutoscalingMode.HPA:
        raise AutoscalingBuildError(f"tier {tier.name} is not in autoscaling mode HPA")
    low, high = _bounds(tier)
    return {
        "apiVersion": HPA_API_VERSION,
        "kind": HPA_KIND,
        "metadata": meta,
        "spec": {
            "scaleTargetRef": _scale_target(policy, tier),
            "minReplicas": low,
            "maxReplicas": high,
            "metrics": hpa_metrics(policy, tier),
            "behavior": hpa_behavior(tier.autoscaling.behavior),
        },
    }


def _promql_string(value: str) -> str:
    """A PromQL double-quoted string. Names here are DNS labels, so this only guards against a future change."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def demand_query(policy: RoutingPolicy, tier: Tier) -> str:
    """The router's demand for the tier, summed over the policy's router replicas (series labelled as the chart's
    scrape configuration labels them: namespace, routingpolicy, tier)."""
    ns = policy.namespace or "default"
    labels = (
        f"namespace={_promql_string(ns)},{naming.METRIC_POLICY_LABEL}={_promql_string(policy.name)},"
        f"{naming.METRIC_TIER_LABEL}={_promql_string(tier.name)}"
    )
    return f"sum({naming.ROUTER_TIER_DEMAND_METRIC}{{{labels}}})"


def waiting_query(policy: RoutingPolicy, tier: Tier) -> str:
    """vLLM's waiting requests summed over the tier's pods. Pods are told apart by name: `<deployment>-<replicaset
    hash>-<suffix>`, matched whole (PromQL anchors regexes), so tier `small` never counts tier `small-v2`'s pods."""
    ns = policy.namespace or "default"
    pods = naming.tier_name(policy.name, tier.name) + "-[a-z0-9]+-[a-z0-9]+"
    labels = f"namespace={_promql_string(ns)},pod=~{_promql_string(pods)}"
    return f"sum({{__name__={_promql_string(naming.VLLM_WAITING_SERIES)},{labels}}})"


def keda_triggers(policy: RoutingPolicy, tier: Tier) -> list[Obj]:
    a = tier.autoscaling
    if a is None or a.targets is None or a.prometheus_server_address is None:
        raise AutoscalingBuildError(f"tier {tier.name}: KEDA needs targets and prometheusServerAddress")
    out: list[Obj] = []
    for name, target, query in (
        (DEMAND_TRIGGER, a.targets.router_demand_per_replica, demand_query(policy, tier)),
        (WAITING_TRIGGER, a.targets.vllm_waiting_per_replica, waiting_query(policy, tier)),
    ):
        if target is None:
            continue
        out.append(
            {
                "type": "prometheus",
                "name": name,
                # AverageValue: the threshold is per replica, as the HPA mode's targets.
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": a.prometheus_server_address,
                    "query": query,
                    "threshold": str(target),
                    # Active (woken from zero) as soon as the query is above zero: one request routed is enough.
                    "activationThreshold": "0",
                    # No series yet (a new policy, a router that routed nothing) reads as 0, not as an error.
                    "ignoreNullValues": "true",
                },
            }
        )
    return out


def build_tier_scaled_object(policy: RoutingPolicy, tier: Tier, meta: Obj) -> Obj:
    """The tier's KEDA ScaledObject (mode KEDA). KEDA makes the HPA (`keda-hpa-<name>`), owned by the ScaledObject,
    and handles 0 <-> 1 itself; the stabilization windows go to that HPA."""
    if tier.autoscaling is None or tier.autoscaling.mode is not AutoscalingMode.KEDA:
        raise AutoscalingBuildError(f"tier {tier.name} is not in autoscaling mode KEDA")
    low, high = _bounds(tier)
    labels = meta.get("labels") or {}
    meta = {**meta, "annotations": {KEDA_EXCLUDED_LABELS_ANNOTATION: ",".join(sorted(labels))}}
    behavior = tier.autoscaling.behavior or AutoscalingBehavior()
    spec: Obj = {
        "scaleTargetRef": _scale_target(policy, tier),
        "minReplicaCount": low,
        "maxReplicaCount": high,
        # KEDA, not the HPA, takes the last replica away (the HPA never goes below 1): the same scale-down window
        # applies there, so a tier at zero and a tier at its minimum wait equally long after the last demand.
        "cooldownPeriod": behavior.scale_down_stabilization_seconds,
        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": hpa_behavior(tier.autoscaling.behavior)}},
        "triggers": keda_triggers(policy, tier),
    }
    if tier.autoscaling.polling_interval_seconds is not None:
        spec["pollingInterval"] = tier.autoscaling.polling_interval_seconds
    return {"apiVersion": KEDA_API_VERSION, "kind": KEDA_KIND, "metadata": meta, "spec": spec}


def uses_keda(policy: RoutingPolicy) -> list[str]:
    """Fields of the policy that ask for KEDA (`spec.tiers[i].autoscaling.mode`), for the refusal's message."""
    return [
        f"spec.tiers[{i}].autoscaling.mode"
        for i, t in enumerate(policy.spec.tiers)
        if t.autoscaling is not None and t.autoscaling.mode is AutoscalingMode.KEDA
    ]


def keda_unavailable(policy: RoutingPolicy, absent: str | None) -> SpecProblem | None:
    """The refusal of a policy with a KEDA tier where ScaledObjects cannot be listed (`absent`: why, from the
    ScaledObject watch; None: KEDA is there). The whole generation is refused, so no tier is half-applied (say, its
    Deployment released to an autoscaler that never comes); it is applied once KEDA is installed."""
    fields = uses_keda(policy)
    if absent is None or not fields:
        return None
    why = (
        f"{', '.join(fields)}: KEDA, but the API server does not serve keda.sh/v1alpha1 ScaledObjects to the "
        f"operator ({absent}); install KEDA (and give the operator's role scaledobjects), or use mode HPA"
    )
    return SpecProblem(KEDA_NOT_INSTALLED, fields[0], why)
