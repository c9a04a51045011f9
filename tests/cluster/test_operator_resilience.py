"""Crashes, restarts, two replicas, and least-privilege RBAC, against the real control plane."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.operator_cluster import (
    CHILD_KINDS,
    ROOT,
    SAMPLE_CHILDREN,
    Operator,
    apply_policy,
    child_keys,
    children,
    classifier_configmap,
    get_json,
    install_crd,
    sample_doc,
    token_kubeconfig,
    wait_for,
    wait_ready,
)
from tiergate.devcluster.cluster import DevCluster

pytestmark = pytest.mark.cluster

POLICIES = 8


@pytest.fixture(scope="module")
def crd(cluster: DevCluster) -> None:
    install_crd(cluster)


def _named(i: int) -> dict[str, Any]:
    doc = copy.deepcopy(sample_doc())
    doc["metadata"]["name"] = f"p{i}"
    # Keep the GPU pools roomy enough for all of them: the small tier gets one replica, the large tier none.
    doc["spec"]["tiers"][0]["replicas"] = {"min": 1}
    doc["spec"]["tiers"][1]["replicas"] = {"min": 0}
    doc["spec"]["bestOfN"]["rewardModel"]["replicas"] = 0
    doc["spec"]["router"]["replicas"] = 1
    return doc


def _all_children(cluster: DevCluster, ns: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json(
        cluster,
        "deployments,services,configmaps,serviceaccounts,poddisruptionbudgets,roles,rolebindings,replicasets",
        "-n",
        ns,
        "-l",
        "tiergate.io/policy",
    )["items"]
    return items


def test_killed_mid_reconcile_then_restarted_leaves_no_duplicates_or_orphans(
    cluster: DevCluster, crd: None, namespace: str, tmp_path: Path
) -> None:
    classifier_configmap(cluster, namespace)
    op = Operator(cluster, tmp_path, "--namespace", namespace).start()
    try:
        for i in range(POLICIES):
            apply_policy(cluster, namespace, _named(i))
        # Kill it while it is part-way: some children exist, not all.
        total = POLICIES * SAMPLE_CHILDREN
        seen = wait_for(
            "the first children",
            lambda: _children_of_policies(cluster, namespace),
            timeout=60,
            interval=0.05,
        )
        op.kill()
        partial = len(_children_of_policies(cluster, namespace))
        print(f"killed with {partial}/{total} children created (first seen: {len(seen)})")

        # While it is down, a policy loses a tier and another is deleted.
        doc = _named(0)
        doc["spec"]["tiers"] = [doc["spec"]["tiers"][0]]
        doc["spec"]["router"]["fallbackOrder"] = ["small"]
        apply_policy(cluster, namespace, doc)
        cluster.kubectl("delete", "routingpolicy", f"p{POLICIES - 1}", "-n", namespace, "--wait=false")

        op.start()
        for i in range(POLICIES - 1):
            wait_ready(cluster, namespace, f"p{i}", timeout=120)
    finally:
        op.stop()
        print(op.log())

    # No duplicates: exactly the expected set, every object once, one ReplicaSet per Deployment.
    items = _all_children(cluster, namespace)
    by_kind = Counter(i["kind"] for i in items)
    keys = [(i["kind"], i["metadata"]["name"]) for i in items]
    assert len(keys) == len(set(keys))
    wait_for(
        "deleted policy's children collected",
        lambda: (
            not any(
                i["metadata"]["labels"]["tiergate.io/policy"] == f"p{POLICIES - 1}"
                for i in _all_children(cluster, namespace)
            )
        ),
        timeout=90,
    )
    items = _all_children(cluster, namespace)
    owners = {p["metadata"]["uid"] for p in get_json(cluster, "routingpolicies", "-n", namespace)["items"]}
    for i in items:
        if i["kind"] == "ReplicaSet":
            continue
        refs = [r["uid"] for r in i["metadata"].get("ownerReferences", [])]
        assert refs, f"orphan {i['kind']} {i['metadata']['name']}: no owner"
        assert refs[0] in owners, f"orphan {i['kind']} {i['metadata']['name']}: owner gone"
    names = child_keys([i for i in items if i["kind"] != "ReplicaSet"])
    assert ("Deployment", "p0-tier-large") not in names, "the tier removed while the operator was down is pruned"
    assert len(names) == (POLICIES - 1) * SAMPLE_CHILDREN - 3
    rs = Counter(i["metadata"]["ownerReferences"][0]["name"] for i in items if i["kind"] == "ReplicaSet")
    assert all(n == 1 for n in rs.values()), rs
    pods = get_json(cluster, "pods", "-n", namespace, "-l", "tiergate.io/policy")["items"]
    per_deployment = Counter(
        p["metadata"]["labels"]["tiergate.io/policy"] for p in pods if not p["metadata"].get("deletionTimestamp")
    )
    # Each policy: small tier 1 + router 1.
    assert all(n == 2 for n in per_deployment.values()), per_deployment
    assert by_kind["Deployment"] >= (POLICIES - 1) * 3


def _children_of_policies(cluster: DevCluster, ns: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json(
        cluster, "deployments,services,configmaps,poddisruptionbudgets", "-n", ns, "-l", "tiergate.io/policy"
    )["items"]
    return items


def test_two_replicas_one_leader_and_failover(cluster: DevCluster, crd: None, namespace: str, tmp_path: Path) -> None:
    env = {
        "TIERGATE_OPERATOR_LEASE_DURATION_SECONDS": "4",
        "TIERGATE_OPERATOR_LEASE_RENEW_DEADLINE_SECONDS": "3",
        "TIERGATE_OPERATOR_LEASE_RETRY_PERIOD_SECONDS": "1",
    }
    args = ("--namespace", namespace, "--leader-elect", "--lease-namespace", namespace)
    # Each replica applies under its own field manager, so the API server's record says who wrote what.
    a = Operator(cluster, tmp_path / "a", *args, env={**env, "POD_NAME": "op-a", _MANAGER_ENV: "tiergate-op-a"})
    b = Operator(cluster, tmp_path / "b", *args, env={**env, "POD_NAME": "op-b", _MANAGER_ENV: "tiergate-op-b"})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    classifier_configmap(cluster, namespace)
    try:
        a.start()
        wait_for("a holds the lease", lambda: _holder(cluster, namespace) == "op-a", timeout=90)
        b.start()
        apply_policy(cluster, namespace, sample_doc())
        wait_ready(cluster, namespace, "chat")
        assert "reconciled" in a.log()
        assert _appliers(cluster, namespace) == {"tiergate-op-a"}, "the standby must not write"
        assert b.alive()

        a.kill()  # no release: b must wait out the lease, then take over
        wait_for("b takes the lease", lambda: _holder(cluster, namespace) == "op-b", timeout=90)
        cluster.kubectl("delete", "deployment", "chat-tier-small", "-n", namespace)
        wait_for(
            "the new leader restores a deleted child",
            lambda: ("Deployment", "chat-tier-small") in child_keys(children(cluster, namespace, "chat")),
            timeout=90,
        )
        # b's writes do show under its name (so the check above could see them) ...
        assert "tiergate-op-b" in _appliers(cluster, namespace)
        # ... and it made none before it held the lease: in its own log, taking the lease comes before any work.
        # Ordering, not timing: whenever a standby wrote (while a led, or while waiting out a's lease), it shows.
        log_b = b.full_log()
        before_lease = log_b[: log_b.index("acquired lease")]
        assert "watching" not in before_lease, log_b
        assert "reconciled" not in before_lease, log_b
        assert "reconciled" in log_b
        assert b.stop() == 0
        assert _holder(cluster, namespace) == "", "a graceful stop releases the lease"
    finally:
        a.stop()
        b.stop()
        print(a.log(), b.log())


_MANAGER_ENV = "TIERGATE_OPERATOR_FIELD_MANAGER"


def _appliers(cluster: DevCluster, ns: str) -> set[str]:
    """The field managers that server-side applied the policy's children: who has written them."""
    items = get_json(cluster, CHILD_KINDS, "-n", ns, "-l", "tiergate.io/policy=chat", "--show-managed-fields")["items"]
    return {
        entry["manager"]
        for item in items
        for entry in item["metadata"].get("managedFields", [])
        if entry.get("operation") == "Apply"
    }


