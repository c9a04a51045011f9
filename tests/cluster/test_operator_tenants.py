"""Tenants on the real control plane: the API server accepts the tenants sample and refuses bad tenants naming the
field; the operator, holding nothing but the shipped RBAC (it cannot read Secrets), brings the policy to Ready in a
namespace that enforces the `restricted` Pod Security Standard; the router's pod template mounts exactly the
tenants' Secret keys (one file per tenant under naming.TENANT_KEYS_DIR), and no other key of those Secrets nor any
other Secret; removing a tenant from the policy removes its key from the template and from the rolled router pods.

The sample's `limitStore` is dropped: no Redis is reachable from the operator here, and the store is not what this
test is about (without it each router replica counts alone, which the operator does not care about)."""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.operator_cluster import (
    ROOT,
    Operator,
    apply_policy,
    condition,
    get_json,
    install_crd,
    kubectl_raw,
    operator_running,
    restrict_namespace,
    token_kubeconfig,
    wait_ready,
)
from tests.support.waiting import wait_for
from tiergate.api import PolicyValidationError, naming, parse_policy
from tiergate.devcluster.cluster import DevCluster

pytestmark = pytest.mark.cluster

SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy_tenants.yaml"
POLICY = "shared"
ROUTER = naming.router_name(POLICY)
# Each tenant's Secret holds a second key that must never reach the router: only the referenced key is mounted.
OTHER_KEY = "unrelated"


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    doc["spec"].pop("limitStore")
    return doc


