"""AutoscalerReady: the policy's condition from its own HPAs' and ScaledObjects' conditions (a blind HPA, one that
cannot get its metrics, keeps the policy from Ready), the cache keeping those conditions, and reconcile writing it."""

from __future__ import annotations

import copy
from typing import Any

from tests.unit.test_operator_autoscaling import HPA, KEDA, doc_with, policy_with
from tests.unit.test_operator_spec_status import FakeKube, conditions
from tiergate.api.policy import RoutingPolicy, parse_policy
from tiergate_operator.autoscaler_status import AUTOSCALER_READY, autoscaler_verdict
from tiergate_operator.cache import ChildCache
from tiergate_operator.config import OperatorConfig
from tiergate_operator.reconcile import PolicyMemory, reconcile
from tiergate_operator.status import compute_status
from tiergate_operator.watches import WATCHED_KINDS

HPA_KEY = ("HorizontalPodAutoscaler", "chat-tier-large")
SO_KEY = ("ScaledObject", "chat-tier-large")
# What the HPA controller writes when the metrics API has no such metric (as seen on the test bed's real one).
NO_METRIC = (
    "the HPA was unable to compute the replica count: unable to get external metric "
    "team-a/tiergate_router_tier_demand/&LabelSelector{MatchLabels:map[string]string{routingpolicy: chat,"
    "tier: large,}}: "
    "unable to fetch metrics from external metrics API: the server could not find the requested resource"
)