def _holder(cluster: DevCluster, ns: str) -> str | None:
    r = get_json(cluster, "leases", "-n", ns)["items"]
    for lease in r:
        if lease["metadata"]["name"] == "tiergate-operator":
            return str(lease["spec"].get("holderIdentity") or "")
    return None


def _rbac(doc: str) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load((ROOT / "manifests" / "rbac" / doc).read_text())
    return obj


def _leader_election_rbac(cluster: DevCluster, system_ns: str) -> None:
    """The shipped leader-election Role and RoleBinding, in `system_ns`, for the ServiceAccount `op` there."""
    for doc in ("leader_election_role.yaml", "leader_election_role_binding.yaml"):
        obj = _rbac(doc)
        obj["metadata"]["namespace"] = system_ns
        for subject in obj.get("subjects", []):
            subject.update(name="op", namespace=system_ns)
        cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))


def _can(cluster: DevCluster, kc: Path, *args: str) -> bool:
    return cluster.kubectl("auth", "can-i", *args, kubeconfig=kc, check=False).strip() == "yes"


def _run_limited_operator(
    cluster: DevCluster, op: Operator, system_ns: str, workload_ns: str, identity: str, *, all_namespaces: bool = False
) -> None:
    """Start `op`, wait for it to hold the Lease in `system_ns`, bring the sample up in `workload_ns`, and fail on
    any Forbidden or any warning or error of its own about that namespace (a failing watch is logged as a warning,
    so a missing verb shows; so does a RoleBinding applied before its Role, which only an identity without `bind`
    notices)."""
    op.start()
    try:
        wait_for("the lease held", lambda: _holder(cluster, system_ns) == identity, timeout=60)
        apply_policy(cluster, workload_ns, sample_doc())
        wait_ready(cluster, workload_ns, "chat")
        assert len(children(cluster, workload_ns, "chat")) == SAMPLE_CHILDREN
        log = op.log()
        # An all-namespaces operator also sees policies of other tests' namespaces being deleted, which the API
        # server refuses to fill ("forbidden: ... because it is being terminated"): that is not RBAC.
        forbidden = [ln for ln in log.splitlines() if "forbidden" in ln.lower() and "being terminated" not in ln]
        assert forbidden == [], log
        # Its own warnings and errors; watching all namespaces, those about this namespace or the Lease (other
        # tests' namespaces may be going away under it).
        mine = (workload_ns, "lease") if all_namespaces else ("",)
        problems = [
            ln
            for ln in log.splitlines()
            if " tiergate_operator." in ln
            and (" WARNING " in ln or " ERROR " in ln)
            and any(m in ln.lower() for m in mine)
        ]
        assert problems == [], log
    finally:
        op.stop()