def _key_sources(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The projected volume's sources the policy's tenants call for: one Secret key per tenant, at the tenant's
    name, in the policy's order."""
    return [
        {
            "secret": {
                "name": t["apiKeySecretRef"]["name"],
                "items": [{"key": t["apiKeySecretRef"]["key"], "path": t["name"]}],
                "optional": True,
            }
        }
        for t in doc["spec"]["tenants"]
    ]


def _secret_refs(pod_spec: dict[str, Any]) -> list[Any]:
    """Every reference to a Secret in a pod spec: volumes (plain or projected), env and envFrom, image pulls."""
    refs: list[Any] = []
    for v in pod_spec.get("volumes") or []:
        if "secret" in v:
            refs.append(("volume", v["name"], v["secret"]))
        for s in (v.get("projected") or {}).get("sources") or []:
            if "secret" in s:
                refs.append(("projected", v["name"], s["secret"]))
    for c in [*(pod_spec.get("initContainers") or []), *pod_spec["containers"]]:
        refs += [("env", c["name"], e) for e in c.get("env") or [] if "secretKeyRef" in (e.get("valueFrom") or {})]
        refs += [("envFrom", c["name"], e) for e in c.get("envFrom") or [] if "secretRef" in e]
    refs += [("imagePull", s) for s in pod_spec.get("imagePullSecrets") or []]
    return refs


def _tenant_volume(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (vol,) = [v for v in pod_spec["volumes"] if v["name"] == "tenant-keys"]
    (container,) = pod_spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tenant-keys"]
    assert mount == {"name": "tenant-keys", "mountPath": naming.TENANT_KEYS_DIR, "readOnly": True}
    projected: dict[str, Any] = vol["projected"]
    return projected


def _mounted_tenants(cluster: DevCluster, ns: str) -> list[str]:
    """The tenants in the policy file the router mounts (its ConfigMap)."""
    cm = get_json(cluster, "configmap", ROUTER, "-n", ns)
    return [t.name for t in parse_policy(yaml.safe_load(cm["data"][naming.POLICY_FILE_KEY])).spec.tenants]


def _router_pods(cluster: DevCluster, ns: str) -> list[dict[str, Any]]:
    selector = f"{naming.POLICY_LABEL}={POLICY},{naming.COMPONENT_LABEL}={naming.COMPONENT_ROUTER}"
    pods: list[dict[str, Any]] = get_json(cluster, "pods", "-n", ns, "-l", selector)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _rolled_out(cluster: DevCluster, ns: str, sources: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The router's live pods, once the Deployment has rolled out and every one of them mounts exactly `sources`."""
    d = get_json(cluster, "deployment", ROUTER, "-n", ns)
    st, want = d.get("status") or {}, d["spec"]["replicas"]
    if st.get("observedGeneration") != d["metadata"]["generation"]:
        return None
    if (st.get("updatedReplicas"), st.get("readyReplicas"), st.get("replicas")) != (want, want, want):
        return None
    pods = _router_pods(cluster, ns)
    if len(pods) != want or any(_tenant_volume(p["spec"])["sources"] != sources for p in pods):
        return None
    return pods


@pytest.fixture(scope="module")
def crd(cluster: DevCluster) -> None:
    install_crd(cluster)


@pytest.fixture
def restricted(cluster: DevCluster, namespace: str) -> str:
    return restrict_namespace(cluster, namespace)


@pytest.fixture
def shipped_rbac(cluster: DevCluster, crd: None, restricted: str, tmp_path: Path) -> Iterator[Path]:
    """A kubeconfig for a ServiceAccount bound, in the test's namespace, to manifests/rbac/role.yaml and nothing
    else (the namespaced install; no leader election, so no Lease Role)."""
    ns = restricted
    role: dict[str, Any] = yaml.safe_load((ROOT / "manifests" / "rbac" / "role.yaml").read_text())
    role["metadata"]["name"] = f"tiergate-operator-{ns}"
    cluster.kubectl("apply", "-f", "-", input=json.dumps(role))
    try:
        cluster.kubectl("create", "serviceaccount", "op", "-n", ns)
        cluster.kubectl(
            "create",
            "rolebinding",
            "op",
            "-n",
            ns,
            f"--clusterrole={role['metadata']['name']}",
            f"--serviceaccount={ns}:op",
        )
        path = token_kubeconfig(cluster, ns, tmp_path / "op.kubeconfig")
        yield path
    finally:
        cluster.kubectl("delete", "clusterrole", role["metadata"]["name"], "--ignore-not-found", check=False)


@pytest.fixture
def operator(cluster: DevCluster, restricted: str, shipped_rbac: Path, tmp_path: Path) -> Iterator[Operator]:
    yield from operator_running(
        Operator(cluster, tmp_path, "--namespace", restricted, "--kubeconfig", str(shipped_rbac))
    )


def test_bad_tenants_are_refused_by_the_api_server_naming_the_field(
    cluster: DevCluster, crd: None, namespace: str
) -> None:
    """A tenant naming an unknown tier (CEL rule) and a float budget (schema): refused by a server-side dry run,
    naming the field, and by the typed model, naming the same field. The unmutated doc passes the same dry run."""
    unknown_tier = _doc()
    unknown_tier["spec"]["tenants"][0]["tiers"] = ["small", "medium"]
    float_budget = _doc()
    float_budget["spec"]["tenants"][1]["budget"]["dailyUsd"] = 2.5
    cases = [
        (unknown_tier, "spec.tenants", "every entry of tenants[].tiers must name a tier", "spec.tenants[0].tiers[1]"),
        (float_budget, "spec.tenants[1].budget.dailyUsd", "must be of type", "spec.tenants[1].budget.dailyUsd"),
    ]
    for doc, api_field, words, model_field in cases:
        r = kubectl_raw(cluster, "apply", "-n", namespace, "--dry-run=server", "-f", "-", input=json.dumps(doc))
        assert r.returncode != 0, f"accepted: {r.stdout}"
        assert api_field in r.stderr, r.stderr
        assert words in r.stderr, r.stderr
        with pytest.raises(PolicyValidationError) as info:
            parse_policy(doc)
        assert model_field in info.value.paths, info.value.paths

    ok = kubectl_raw(cluster, "apply", "-n", namespace, "--dry-run=server", "-f", "-", input=json.dumps(_doc()))
    assert ok.returncode == 0, ok.stderr
    assert get_json(cluster, "routingpolicies", "-n", namespace)["items"] == []


def test_router_mounts_exactly_the_tenants_keys_and_drops_a_removed_one(
    cluster: DevCluster, restricted: str, shipped_rbac: Path, operator: Operator
) -> None:
    ns = restricted

    # The operator's identity cannot read Secrets: it only names them in the pod template.
    def can(verb: str, what: str) -> str:
        r = kubectl_raw(cluster, "auth", "can-i", verb, what, "-n", ns, f"--as=system:serviceaccount:{ns}:op")
        return r.stdout.strip()

    assert (can("patch", "deployments"), can("get", "secrets"), can("list", "secrets")) == ("yes", "no", "no")

    doc = _doc()
    keys: dict[str, str] = {}
    for t in doc["spec"]["tenants"]:
        ref = t["apiKeySecretRef"]
        keys[t["name"]] = secrets.token_hex(24)
        cluster.kubectl(
            "create",
            "secret",
            "generic",
            ref["name"],
            "-n",
            ns,
            f"--from-literal={ref['key']}={keys[t['name']]}",
            f"--from-literal={OTHER_KEY}={secrets.token_hex(24)}",
        )
    apply_policy(cluster, ns, doc)
    p = wait_ready(cluster, ns, POLICY, timeout=180)
    assert condition(p, "Degraded").get("status") != "True", condition(p, "Degraded")

    # 1. The router's pod template mounts one file per tenant, the referenced key of its Secret and nothing else.
    deployments = {d["metadata"]["name"]: d for d in get_json(cluster, "deployments", "-n", ns)["items"]}
    router = deployments[ROUTER]["spec"]["template"]["spec"]
    both = _key_sources(doc)
    assert [s["secret"]["name"] for s in both] == ["search-key", "assistant-key"]
    projected = _tenant_volume(router)
    assert projected["sources"] == both
    # No other Secret reference anywhere the operator created: not the Secrets' other keys, not env, not the tiers.
    refs = {name: _secret_refs(d["spec"]["template"]["spec"]) for name, d in deployments.items()}
    assert refs == {
        **{name: [] for name in deployments if name != ROUTER},
        ROUTER: [("projected", "tenant-keys", s["secret"]) for s in both],
    }
    assert _mounted_tenants(cluster, ns) == ["search", "assistant"]
    # The keys themselves never reach an object the operator wrote (it could not have read them).
    written = json.dumps(get_json(cluster, "deployments,configmaps", "-n", ns, "-l", naming.POLICY_LABEL))
    assert not [t for t, k in keys.items() if k in written]

    # 2. The router's pods were admitted under `restricted` and carry the volume (the pods, not only the template).
    pods = wait_for("the router rolled out with both keys", lambda: _rolled_out(cluster, ns, both), timeout=120)
    assert len(pods) == deployments[ROUTER]["spec"]["replicas"] == 2
    events = get_json(cluster, "events", "-n", ns)["items"]
    refused = [e.get("message") for e in events if e.get("reason") == "FailedCreate"]
    assert refused == []

    # 3. A tenant removed from the policy: its key leaves the template, the rolled pods and the policy file.
    smaller = copy.deepcopy(doc)
    smaller["spec"]["tenants"] = [t for t in doc["spec"]["tenants"] if t["name"] != "search"]
    apply_policy(cluster, ns, smaller)
    wait_ready(cluster, ns, POLICY, timeout=180)
    one = _key_sources(smaller)
    assert [s["secret"]["name"] for s in one] == ["assistant-key"]
    template = get_json(cluster, "deployment", ROUTER, "-n", ns)["spec"]["template"]["spec"]
    assert _tenant_volume(template)["sources"] == one
    assert _secret_refs(template) == [("projected", "tenant-keys", one[0]["secret"])]
    assert _mounted_tenants(cluster, ns) == ["assistant"]
    wait_for("the router rolled out without the removed key", lambda: _rolled_out(cluster, ns, one), timeout=120)

    # The shipped RBAC sufficed: nothing the operator did was forbidden, nor logged as a warning or an error.
    log = operator.log()
    assert [ln for ln in log.splitlines() if "forbidden" in ln.lower()] == [], log
    problems = [ln for ln in log.splitlines() if " tiergate_operator." in ln and (" WARNING " in ln or " ERROR " in ln)]
    assert problems == [], log
