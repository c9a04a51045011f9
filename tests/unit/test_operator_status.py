"""Pure status computation from children's observed state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tiergate.api.policy import RoutingPolicy, parse_policy
from tiergate_operator.status import compute_status, pod_problem, status_changed

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"
DEPLOYMENTS = {"chat-tier-small": 2, "chat-tier-large": 1, "chat-router": 2, "chat-reward": 1}


def policy() -> RoutingPolicy:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update({"namespace": "ns", "uid": "u", "generation": 7})
    return parse_policy(doc)


def dep(name: str, ready: int | None = None, gen: int = 3, seen: int = 3, updated: int | None = None) -> dict[str, Any]:
    want = DEPLOYMENTS[name]
    ready = want if ready is None else ready
    return {
        "metadata": {"name": name, "generation": gen},
        "spec": {"replicas": want},
        "status": {
            "observedGeneration": seen,
            "replicas": want,
            "readyReplicas": ready,
            "updatedReplicas": want if updated is None else updated,
        },
    }


def all_ready() -> dict[str, dict[str, Any]]:
    return {n: dep(n) for n in DEPLOYMENTS}


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    (c,) = [c for c in status["conditions"] if c["type"] == type_]
    return c


def test_all_ready() -> None:
    st = compute_status(policy(), all_ready(), [], now="2026-01-01T00:00:00Z")
    assert cond(st, "Ready")["status"] == "True"
    assert cond(st, "Progressing")["status"] == "False"
    assert cond(st, "Degraded")["status"] == "False"
    assert st["observedGeneration"] == 7
    assert all(c["observedGeneration"] == 7 for c in st["conditions"])
    assert st["readyTiers"] == "2/2"
    assert st["routerEndpoint"] == "http://chat-router.ns.svc:8080/v1"
    assert st["tiers"][0] == {
        "name": "small",
        "desiredReplicas": 2,
        "readyReplicas": 2,
        "endpoint": "http://chat-tier-small.ns.svc:8000/v1",
    }


def test_missing_child_is_progressing_not_ready() -> None:
    deps = all_ready()
    del deps["chat-reward"]
    st = compute_status(policy(), deps, [])
    assert cond(st, "Ready")["status"] == "False"
    assert cond(st, "Ready")["reason"] == "Creating"
    assert "reward model" in cond(st, "Ready")["message"]
    assert cond(st, "Progressing")["status"] == "True"
    assert cond(st, "Degraded")["status"] == "False"


def test_rollout_in_progress() -> None:
    deps = all_ready()
    deps["chat-tier-large"] = dep("chat-tier-large", gen=4, seen=3)
    st = compute_status(policy(), deps, [])
    assert cond(st, "Ready")["reason"] == "RollingOut"
    assert "tier large" in cond(st, "Progressing")["message"]
    assert st["readyTiers"] == "1/2"


def unschedulable_pod(tier: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"chat-tier-{tier}-abc",
            "labels": {
                "tiergate.io/policy": "chat",
                "app.kubernetes.io/component": "model-server",
                "tiergate.io/tier": tier,
            },
        },
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/7 nodes are available: 2 Insufficient nvidia.com/gpu.",
                }
            ],
        },
    }


def test_unschedulable_tier_is_degraded_with_the_schedulers_words() -> None:
    deps = all_ready()
    deps["chat-tier-large"] = dep("chat-tier-large", ready=0)
    st = compute_status(policy(), deps, [unschedulable_pod("large")])
    d = cond(st, "Degraded")
    assert d["status"] == "True"
    assert d["reason"] == "Unschedulable"
    assert "tier large" in d["message"]
    assert "Insufficient nvidia.com/gpu" in d["message"]
    assert cond(st, "Ready")["status"] == "False"
    assert cond(st, "Ready")["reason"] == "Unschedulable"


def test_problem_pod_of_another_tier_does_not_taint_this_one() -> None:
    deps = all_ready()
    st = compute_status(policy(), deps, [unschedulable_pod("medium")])
    assert cond(st, "Ready")["status"] == "True"


def test_crash_loop_is_degraded() -> None:
    pod = {
        "metadata": {"name": "p", "labels": {}},
        "status": {
            "containerStatuses": [
                {"name": "engine", "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m"}}}
            ]
        },
    }
    assert pod_problem(pod) == ("CrashLoopBackOff", "pod p container engine: CrashLoopBackOff: back-off 5m")


def test_transition_time_kept_while_status_unchanged() -> None:
    first = compute_status(policy(), all_ready(), [], now="2026-01-01T00:00:00Z")
    second = compute_status(policy(), all_ready(), [], first["conditions"], now="2026-01-02T00:00:00Z")
    assert cond(second, "Ready")["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert not status_changed(first, second)
    deps = all_ready()
    deps["chat-router"] = dep("chat-router", ready=1)
    third = compute_status(policy(), deps, [], second["conditions"], now="2026-01-03T00:00:00Z")
    assert cond(third, "Ready")["lastTransitionTime"] == "2026-01-03T00:00:00Z"
    assert status_changed(second, third)


def test_autoscaled_tier_reads_desired_from_the_deployment() -> None:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update({"namespace": "ns", "uid": "u", "generation": 1})
    doc["spec"]["tiers"][0]["autoscaling"] = {"mode": "External"}
    p = parse_policy(doc)
    deps = all_ready()
    deps["chat-tier-small"]["spec"]["replicas"] = 5
    deps["chat-tier-small"]["status"].update({"replicas": 5, "readyReplicas": 5, "updatedReplicas": 5})
    st = compute_status(p, deps, [])
    assert st["tiers"][0]["desiredReplicas"] == 5
    assert cond(st, "Ready")["status"] == "True"