# Verbs the shipped RBAC must not grant, in any of the modes (the workload namespace's and the cluster's).
BEYOND = [
    ("list", "secrets"),
    ("get", "secrets"),
    ("update", "deployments"),
    ("create", "pods"),
    ("delete", "pods"),
    ("patch", "routingpolicies.tiergate.io"),
    ("delete", "routingpolicies.tiergate.io"),
    ("get", "leases"),
    ("create", "roles.rbac.authorization.k8s.io", "--subresource=bind"),
    ("escalate", "roles.rbac.authorization.k8s.io"),
]


def test_operator_works_with_only_the_shipped_rbac(
    cluster: DevCluster, crd: None, namespace: str, tmp_path: Path
) -> None:
    """Run the operator, with leader election, as a ServiceAccount bound to manifests/rbac/role.yaml and the
    leader-election Role (and nothing else)."""
    role = _rbac("role.yaml")
    role["metadata"]["name"] = f"tiergate-operator-{namespace}"
    cluster.kubectl("apply", "-f", "-", input=json.dumps(role))
    try:
        cluster.kubectl("create", "serviceaccount", "op", "-n", namespace)
        _leader_election_rbac(cluster, namespace)
        cluster.kubectl(
            "create",
            "rolebinding",
            "op",
            "-n",
            namespace,
            f"--clusterrole={role['metadata']['name']}",
            f"--serviceaccount={namespace}:op",
        )
        kc_path = token_kubeconfig(cluster, namespace, tmp_path / "op.kubeconfig")
        # Sanity: this identity really is limited (it cannot read Secrets).
        assert not _can(cluster, kc_path, "list", "secrets", "-n", namespace)
        # The leader-election Role grants the one Lease and no other (nor deleting it).
        for verb, what in (("update", "leases/other"), ("delete", "leases/tiergate-operator"), ("list", "leases")):
            assert not _can(cluster, kc_path, verb, what, "-n", namespace), f"{verb} {what}"
        classifier_configmap(cluster, namespace)
        op = Operator(
            cluster,
            tmp_path,
            "--namespace",
            namespace,
            "--kubeconfig",
            str(kc_path),
            "--leader-elect",
            "--lease-namespace",
            namespace,
            env={"POD_NAME": "op-rbac"},
        )
        _run_limited_operator(cluster, op, namespace, namespace, "op-rbac")
    finally:
        cluster.kubectl("delete", "clusterrole", role["metadata"]["name"], "--ignore-not-found", check=False)


