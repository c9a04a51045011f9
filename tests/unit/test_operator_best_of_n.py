"""The operator's side of best-of-N: the reward model's Deployment and Service, how the router finds them, and what
status says about the reward model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tiergate.api import naming
from tiergate.api.errors import FieldError
from tiergate.api.policy import RoutingPolicy, parse_policy
from tiergate_operator import builders as b
from tiergate_operator.cache import ChildCache
from tiergate_operator.config import OperatorConfig
from tiergate_operator.controller import Controller
from tiergate_operator.reconcile import Outcome
from tiergate_operator.status import compute_status, invalid_spec, refused_status

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"
REWARD_MODEL = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
REPLICAS = {"chat-tier-small": 2, "chat-tier-large": 1, "chat-router": 2, "chat-reward": 1}


def policy(mutate: Any = None) -> RoutingPolicy:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update({"namespace": "team-a", "uid": "uid-123", "generation": 3})
    if mutate:
        mutate(doc)
    return parse_policy(doc)


def _reward_port(doc: dict[str, Any], port: int) -> None:
    doc["spec"]["bestOfN"]["rewardModel"]["port"] = port


# --- builders ---------------------------------------------------------------------------------------------------


def test_sample_policy_asks_for_best_of_n_on_the_reward_pool() -> None:
    bon = policy().spec.best_of_n
    assert bon is not None
    assert bon.reward_model.model == REWARD_MODEL
    assert bon.reward_model.pool == "reward"
    assert bon.reward_model.gpus == 1


def test_reward_deployment_runs_vllms_pooling_runner_under_the_models_name() -> None:
    extra = {"port": 8100, "args": ["--max-model-len", "4096"]}
    p = policy(lambda d: d["spec"]["bestOfN"]["rewardModel"].update(extra))
    (c,) = b.build_reward_deployment(p)["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    # Each flag followed by its value, in the form vLLM's `serve` parser takes (engine/arg_utils.py).
    pairs = {args[i]: args[i + 1] for i in range(0, len(args) - 1) if args[i].startswith("--")}
    assert pairs["--model"] == REWARD_MODEL
    assert pairs["--served-model-name"] == REWARD_MODEL
    assert pairs["--runner"] == "pooling"
    assert pairs["--port"] == "8100"
    assert pairs["--host"] == "0.0.0.0"
    assert args[-2:] == ["--max-model-len", "4096"], "the policy's own args come last, so they can add to ours"
    assert c["ports"] == [{"name": "http", "containerPort": 8100, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}


def test_reward_pods_are_restricted_like_tier_pods_and_placed_on_the_reward_pool_only() -> None:
    p = policy()
    reward = b.build_reward_deployment(p)["spec"]["template"]["spec"]
    tier = b.build_tier_deployment(p, p.spec.tier("small"))["spec"]["template"]["spec"]
    assert reward["securityContext"] == tier["securityContext"]
    assert reward["securityContext"]["runAsNonRoot"] is True
    (rc,) = reward["containers"]
    (tc,) = tier["containers"]
    assert rc["securityContext"] == tc["securityContext"]
    assert rc["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert rc["securityContext"]["readOnlyRootFilesystem"] is True
    assert reward["automountServiceAccountToken"] is False
    assert {v["name"] for v in reward["volumes"]} == {"shm", "home", "cache", "tmp"}
    assert reward["nodeSelector"] == {naming.POOL_LABEL: "reward"}
    assert reward["tolerations"] == [{"key": naming.GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]
    assert rc["resources"] == {"requests": {naming.GPU_RESOURCE: "1"}, "limits": {naming.GPU_RESOURCE: "1"}}


def test_reward_service_selects_exactly_the_reward_pods_on_the_port_the_router_calls() -> None:
    p = policy(lambda d: _reward_port(d, 8100))
    svc = b.build_reward_service(p)
    dep = b.build_reward_deployment(p)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["metadata"]["name"] == naming.reward_name("chat") == "chat-reward"
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["selector"][naming.COMPONENT_LABEL] == naming.COMPONENT_REWARD
    # No other child's pods match it (tiers and router carry other components).
    for other in b.build_children(p):
        if other["kind"] == "Deployment" and other is not dep and other["metadata"]["name"] != "chat-reward":
            labels = other["spec"]["template"]["metadata"]["labels"]
            assert not all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), other["metadata"]["name"]
    (port,) = svc["spec"]["ports"]
    assert port == {"name": "http", "port": 8100, "targetPort": "http", "protocol": "TCP"}
    url = urlsplit(naming.reward_url("chat", "team-a", 8100))
    assert (url.scheme, url.hostname, url.port, url.path) == ("http", "chat-reward.team-a.svc", 8100, "")


def test_router_derives_the_reward_url_from_the_policy_file_it_mounts() -> None:
    """What the router reads (the ConfigMap's policy, mounted at naming.POLICY_FILE) is enough to name the reward
    Service: its name, namespace and the reward model's port. The operator adds no flag for it."""
    p = policy(lambda d: _reward_port(d, 8100))
    cm = b.build_router_configmap(p)
    mounted = parse_policy(yaml.safe_load(cm["data"][naming.POLICY_FILE_KEY]))
    assert mounted.spec.best_of_n is not None
    assert mounted.namespace is not None
    derived = naming.reward_url(mounted.name, mounted.namespace, mounted.spec.best_of_n.reward_model.port)
    svc = b.build_reward_service(p)
    assert derived == f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{8100}"

    dep = b.build_router_deployment(p)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "--reward-url" not in c["args"]
    assert {"name": "policy", "mountPath": naming.POLICY_MOUNT_DIR, "readOnly": True} in c["volumeMounts"]
    assert {"name": "policy", "configMap": {"name": cm["metadata"]["name"]}} in dep["spec"]["template"]["spec"][
        "volumes"
    ]
    assert c["args"][1:3] == ["--policy", naming.POLICY_FILE]


# --- status -----------------------------------------------------------------------------------------------------


def dep(name: str, ready: int | None = None, want: int | None = None) -> dict[str, Any]:
    want = REPLICAS[name] if want is None else want
    return {
        "metadata": {"name": name, "generation": 2},
        "spec": {"replicas": want},
        "status": {
            "observedGeneration": 2,
            "replicas": want,
            "readyReplicas": want if ready is None else ready,
            "updatedReplicas": want,
        },
    }


def deployments(**override: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    out = {n: dep(n) for n in REPLICAS}
    for k, v in override.items():
        name = k.replace("_", "-")
        if v is None:
            del out[name]
        else:
            out[name] = v
    return out


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    (c,) = [c for c in status["conditions"] if c["type"] == type_]
    return c


def unschedulable_reward_pod() -> dict[str, Any]:
    return {
        "metadata": {
            "name": "chat-reward-7d9f-x2",
            "labels": {naming.POLICY_LABEL: "chat", naming.COMPONENT_LABEL: naming.COMPONENT_REWARD},
        },
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/7 nodes are available: 1 Insufficient nvidia.com/gpu.",
                }
            ],
        },
    }