def hpa(*conds: tuple[str, str, str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": "chat-tier-large", "generation": 1},
        "status": {"conditions": [{"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conds]},
    }


BLIND = hpa(
    ("AbleToScale", "True", "SucceededGetScale", "the HPA controller was able to get the target's current scale"),
    ("ScalingActive", "False", "FailedGetExternalMetric", NO_METRIC),
)
ACTIVE = hpa(
    ("AbleToScale", "True", "ReadyForNewScale", "recommended size matches current size"),
    ("ScalingActive", "True", "ValidMetricFound", "the HPA was able to successfully calculate a replica count"),
    ("ScalingLimited", "True", "TooFewReplicas", "the desired replica count is less than the minimum replica count"),
)


def ready_deployments(p: RoutingPolicy) -> dict[str, dict[str, Any]]:
    """Every Deployment of the policy, all replicas ready (the large tier's count is the autoscaler's: 1)."""
    assert p.spec.best_of_n is not None  # the sample scores best-of-N with a reward model
    counts = {
        "chat-tier-small": 2,
        "chat-tier-large": 1,
        "chat-router": p.spec.router.replicas,
        "chat-reward": p.spec.best_of_n.reward_model.replicas,
    }
    return {
        name: {
            "metadata": {"name": name, "generation": 1},
            "spec": {"replicas": n},
            "status": {"observedGeneration": 1, "replicas": n, "readyReplicas": n, "updatedReplicas": n},
        }
        for name, n in counts.items()
    }


def status_of(p: RoutingPolicy, autoscalers: dict[tuple[str, str], Any] | None) -> dict[str, dict[str, Any]]:
    return conditions(compute_status(p, ready_deployments(p), [], autoscalers=autoscalers))


def test_a_blind_hpa_keeps_the_policy_from_ready_naming_tier_and_reason() -> None:
    conds = status_of(policy_with(HPA), {HPA_KEY: BLIND})
    a = conds[AUTOSCALER_READY]
    assert (a["status"], a["reason"]) == ("False", "FailedGetExternalMetric")
    assert "tier large: HorizontalPodAutoscaler chat-tier-large cannot scale (ScalingActive False" in a["message"]
    assert "unable to get external metric" in a["message"]
    ready = conds["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "FailedGetExternalMetric")
    assert "tier large" in ready["message"]
    # The pods are fine: nothing is stuck, only the scaling is blind.
    assert conds["Degraded"]["status"] == "False"


def test_pods_metric_and_scale_failures_count_too() -> None:
    pods = hpa(("AbleToScale", "True", "x", ""), ("ScalingActive", "False", "FailedGetPodsMetric", "no pods metric"))
    assert status_of(policy_with(HPA), {HPA_KEY: pods})[AUTOSCALER_READY]["reason"] == "FailedGetPodsMetric"
    scale = hpa(("AbleToScale", "False", "FailedGetScale", "deployments.apps not found"))
    assert status_of(policy_with(HPA), {HPA_KEY: scale})["Ready"]["reason"] == "FailedGetScale"


def test_an_active_hpa_is_ready_and_so_is_the_policy() -> None:
    conds = status_of(policy_with(HPA), {HPA_KEY: ACTIVE})
    assert (conds[AUTOSCALER_READY]["status"], conds[AUTOSCALER_READY]["reason"]) == ("True", "AutoscalersActive")
    assert "tier large: HorizontalPodAutoscaler chat-tier-large active" in conds[AUTOSCALER_READY]["message"]
    assert conds["Ready"]["status"] == "True"


def test_an_hpa_not_reporting_yet_is_unknown_and_does_not_hold_ready() -> None:
    for autoscalers in ({}, {HPA_KEY: hpa()}):
        conds = status_of(policy_with(HPA), autoscalers)
        assert (conds[AUTOSCALER_READY]["status"], conds[AUTOSCALER_READY]["reason"]) == (
            "Unknown",
            "AutoscalerPending",
        )
        assert conds["Ready"]["status"] == "True"


def test_no_condition_without_an_autoscaler_the_operator_makes_or_without_observations() -> None:
    assert AUTOSCALER_READY not in status_of(policy_with(), {})
    assert AUTOSCALER_READY not in status_of(policy_with({"mode": "External"}), {})
    assert AUTOSCALER_READY not in status_of(policy_with(HPA), None)
    assert autoscaler_verdict(policy_with(), {}) is None


def test_a_scaled_object_not_ready_is_reported_with_kedas_reason() -> None:
    doc = doc_with(copy.deepcopy(KEDA))
    p = parse_policy(doc)
    so = {
        "metadata": {"name": "chat-tier-large"},
        "status": {
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "ScaledObjectCheckFailed", "message": "no trigger"},
                {"type": "Active", "status": "False", "reason": "ScalerNotActive", "message": ""},
            ]
        },
    }
    a = status_of(p, {SO_KEY: so})[AUTOSCALER_READY]
    assert (a["status"], a["reason"]) == ("False", "ScaledObjectCheckFailed")
    assert (
        "ScaledObject chat-tier-large cannot scale (Ready False, ScaledObjectCheckFailed): no trigger" in a["message"]
    )
    # A ScaledObject nobody has reconciled (KEDA's CRD without its operator) has no status: pending.
    assert status_of(p, {SO_KEY: {"metadata": {"name": "chat-tier-large"}}})[AUTOSCALER_READY]["status"] == "Unknown"


def test_with_a_component_not_ready_its_reason_leads_and_the_blind_hpa_is_in_the_message() -> None:
    p = policy_with(HPA)
    deps = ready_deployments(p)
    deps["chat-router"]["status"]["readyReplicas"] = 0
    ready = conditions(compute_status(p, deps, [], autoscalers={HPA_KEY: BLIND}))["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "RollingOut")
    assert "router: 0/2 ready" in ready["message"]
    assert "FailedGetExternalMetric" in ready["message"]


def test_the_cache_keeps_an_autoscalers_conditions_only() -> None:
    cache = ChildCache(WATCHED_KINDS)
    full = copy.deepcopy(BLIND)
    full["metadata"].update(namespace="team-a", labels={"tiergate.io/policy": "chat"}, managedFields=[{"x": 1}])
    full["spec"] = {"minReplicas": 1}
    full["status"]["currentMetrics"] = [{"type": "External"}]
    cache.upsert("HorizontalPodAutoscaler", full)
    (obj,) = cache.autoscalers(("team-a", "chat")).values()
    assert obj["status"] == {"conditions": BLIND["status"]["conditions"]}
    assert "managedFields" not in obj["metadata"]
    assert "spec" not in obj


def test_reconcile_writes_autoscaler_ready_from_the_cached_hpa() -> None:
    kube, cache, mem = FakeKube(), ChildCache(WATCHED_KINDS), PolicyMemory()
    for kind in WATCHED_KINDS:
        cache.replace(kind, [])
    doc = doc_with(copy.deepcopy(HPA))
    reconcile(kube, doc, OperatorConfig(), mem, cache)  # type: ignore[arg-type]
    assert conditions(kube.statuses[-1])[AUTOSCALER_READY]["status"] == "Unknown"
    blind = copy.deepcopy(BLIND)
    blind["metadata"].update(namespace="team-a", labels={"tiergate.io/policy": "chat"})
    cache.upsert("HorizontalPodAutoscaler", blind)
    reconcile(kube, doc, OperatorConfig(), mem, cache, apply=False)  # type: ignore[arg-type]
    a = conditions(kube.statuses[-1])[AUTOSCALER_READY]
    assert (a["status"], a["reason"]) == ("False", "FailedGetExternalMetric")
