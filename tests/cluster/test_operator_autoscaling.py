"""Per-tier autoscaling modes on the real control plane (spec.tiers[].autoscaling):

- HPA: the operator creates the autoscaling/v2 HPA, owned by the policy, with the tier's bounds and the metrics the
  chart's adapter rules serve; the API server accepts it and the real HPA controller reads those metrics (here it
  finds no metrics API, and says so naming them); removing autoscaling prunes it and the operator takes the
  replicas back.
- External: the operator never touches replicas while another actor changes them.
- KEDA: without KEDA's CRD the policy is refused with KedaNotInstalled naming the field and nothing is applied;
  with KEDA's own published CRD installed (tiergate.devcluster.keda) the operator notices by itself and the API
  server accepts the ScaledObject.
- Bad input is refused by the API server naming the field.

The scaling loop itself (metrics -> HPA -> kwok pods) is the Prometheus test bed's test."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.operator_cluster import (
    Operator,
    apply_policy,
    classifier_configmap,
    condition,
    get_json,
    install_crd,
    kubectl_raw,
    operator_running,
    policy,
    sample_doc,
    wait_ready,
)
from tiergate.devcluster.cluster import DevCluster, wait_for
from tiergate.devcluster.keda import SCALED_OBJECT_CRD_NAME, scaled_object_crd

pytestmark = pytest.mark.cluster

HPA = {
    "mode": "HPA",
    "targets": {"routerDemandPerReplica": 4, "vllmWaitingPerReplica": 5},
    "behavior": {"scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 60},
}
PROM = "http://prometheus.monitoring.svc:9090"


@pytest.fixture
def operator(cluster: DevCluster, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    install_crd(cluster)
    yield from operator_running(Operator(cluster, tmp_path, "--namespace", namespace))


def _get(cluster: DevCluster, kind: str, ns: str, name: str) -> dict[str, Any] | None:
    r = kubectl_raw(cluster, "get", kind, name, "-n", ns, "-o", "json")
    return json.loads(r.stdout) if r.returncode == 0 else None


def _replica_managers(cluster: DevCluster, ns: str, name: str) -> set[str]:
    d = get_json(cluster, "deployment", name, "-n", ns, "--show-managed-fields")
    return {m["manager"] for m in d["metadata"]["managedFields"] if '"f:replicas"' in json.dumps(m.get("fieldsV1"))}


def test_hpa_mode_creates_the_owned_hpa_and_removing_it_prunes_it(
    cluster: DevCluster, namespace: str, operator: Operator
) -> None:
    ns = namespace
    classifier_configmap(cluster, ns)
    doc = sample_doc()
    doc["spec"]["tiers"][1]["autoscaling"] = copy.deepcopy(HPA)  # large: replicas min 1, max 2
    apply_policy(cluster, ns, doc)
    p = wait_ready(cluster, ns, "chat")

    hpa = wait_for("the HPA of tier large", lambda: _get(cluster, "hpa.v2.autoscaling", ns, "chat-tier-large"))
    (owner,) = hpa["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "RoutingPolicy",
        "chat",
        p["metadata"]["uid"],
        True,
    )
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat-tier-large"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 2)
    external, pods = spec["metrics"]
    assert external["external"]["metric"] == {
        "name": "tiergate_router_tier_demand",
        "selector": {"matchLabels": {"routingpolicy": "chat", "tier": "large"}},
    }
    assert external["external"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert pods["pods"]["metric"] == {"name": "vllm_num_requests_waiting"}
    assert pods["pods"]["target"] == {"type": "AverageValue", "averageValue": "5"}
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 60
    assert spec["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0
    # No HPA for the tier without autoscaling.
    assert _get(cluster, "hpa.v2.autoscaling", ns, "chat-tier-small") is None

    # The controller-manager's HPA controller works on it: this bed serves no metrics API, and it says which metric
    # it could not get, with our selector.
    def complained() -> str | None:
        h = _get(cluster, "hpa.v2.autoscaling", ns, "chat-tier-large") or {}
        text = json.dumps((h.get("status") or {}).get("conditions") or [])
        return text if "tiergate_router_tier_demand" in text or "vllm_num_requests_waiting" in text else None

    said = wait_for("the HPA controller reporting on its metrics", complained, timeout=90)
    print(said[:600])
    # The operator left the large tier's replicas to the HPA and still owns the small tier's.
    assert "tiergate-operator" not in _replica_managers(cluster, ns, "chat-tier-large")
    assert "tiergate-operator" in _replica_managers(cluster, ns, "chat-tier-small")

    # Autoscaling removed: the HPA is pruned and the operator keeps the tier at min again.
    del doc["spec"]["tiers"][1]["autoscaling"]
    apply_policy(cluster, ns, doc)
    wait_for("the HPA pruned", lambda: _get(cluster, "hpa.v2.autoscaling", ns, "chat-tier-large") is None, timeout=60)
    wait_ready(cluster, ns, "chat")
    assert "tiergate-operator" in _replica_managers(cluster, ns, "chat-tier-large")


def test_external_mode_leaves_replicas_to_another_actor(
    cluster: DevCluster, namespace: str, operator: Operator
) -> None:
    ns = namespace
    classifier_configmap(cluster, ns)
    doc = sample_doc()
    doc["spec"]["tiers"][0]["autoscaling"] = {"mode": "External"}
    apply_policy(cluster, ns, doc)
    wait_ready(cluster, ns, "chat")
    for replicas in (3, 1):
        # Another actor (here a person with kubectl scale) sets the count.
        cluster.kubectl("scale", "deployment", "chat-tier-small", "-n", ns, f"--replicas={replicas}")
        # A spec change makes the operator apply again; the other actor's count must survive it.
        doc["spec"]["tiers"][0]["engine"]["args"].append(f"--seed={replicas}")
        apply_policy(cluster, ns, doc)

        def rolled(want: int = replicas) -> dict[str, Any] | None:
            p = wait_ready(cluster, ns, "chat")
            return p if p["status"]["tiers"][0]["desiredReplicas"] == want else None

        p = wait_for(f"Ready with {replicas} replicas of tier small", rolled, timeout=90)
        d = get_json(cluster, "deployment", "chat-tier-small", "-n", ns)
        assert d["spec"]["replicas"] == replicas
        assert f"--seed={replicas}" in d["spec"]["template"]["spec"]["containers"][0]["args"]
        assert p["status"]["tiers"][0]["readyReplicas"] == replicas
        assert "tiergate-operator" not in _replica_managers(cluster, ns, "chat-tier-small")
    # External makes no autoscaler object.
    assert get_json(cluster, "hpa.v2.autoscaling", "-n", ns)["items"] == []


def _keda_doc() -> dict[str, Any]:
    doc = sample_doc()
    large = doc["spec"]["tiers"][1]
    large["replicas"] = {"min": 0, "max": 2}  # scale to zero: KEDA's to do, woken by the router's demand
    large["autoscaling"] = {
        "mode": "KEDA",
        "targets": {"routerDemandPerReplica": 3, "vllmWaitingPerReplica": 5},
        "prometheusServerAddress": PROM,
    }
    return doc


def test_keda_mode_refused_without_keda_and_accepted_with_its_crd(
    cluster: DevCluster, namespace: str, operator: Operator
) -> None:
    ns = namespace
    crd_file = scaled_object_crd()  # KEDA's published CRD (Go module at the pinned release), cached
    cluster.kubectl("delete", "crd", SCALED_OBJECT_CRD_NAME, "--ignore-not-found", "--wait=true")
    classifier_configmap(cluster, ns)
    try:
        apply_policy(cluster, ns, _keda_doc())

        def refused() -> dict[str, Any] | None:
            p = policy(cluster, ns, "chat")
            d = condition(p, "Degraded")
            gen = (p or {}).get("metadata", {}).get("generation")
            ok = d.get("reason") == "KedaNotInstalled" and d.get("observedGeneration") == gen
            return p if ok else None

        p = wait_for("Degraded=KedaNotInstalled", refused, timeout=90)
        ready = condition(p, "Ready")
        assert ready["status"] == "False"
        assert ready["reason"] == "KedaNotInstalled"
        assert "spec.tiers[1].autoscaling.mode" in ready["message"]
        assert "install KEDA" in ready["message"]
        # Nothing half-applied: a refused new policy has no child at all.
        items = get_json(cluster, "deployments,services,configmaps,hpa", "-n", ns, "-l", "tiergate.io/policy")
        assert items["items"] == []

        # KEDA's own CRD installed: the operator notices without a restart, and the API server takes the object.
        cluster.kubectl("apply", "--server-side", "-f", str(crd_file))
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{SCALED_OBJECT_CRD_NAME}", "--timeout=60s")
        so = wait_for(
            "the ScaledObject of tier large",
            lambda: _get(cluster, "scaledobjects.keda.sh", ns, "chat-tier-large"),
            timeout=120,
        )
        p = wait_ready(cluster, ns, "chat")
        assert so["metadata"]["ownerReferences"][0]["uid"] == p["metadata"]["uid"]
        assert "tiergate.io/policy" in so["metadata"]["annotations"]["scaledobject.keda.sh/hpa-excluded-labels"]
        spec = so["spec"]
        assert spec["scaleTargetRef"]["name"] == "chat-tier-large"
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 2)
        assert [t["name"] for t in spec["triggers"]] == ["router-demand", "vllm-waiting"]
        assert spec["triggers"][0]["metadata"]["serverAddress"] == PROM
        assert 'routingpolicy="chat"' in spec["triggers"][0]["metadata"]["query"]
        assert condition(p, "Degraded")["status"] == "False"
        # KEDA's schema (not ours) checked it: a field KEDA does not know is refused by the same server.
        bad = copy.deepcopy({k: so[k] for k in ("apiVersion", "kind", "spec")})
        bad["metadata"] = {"name": "probe"}
        bad["spec"]["minReplicaCount"] = "zero"
        r = kubectl_raw(cluster, "apply", "-n", ns, "--dry-run=server", "-f", "-", input=json.dumps(bad))
        assert r.returncode != 0
        assert "minReplicaCount" in r.stderr
    finally:
        cluster.kubectl("delete", "crd", SCALED_OBJECT_CRD_NAME, "--ignore-not-found", "--wait=false")


BAD = [
    ("zero-demand-target", ("autoscaling", "targets", "routerDemandPerReplica"), 0),
    ("zero-waiting-target", ("autoscaling", "targets", "vllmWaitingPerReplica"), 0),
    ("no-target", ("autoscaling", "targets"), {}),
    ("hpa-at-zero", ("replicas", "min"), 0),
    ("hpa-without-max", ("replicas", "max"), None),
    ("min-above-max", ("replicas", "min"), 5),
    ("hpa-with-prometheus-address", ("autoscaling", "prometheusServerAddress"), PROM),
    ("unknown-mode", ("autoscaling", "mode"), "Keda"),
    ("removed-managed-by", ("replicas", "managedBy"), "Autoscaler"),
]
# Where the API server's refusal points, by case.
FIELDS = {
    "zero-demand-target": "spec.tiers[1].autoscaling.targets.routerDemandPerReplica",
    "zero-waiting-target": "spec.tiers[1].autoscaling.targets.vllmWaitingPerReplica",
    "no-target": "spec.tiers[1].autoscaling.targets",
    "hpa-at-zero": "spec.tiers[1].replicas.min",
    "hpa-without-max": "spec.tiers[1].replicas.max",
    "min-above-max": "spec.tiers[1].replicas",
    "hpa-with-prometheus-address": "spec.tiers[1].autoscaling.prometheusServerAddress",
    "unknown-mode": "spec.tiers[1].autoscaling.mode",
    "removed-managed-by": "spec.tiers[1].replicas.managedBy",
}


def test_bad_autoscaling_is_refused_by_the_api_server_naming_the_field(cluster: DevCluster, namespace: str) -> None:
    install_crd(cluster)
    failures = []
    for case, path, value in BAD:
        doc = sample_doc()
        large = doc["spec"]["tiers"][1]
        large["autoscaling"] = copy.deepcopy(HPA)
        node = large
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
        r = kubectl_raw(cluster, "apply", "-n", namespace, "-f", "-", input=json.dumps(doc))
        print(f"{case}: {r.stderr.strip()[:300]}")
        if r.returncode == 0:
            failures.append(f"{case}: accepted")
        elif FIELDS[case] not in r.stderr:
            failures.append(f"{case}: does not name {FIELDS[case]}: {r.stderr.strip()}")
    assert not failures, "\n".join(failures)
    assert get_json(cluster, "routingpolicies", "-n", namespace)["items"] == []
    # The messages that name the replacement, word for word.
    doc = sample_doc()
    doc["spec"]["tiers"][1]["replicas"]["managedBy"] = "Autoscaler"
    r = kubectl_raw(cluster, "apply", "-n", namespace, "-f", "-", input=json.dumps(doc))
    assert "autoscaling.mode External" in r.stderr
