"""A namespace that enforces the `restricted` Pod Security Standard admits every pod the operator creates (vLLM
tiers, router, reward model): the API server's own PodSecurity admission, on by default, is the judge. It is shown
to be on and to bite in the same namespace: a privileged pod, and a tier pod with the engine's old security context
(root, no runAsNonRoot), are refused there."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.operator_cluster import (
    SAMPLE,
    Operator,
    classifier_configmap,
    condition,
    get_json,
    install_crd,
    kubectl_raw,
    operator_running,
    policy,
    restrict_namespace,
)
from tiergate.devcluster.cluster import DevCluster, wait_for

pytestmark = pytest.mark.cluster

DEPLOYMENTS = {"chat-tier-small", "chat-tier-large", "chat-router", "chat-reward"}


@pytest.fixture
def restricted(cluster: DevCluster, namespace: str) -> str:
    return restrict_namespace(cluster, namespace)


@pytest.fixture
def operator(cluster: DevCluster, restricted: str, tmp_path: Path) -> Iterator[Operator]:
    install_crd(cluster)
    yield from operator_running(Operator(cluster, tmp_path, "--namespace", restricted))


def _create_pod(cluster: DevCluster, ns: str, name: str, spec: dict[str, Any], *dry: str) -> Any:
    # No labels: a bare pod that a ReplicaSet's selector could adopt would muddle the counts below.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
    return kubectl_raw(cluster, "create", "-n", ns, *dry, "-f", "-", input=json.dumps(pod))


def _settled(cluster: DevCluster, ns: str) -> dict[str, Any] | None:
    """Ready, or Degraded because a ReplicaSet could not create its pods (what an admission refusal looks like).
    Not any Degraded: the reward model is briefly Unschedulable while the previous test's reward pod (the reward
    pool has one GPU) is still being deleted."""
    p = policy(cluster, ns, "chat")
    gen = (p or {}).get("metadata", {}).get("generation")
    ready, degraded = condition(p, "Ready"), condition(p, "Degraded")
    if ready.get("status") == "True" and ready.get("observedGeneration") == gen:
        return p
    if degraded.get("status") == "True" and degraded.get("reason") == "FailedCreate":
        return p
    return None


def test_a_restricted_namespace_admits_every_pod_the_operator_creates(
    cluster: DevCluster, restricted: str, operator: Operator
) -> None:
    ns = restricted
    # The admission is on and enforcing here: a privileged pod is refused, naming the standard.
    privileged = {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]}
    r = _create_pod(cluster, ns, "privileged", privileged)
    assert r.returncode != 0, f"a privileged pod was admitted: {r.stdout}"
    assert 'violates PodSecurity "restricted' in r.stderr, r.stderr

    classifier_configmap(cluster, ns)
    cluster.kubectl("apply", "-n", ns, "-f", str(SAMPLE))
    # A refused pod makes the ReplicaSet report FailedCreate, which the policy's status quotes.
    settled = wait_for("the policy to be Ready or Degraded", lambda: _settled(cluster, ns), timeout=180)
    assert condition(settled, "Ready").get("status") == "True", condition(settled, "Degraded")

    deployments = {d["metadata"]["name"]: d for d in get_json(cluster, "deployments", "-n", ns)["items"]}
    assert set(deployments) == DEPLOYMENTS
    replicasets = get_json(cluster, "replicasets", "-n", ns)["items"]
    pods = get_json(cluster, "pods", "-n", ns)["items"]
    for name, d in deployments.items():
        owned = [rs for rs in replicasets if rs["metadata"]["ownerReferences"][0]["name"] == name]
        assert owned, name
        for rs in owned:
            failures = [c for c in rs.get("status", {}).get("conditions") or [] if c["type"] == "ReplicaFailure"]
            assert failures == [], f"{rs['metadata']['name']}: {failures}"
        rs_names = {rs["metadata"]["name"] for rs in owned}
        mine = [p for p in pods if p["metadata"]["ownerReferences"][0]["name"] in rs_names]
        assert len(mine) == d["spec"]["replicas"] > 0, name
    refused = [e for e in get_json(cluster, "events", "-n", ns)["items"] if e.get("reason") == "FailedCreate"]
    assert refused == [], [e.get("message") for e in refused]

    # The test can fail: the tier's own pod template passes a server-side dry run here, and the same template
    # with the engine's old security context (root by default, no runAsNonRoot) is refused.
    template = deployments["chat-tier-small"]["spec"]["template"]["spec"]
    ok = _create_pod(cluster, ns, "tier-as-built", copy.deepcopy(template), "--dry-run=server")
    assert ok.returncode == 0, ok.stderr
    old = copy.deepcopy(template)
    for sc in (old["securityContext"], old["containers"][0]["securityContext"]):
        for k in ("runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "fsGroupChangePolicy"):
            sc.pop(k, None)
    no = _create_pod(cluster, ns, "tier-as-it-was", old, "--dry-run=server")
    assert no.returncode != 0, f"the old engine pod was admitted: {no.stdout}"
    assert "runAsNonRoot" in no.stderr, no.stderr
