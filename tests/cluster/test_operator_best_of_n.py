"""Best-of-N on the real control plane: the router of a policy with bestOfN is configured with the reward Service,
the reward pods land on the reward pool and nowhere else (the real scheduler, kwok nodes), and status reports the
reward model not ready, then ready."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support.operator_cluster import (
    Operator,
    apply_policy,
    classifier_configmap,
    condition,
    get_json,
    install_crd,
    operator_running,
    policy,
    sample_doc,
    wait_for,
    wait_ready,
)
from tiergate.api import naming
from tiergate.api.policy import parse_policy
from tiergate.devcluster.cluster import DevCluster

pytestmark = pytest.mark.cluster

# Not the default 8000: the port has to travel from the policy to the Service, the pod and the router's URL.
REWARD_PORT = 8100
REWARD_SELECTOR = f"{naming.POLICY_LABEL}=chat,{naming.COMPONENT_LABEL}={naming.COMPONENT_REWARD}"


@pytest.fixture(scope="module")
def crd(cluster: DevCluster) -> None:
    install_crd(cluster)


@pytest.fixture
def operator(cluster: DevCluster, crd: None, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    yield from operator_running(Operator(cluster, tmp_path, "--namespace", namespace))


@pytest.fixture
def reward_nodes_cordoned(cluster: DevCluster) -> Iterator[list[str]]:
    """The reward pool's nodes, cordoned: nothing new lands there until the test uncordons them (and always after
    it, so the session's other tests find the pool as it was)."""
    names = [n["metadata"]["name"] for n in get_json(cluster, "nodes", "-l", f"{naming.POOL_LABEL}=reward")["items"]]
    assert names, "the dev cluster has a reward pool"
    for n in names:
        cluster.kubectl("cordon", n)
    try:
        yield names
    finally:
        for n in names:
            cluster.kubectl("uncordon", n, check=False)


def _doc(replicas: int = 1) -> dict[str, Any]:
    doc = copy.deepcopy(sample_doc())
    doc["spec"]["bestOfN"]["rewardModel"].update({"port": REWARD_PORT, "replicas": replicas})
    return doc