def test_cluster_wide_operator_works_with_exactly_the_shipped_cluster_rbac(
    cluster: DevCluster, crd: None, namespace: str, tmp_path: Path
) -> None:
    """The default install: the ClusterRole bound by the shipped ClusterRoleBinding, the operator watching every
    namespace, its Lease in its own namespace. It brings a policy in another namespace to Ready with nothing else
    granted, and the API server refuses it everything beyond: Secrets, PUTs, pods, policy specs, any other Lease,
    Leases outside its namespace, binding or escalating Roles, cluster-scoped objects."""
    system_ns, workload_ns = namespace, f"{namespace}-w"
    suffix = namespace[-40:]
    role = _rbac("role.yaml")
    role["metadata"]["name"] = f"tiergate-operator-{suffix}"
    binding = _rbac("role_binding.yaml")
    assert binding["kind"] == "ClusterRoleBinding"  # the shipped default is cluster-wide
    binding["metadata"]["name"] = f"tiergate-operator-{suffix}"
    binding["roleRef"]["name"] = role["metadata"]["name"]
    (subject,) = binding["subjects"]
    subject.update(name="op", namespace=system_ns)
    cluster.kubectl("create", "namespace", workload_ns)
    try:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(role))
        cluster.kubectl("create", "serviceaccount", "op", "-n", system_ns)
        cluster.kubectl("apply", "-f", "-", input=json.dumps(binding))
        _leader_election_rbac(cluster, system_ns)
        kc = token_kubeconfig(cluster, system_ns, tmp_path / "op.kubeconfig")

        # What it needs, everywhere: its children's kinds in any namespace, its own Lease.
        assert _can(cluster, kc, "list", "deployments", "--all-namespaces")
        assert _can(cluster, kc, "patch", "routingpolicies.tiergate.io", "--subresource=status", "-n", workload_ns)
        assert _can(cluster, kc, "update", "leases/tiergate-operator", "-n", system_ns)
        # Nothing beyond it, in the workload namespace, across all namespaces, or on the cluster.
        for verb, what, *extra in BEYOND:
            assert not _can(cluster, kc, verb, what, *extra, "-n", workload_ns), f"{verb} {what} in {workload_ns}"
            assert not _can(cluster, kc, verb, what, *extra, "--all-namespaces"), f"{verb} {what} everywhere"
        for verb, what in (("update", "leases/other"), ("delete", "leases/tiergate-operator"), ("list", "leases")):
            assert not _can(cluster, kc, verb, what, "-n", system_ns), f"{verb} {what} in {system_ns}"
        for verb, what in (
            ("create", "namespaces"),
            ("delete", "namespaces"),
            ("create", "clusterroles"),
            ("create", "clusterrolebindings"),
            ("create", "customresourcedefinitions"),
            ("get", "nodes"),
        ):
            assert not _can(cluster, kc, verb, what), f"{verb} {what}"

        classifier_configmap(cluster, workload_ns)
        op = Operator(
            cluster,
            tmp_path,
            "--kubeconfig",
            str(kc),
            "--leader-elect",
            "--lease-namespace",
            system_ns,
            env={"POD_NAME": "op-cluster-rbac"},
        )
        _run_limited_operator(cluster, op, system_ns, workload_ns, "op-cluster-rbac", all_namespaces=True)
        assert "watching all namespaces" in op.full_log()
    finally:
        cluster.kubectl("delete", "namespace", workload_ns, "--wait=false", "--ignore-not-found", check=False)
        for kind, name in (
            ("clusterrolebinding", binding["metadata"]["name"]),
            ("clusterrole", role["metadata"]["name"]),
        ):
            cluster.kubectl("delete", kind, name, "--ignore-not-found", check=False)
