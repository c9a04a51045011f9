"""A spec the operator refuses shows in the policy's status on the real control plane, naming the reason and the
field, for the generation it refused, with a Warning Event; the children stay exactly as the last good spec made
them. MissingReference (a ConfigMap a tier's environment names) clears by itself once the ConfigMap appears.
InvalidSpec needs a spec the CRD lets through and the typed model does not: an older CRD, simulated by
installing the CRD without its spec-level CEL rules (restored afterwards)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.operator_cluster import (
    CRD,
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

pytestmark = pytest.mark.cluster

ENV_FIELD = "spec.tiers[0].engine.env[0].valueFrom.configMapKeyRef"


@pytest.fixture
def operator(cluster: DevCluster, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    install_crd(cluster)
    yield from operator_running(Operator(cluster, tmp_path, "--namespace", namespace))


def _children(cluster: DevCluster, ns: str) -> dict[tuple[str, str], str]:
    """Every child with what moves when it is written: its generation, else its resourceVersion (Deployments'
    resourceVersions also move with their status, so they are compared by generation)."""
    items = get_json(
        cluster, "deployments,services,configmaps,poddisruptionbudgets", "-n", ns, "-l", "tiergate.io/policy"
    )
    return {
        (i["kind"], i["metadata"]["name"]): str(i["metadata"].get("generation") or i["metadata"]["resourceVersion"])
        for i in items["items"]
    }


def _refused(cluster: DevCluster, ns: str, reason: str) -> dict[str, Any]:
    def seen() -> dict[str, Any] | None:
        p = policy(cluster, ns, "chat")
        gen = (p or {}).get("metadata", {}).get("generation")
        d = condition(p, "Degraded")
        if d.get("reason") == reason and d.get("observedGeneration") == gen and d.get("status") == "True":
            return p
        return None

    found: dict[str, Any] = wait_for(f"Degraded={reason} for the current generation", seen, timeout=90)
    return found


def _warned(cluster: DevCluster, ns: str, reason: str) -> list[str]:
    events = get_json(cluster, "events", "-n", ns, "--field-selector", f"reason={reason}")["items"]
    return [str(e["message"]) for e in events if e.get("type") == "Warning"]


def _without_spec_rules() -> str:
    import yaml

    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert schema.pop("x-kubernetes-validations")  # the rules that tiers named elsewhere exist
    return json.dumps(crd)


def test_refused_specs_show_in_status_and_change_no_child(
    cluster: DevCluster, namespace: str, operator: Operator
) -> None:
    ns = namespace
    classifier_configmap(cluster, ns)
    doc = sample_doc()
    apply_policy(cluster, ns, doc)
    wait_ready(cluster, ns, "chat")
    before = _children(cluster, ns)

    # A tier's environment names a ConfigMap that does not exist: refused, nothing applied.
    missing = copy.deepcopy(doc)
    env = [{"name": "VLLM_EXTRA", "valueFrom": {"configMapKeyRef": {"name": "vllm-extra", "key": "flags"}}}]
    missing["spec"]["tiers"][0]["engine"]["env"] = env
    apply_policy(cluster, ns, missing)
    p = _refused(cluster, ns, "MissingReference")
    for type_ in ("Ready", "Degraded"):
        c = condition(p, type_)
        assert c["reason"] == "MissingReference"
        assert ENV_FIELD in c["message"]
        assert f"ConfigMap {ns}/vllm-extra does not exist" in c["message"]
    assert condition(p, "Ready")["status"] == "False"
    assert p["status"]["observedGeneration"] == p["metadata"]["generation"]
    assert _children(cluster, ns) == before
    assert any(
        ENV_FIELD in m for m in wait_for("a MissingReference Event", lambda: _warned(cluster, ns, "MissingReference"))
    )

    # The ConfigMap appears: the operator notices by itself and applies the spec.
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "vllm-extra"}, "data": {"flags": "x"}}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(cm))
    wait_ready(cluster, ns, "chat")
    (c,) = get_json(cluster, "deployment", "chat-tier-small", "-n", ns)["spec"]["template"]["spec"]["containers"]
    assert {"name": "VLLM_EXTRA", "valueFrom": {"configMapKeyRef": {"name": "vllm-extra", "key": "flags"}}} in c["env"]
    applied = _children(cluster, ns)
    assert applied != before

    # An older CRD lets through what the model refuses: bestOfN naming no tier.
    r = kubectl_raw(cluster, "apply", "--server-side", "--force-conflicts", "-f", "-", input=_without_spec_rules())
    assert r.returncode == 0, r.stderr
    try:
        invalid = copy.deepcopy(missing)
        invalid["spec"]["bestOfN"]["tier"] = "medium"
        apply_policy(cluster, ns, invalid)  # accepted: the API server no longer checks it
        p = _refused(cluster, ns, "InvalidSpec")
        for type_ in ("Ready", "Degraded"):
            assert "spec.bestOfN.tier" in condition(p, type_)["message"]
        assert condition(p, "Ready")["status"] == "False"
        assert p["status"]["observedGeneration"] == p["metadata"]["generation"]
        assert _children(cluster, ns) == applied
        assert any(
            "spec.bestOfN.tier" in m
            for m in wait_for("an InvalidSpec Event", lambda: _warned(cluster, ns, "InvalidSpec"))
        )
    finally:
        install_crd(cluster)


def test_more_tiers_than_a_two_tier_classifier_chooses_among_are_refused(
    cluster: DevCluster, namespace: str, operator: Operator
) -> None:
    """Three tiers under a two-tier artifact (one score: cheapest or strongest) would never route to the middle one:
    with the classifier ConfigMap's two-tier artifact the policy is ClassifierInvalid (no copy served), and with no
    classifier (the shipped default is two-tier) InvalidSpec on spec.tiers, nothing applied."""
    ns = namespace
    classifier_configmap(cluster, ns)  # a two-tier artifact
    doc = sample_doc()
    mid = copy.deepcopy(doc["spec"]["tiers"][0])
    mid["name"] = "mid"
    doc["spec"]["tiers"].insert(1, mid)
    apply_policy(cluster, ns, doc)
    p = _refused(cluster, ns, "ClassifierInvalid")
    message = condition(p, "Degraded")["message"]
    assert "spec.tiers: 3 tiers, but ConfigMap" in message, message
    assert "mid would never be chosen" in message, message
    copies = [
        c for c in get_json(cluster, "configmaps", "-n", ns)["items"] if c["metadata"]["name"].endswith("-classifier")
    ]
    assert copies == []  # the refused artifact was not copied for the router

    del doc["spec"]["router"]["classifier"]
    apply_policy(cluster, ns, doc)
    p = _refused(cluster, ns, "InvalidSpec")
    for type_ in ("Ready", "Degraded"):
        c = condition(p, type_)
        assert "spec.tiers: 3 tiers, but the shipped default router" in c["message"], c["message"]
        assert "mid would never be chosen" in c["message"]
    assert any("spec.tiers" in m for m in wait_for("an InvalidSpec Event", lambda: _warned(cluster, ns, "InvalidSpec")))