def _reward_pods(cluster: DevCluster, ns: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = get_json(cluster, "pods", "-n", ns, "-l", REWARD_SELECTOR)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _pool(cluster: DevCluster, node: str) -> str:
    pool: str = get_json(cluster, "node", node)["metadata"]["labels"][naming.POOL_LABEL]
    return pool


def _reward_condition(cluster: DevCluster, ns: str, status: str, reason: str) -> dict[str, Any] | None:
    p = policy(cluster, ns, "chat")
    c = condition(p, "RewardModelReady")
    if p is None or c.get("status") != status or c.get("reason") != reason:
        return None
    if c.get("observedGeneration") != p["metadata"]["generation"]:
        return None
    return p


def test_router_reward_service_pool_and_status(
    cluster: DevCluster, namespace: str, operator: Operator, reward_nodes_cordoned: list[str]
) -> None:
    ns = namespace
    model = sample_doc()["spec"]["bestOfN"]["rewardModel"]["model"]
    classifier_configmap(cluster, ns)
    apply_policy(cluster, ns, _doc())

    # 1. Not ready: the reward pool is cordoned, so the scheduler places the reward pod nowhere, although the GPU
    #    pools of the tiers have GPUs free. Status says so, naming the reward model; the tiers serve meanwhile.
    p = wait_for(
        "RewardModelReady False",
        lambda: _reward_condition(cluster, ns, "False", "RewardModelUnavailable"),
        timeout=120,
    )
    c = condition(p, "RewardModelReady")
    assert model in c["message"]
    assert "reference tier" in c["message"]

    def tiers_up_reward_stuck() -> dict[str, Any] | None:
        q = policy(cluster, ns, "chat")
        if q is None or q.get("status", {}).get("readyTiers") != "2/2":
            return None
        return q if condition(q, "Degraded").get("reason") == "Unschedulable" else None

    p = wait_for("the tiers ready and the reward pod unschedulable", tiers_up_reward_stuck, timeout=120)
    assert f"reward model {model}" in condition(p, "Degraded")["message"]
    assert "cannot be scheduled" in condition(p, "Degraded")["message"]
    assert p["status"]["rewardModel"]["readyReplicas"] == 0
    assert condition(p, "Ready")["status"] == "False"
    (pending,) = _reward_pods(cluster, ns)
    assert not pending["spec"].get("nodeName"), "a cordoned pool holds it back; no other pool takes it"

    # 2. Ready: uncordoned, the pod lands on the reward pool and kwok makes it ready.
    for n in reward_nodes_cordoned:
        cluster.kubectl("uncordon", n)
    # Generous: a reward pod of the session's previous test may still be leaving the pool's one GPU.
    p = wait_ready(cluster, ns, "chat", timeout=180)
    c = condition(p, "RewardModelReady")
    assert (c["status"], c["reason"]) == ("True", "RewardModelAvailable")
    endpoint = naming.reward_url("chat", ns, REWARD_PORT)
    assert p["status"]["rewardModel"] == {
        "model": model,
        "desiredReplicas": 1,
        "readyReplicas": 1,
        "endpoint": endpoint,
    }
    (running,) = _reward_pods(cluster, ns)
    assert _pool(cluster, running["spec"]["nodeName"]) == "reward"
    events = cluster.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=chat")
    assert "RewardModelAvailable" in events

    # 3. The router is configured with the reward Service: the policy file its Deployment mounts names it (through
    #    naming.reward_url, as the router derives it), and that Service's endpoints are the reward pod.
    router = get_json(cluster, "deployment", "chat-router", "-n", ns)
    pod_spec = router["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    assert "--reward-url" not in container["args"]
    assert container["args"][container["args"].index("--policy") + 1] == naming.POLICY_FILE
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == "policy"]
    cm = get_json(cluster, "configmap", volume["configMap"]["name"], "-n", ns)
    mounted = parse_policy(yaml.safe_load(cm["data"][naming.POLICY_FILE_KEY]))
    assert mounted.spec.best_of_n is not None
    assert mounted.namespace == ns
    derived = naming.reward_url(mounted.name, mounted.namespace, mounted.spec.best_of_n.reward_model.port)
    assert derived == endpoint
    host = urlsplit(derived).hostname or ""
    svc_name, svc_ns = host.split(".")[:2]
    svc = get_json(cluster, "service", svc_name, "-n", svc_ns)
    assert [(q["port"], q["targetPort"]) for q in svc["spec"]["ports"]] == [(REWARD_PORT, "http")]

    def ready_endpoints() -> list[tuple[str, int]] | None:
        slices = get_json(cluster, "endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={svc_name}")
        out = [
            (addr, port["port"])
            for s in slices["items"]
            for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready")
            for addr in e["addresses"]
            for port in s.get("ports") or []
        ]
        return out or None

    assert wait_for("the reward Service's endpoints", ready_endpoints, timeout=60) == [
        (running["status"]["podIP"], REWARD_PORT)
    ]

    # 4. Nowhere else: a second replica finds the reward pool's one GPU taken and stays Pending, although the
    #    GPU pools of the tiers have GPUs free. One ready replica still scores: RewardModelReady stays True.
    apply_policy(cluster, ns, _doc(replicas=2))

    def second_stuck() -> dict[str, Any] | None:
        q = policy(cluster, ns, "chat")
        if q is None or q["status"].get("observedGeneration") != q["metadata"]["generation"]:
            return None
        return q if condition(q, "Degraded").get("reason") == "Unschedulable" else None

    p = wait_for("the second reward replica unschedulable", second_stuck, timeout=120)
    degraded = condition(p, "Degraded")["message"]
    assert f"reward model {model}" in degraded
    assert "affinity/selector" in degraded, degraded  # the scheduler's words: the other pools did not match
    c = condition(p, "RewardModelReady")
    assert (c["status"], c["reason"]) == ("True", "RewardModelAvailable")
    assert "1/2 ready" in c["message"]
    assert (p["status"]["rewardModel"]["desiredReplicas"], p["status"]["rewardModel"]["readyReplicas"]) == (2, 1)
    pods = _reward_pods(cluster, ns)
    assert len(pods) == 2
    placed = [_pool(cluster, q["spec"]["nodeName"]) for q in pods if q["spec"].get("nodeName")]
    assert placed == ["reward"]