def test_reward_model_ready() -> None:
    st = compute_status(policy(), deployments(), [])
    c = cond(st, "RewardModelReady")
    assert (c["status"], c["reason"], c["observedGeneration"]) == ("True", "RewardModelAvailable", 3)
    assert REWARD_MODEL in c["message"]
    assert st["rewardModel"] == {
        "model": REWARD_MODEL,
        "desiredReplicas": 1,
        "readyReplicas": 1,
        "endpoint": "http://chat-reward.team-a.svc:8000",
    }
    assert cond(st, "Ready")["status"] == "True"


def test_reward_model_not_created_yet() -> None:
    st = compute_status(policy(), deployments(chat_reward=None), [])
    c = cond(st, "RewardModelReady")
    assert (c["status"], c["reason"]) == ("False", "RewardModelUnavailable")
    assert f"reward model {REWARD_MODEL}: Deployment chat-reward not created yet" in c["message"]
    assert "reference tier" in c["message"]
    assert st["rewardModel"]["readyReplicas"] == 0
    assert cond(st, "Ready")["status"] == "False"
    assert REWARD_MODEL in cond(st, "Ready")["message"]


def test_unschedulable_reward_model_names_the_model_and_quotes_the_scheduler() -> None:
    st = compute_status(policy(), deployments(chat_reward=dep("chat-reward", ready=0)), [unschedulable_reward_pod()])
    c = cond(st, "RewardModelReady")
    assert (c["status"], c["reason"]) == ("False", "RewardModelUnavailable")
    assert "Insufficient nvidia.com/gpu" in c["message"]
    assert REWARD_MODEL in c["message"]
    d = cond(st, "Degraded")
    assert (d["status"], d["reason"]) == ("True", "Unschedulable")
    assert f"reward model {REWARD_MODEL}" in d["message"]
    # The tiers' own readiness is untouched: their status says they serve.
    assert st["readyTiers"] == "2/2"


def test_one_ready_replica_of_several_is_enough_to_score() -> None:
    p = policy(lambda d: d["spec"]["bestOfN"]["rewardModel"].update({"replicas": 3}))
    st = compute_status(p, deployments(chat_reward=dep("chat-reward", ready=1, want=3)), [])
    assert cond(st, "RewardModelReady")["status"] == "True"
    assert "1/3 ready" in cond(st, "RewardModelReady")["message"]
    assert (st["rewardModel"]["desiredReplicas"], st["rewardModel"]["readyReplicas"]) == (3, 1)
    assert cond(st, "Ready")["status"] == "False", "the policy as a whole still waits for all three"


def test_reward_model_scaled_to_zero_is_unavailable_though_everything_asked_for_is_ready() -> None:
    p = policy(lambda d: d["spec"]["bestOfN"]["rewardModel"].update({"replicas": 0}))
    st = compute_status(p, deployments(chat_reward=dep("chat-reward", want=0)), [])
    c = cond(st, "RewardModelReady")
    assert (c["status"], c["reason"]) == ("False", "RewardModelUnavailable")
    assert f"reward model {REWARD_MODEL}: 0 replicas asked for" in c["message"]
    assert cond(st, "Ready")["status"] == "True"


def test_no_best_of_n_no_reward_status() -> None:
    p = policy(lambda d: d["spec"].pop("bestOfN"))
    st = compute_status(p, deployments(chat_reward=None), [])
    assert "rewardModel" not in st
    assert [c["type"] for c in st["conditions"]] == ["Ready", "Progressing", "Degraded"]


def test_computed_status_fits_the_typed_status_model() -> None:
    """What the operator writes parses as the CRD's status (a field the schema lacks would be pruned)."""
    from tiergate.api.policy import RoutingPolicyStatus

    st = compute_status(policy(), deployments(), [])
    typed = RoutingPolicyStatus.model_validate(st)
    assert typed.reward_model is not None
    assert typed.reward_model.endpoint == "http://chat-reward.team-a.svc:8000"
    assert RoutingPolicyStatus.model_fields["reward_model"].alias == "rewardModel"


def test_a_refused_spec_keeps_what_was_known_about_the_reward_model() -> None:
    before = compute_status(policy(), deployments(), [])
    problem = invalid_spec([FieldError("spec.tiers[0].model", "too long")])
    st = refused_status(before, problem, 4)
    assert cond(st, "RewardModelReady") == cond(before, "RewardModelReady")
    assert st["rewardModel"] == before["rewardModel"]
    assert cond(st, "Ready")["reason"] == "InvalidSpec"


# --- events -----------------------------------------------------------------------------------------------------


class _Events:
    def __init__(self) -> None:
        self.posted: list[dict[str, Any]] = []

    def create(self, obj: dict[str, Any]) -> None:
        self.posted.append(obj)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (None, False, []),  # a new policy's reward model is being created: Progressing says so, no warning
        (False, True, [("RewardModelAvailable", "Normal")]),
        (True, False, [("RewardModelUnavailable", "Warning")]),
        (True, True, []),
    ],
)
def test_events_when_the_reward_model_comes_and_goes(
    before: bool | None, after: bool, expected: list[tuple[str, str]]
) -> None:
    def status(ready: bool) -> dict[str, Any]:
        reward = dep("chat-reward", ready=1 if ready else 0)
        return compute_status(policy(), deployments(chat_reward=reward), [])

    async def go() -> list[tuple[str, str]]:
        kube = _Events()
        c = Controller(OperatorConfig(), kube=kube, cache=ChildCache(["Deployment"]))  # type: ignore[arg-type]
        try:
            prev = [] if before is None else [cond(status(before), "RewardModelReady")]
            out = Outcome(policy(), status=status(after), previous_conditions=prev)
            body = {"metadata": {"name": "chat", "namespace": "team-a", "uid": "uid-123"}}
            c._report(body, out)
        finally:
            c._executor.shutdown()
            c._apply_pool.shutdown()
        return [(e["reason"], e["type"]) for e in kube.posted if e["reason"].startswith("RewardModel")]

    assert asyncio.run(go()) == expected
