"""The children's cache (what the watches have seen) and the rule that skips an unneeded apply, without a cluster."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tiergate.api.policy import parse_policy
from tiergate_operator.builders import KIND_ORDER, build_children
from tiergate_operator.cache import ChildCache, Seen
from tiergate_operator.reconcile import Applied, intent_digest, needs_apply
from tiergate_operator.status import compute_status
from tiergate_operator.watches import WATCHED_KINDS


def _obj(name: str, policy: str | None = "chat", *, rv: str = "1", gen: int | None = None, uid: str = "u1") -> Any:
    md: dict[str, Any] = {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": rv}
    if policy is not None:
        md["labels"] = {"tiergate.io/policy": policy}
    if gen is not None:
        md["generation"] = gen
    md["ownerReferences"] = [{"uid": "policy-uid"}]
    return {"metadata": md, "status": {"readyReplicas": 1}}


def test_every_child_kind_is_watched() -> None:
    """Pruning and apply-skipping read the cache: a kind not watched would never be pruned and never be restored."""
    assert set(KIND_ORDER) <= set(WATCHED_KINDS)
    assert "Pod" in WATCHED_KINDS


def test_cache_groups_children_by_policy_and_keeps_whole_deployments_only() -> None:
    c = ChildCache(["Deployment", "Service", "Pod"])
    c.upsert("Deployment", _obj("chat-router", gen=2))
    c.upsert("Service", _obj("chat-router"))
    c.upsert("Pod", _obj("chat-router-abc"))
    c.upsert("Service", _obj("unlabelled", policy=None))
    c.upsert("Service", _obj("other-router", policy="other"))
    kids = c.children(("ns", "chat"))
    assert set(kids) == {("Deployment", "chat-router"), ("Service", "chat-router"), ("Pod", "chat-router-abc")}
    assert kids[("Deployment", "chat-router")].generation == 2
    assert kids[("Deployment", "chat-router")].owner_uids == frozenset({"policy-uid"})
    assert kids[("Service", "chat-router")].obj is None
    assert set(c.deployments(("ns", "chat"))) == {"chat-router"}
    assert [p["metadata"]["name"] for p in c.pods(("ns", "chat"))] == ["chat-router-abc"]
    assert set(c.children(("ns", "other"))) == {("Service", "other-router")}


def test_cache_follows_deletes_relabels_and_relists() -> None:
    c = ChildCache(["Deployment", "Service"])
    assert not c.synced
    c.replace("Deployment", [_obj("chat-tier-a", gen=1), _obj("chat-tier-b", gen=1)])
    assert not c.synced  # Services not listed yet: an absent Service proves nothing
    c.replace("Service", [])
    assert c.synced
    assert c.wait_synced(0)
    c.remove("Deployment", _obj("chat-tier-a"))
    assert set(c.deployments(("ns", "chat"))) == {"chat-tier-b"}
    # Relabelled to another policy: it moves; label removed: it leaves the cache (as it leaves the watch).
    c.upsert("Deployment", _obj("chat-tier-b", policy="other", rv="5"))
    assert c.deployments(("ns", "chat")) == {}
    assert set(c.deployments(("ns", "other"))) == {"chat-tier-b"}
    c.upsert("Deployment", _obj("chat-tier-b", policy=None, rv="6"))
    assert c.size() == 0
    # A relist replaces everything of that kind: deletions missed while the watch was down disappear.
    c.upsert("Deployment", _obj("chat-tier-x"))
    c.upsert("Service", _obj("chat-tier-x"))
    c.replace("Deployment", [_obj("chat-tier-y")])
    assert set(c.children(("ns", "chat"))) == {("Deployment", "chat-tier-y"), ("Service", "chat-tier-x")}


def test_cache_readers_get_copies() -> None:
    c = ChildCache(["Service"])
    c.upsert("Service", _obj("chat-router"))
    kids = c.children(("ns", "chat"))
    kids.clear()
    assert c.children(("ns", "chat"))


def _seen(
    uid: str = "u1",
    rv: str = "10",
    gen: int | None = 3,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    owners: frozenset[str] = frozenset({"policy-uid"}),
) -> Seen:
    return Seen(
        uid=uid,
        resource_version=rv,
        generation=gen,
        owner_uids=owners,
        labels={"tiergate.io/policy": "chat"} if labels is None else labels,
        annotations={"prometheus.io/scrape": "true"} if annotations is None else annotations,
    )


WANT = {
    "kind": "Deployment",
    "metadata": {
        "name": "chat-router",
        "labels": {"tiergate.io/policy": "chat"},
        "annotations": {"prometheus.io/scrape": "true"},
        "ownerReferences": [{"uid": "policy-uid"}],
    },
}
LAST = Applied.of(WANT, "h", {"metadata": {"uid": "u1", "resourceVersion": "10", "generation": 3}})
LAST_NO_GEN = Applied.of(WANT, "h", {"metadata": {"uid": "u1", "resourceVersion": "10"}})


@pytest.mark.parametrize(
    ("last", "seen", "expected", "why"),
    [
        (None, _seen(), True, "never applied by this process"),
        (LAST, None, True, "deleted, or not seen yet"),
        (Applied.of(WANT, "other", {"metadata": {"uid": "u1", "generation": 3}}), _seen(), True, "new intent"),
        (LAST, _seen(uid="u2"), True, "deleted and re-created by someone"),
        (LAST, _seen(gen=4, rv="11"), True, "spec edited (new generation)"),
        (LAST, _seen(rv="12"), False, "status update only: not ours to undo"),
        (LAST, _seen(), False, "exactly what our apply returned"),
        (LAST, _seen(rv="13", labels={"tiergate.io/policy": "chat", "team": "a"}), False, "someone else's label"),
        (LAST, _seen(rv="13", annotations={}), True, "our annotation removed (no generation bump)"),
        (LAST, _seen(rv="13", labels={"tiergate.io/policy": "x"}), True, "our label changed"),
        (LAST, _seen(rv="13", owners=frozenset()), True, "owner reference removed"),
        (LAST_NO_GEN, _seen(gen=None, rv="11"), True, "edit of a kind without generation"),
        (LAST_NO_GEN, _seen(gen=None), False, "kind without generation, unchanged"),
    ],
)
def test_needs_apply(last: Applied | None, seen: Seen | None, expected: bool, why: str) -> None:
    assert needs_apply("h", last, seen) is expected, why


def test_intent_digest_ignores_key_order_but_not_values() -> None:
    a = {"kind": "Service", "spec": {"ports": [{"port": 80}], "selector": {"a": "1"}}}
    b = {"spec": {"selector": {"a": "1"}, "ports": [{"port": 80}]}, "kind": "Service"}
    assert intent_digest(a) == intent_digest(b)
    b["spec"]["ports"][0]["port"] = 81
    assert intent_digest(a) != intent_digest(b)


def test_slimmed_cache_entries_give_the_same_status_as_whole_objects() -> None:
    """The cache keeps only the fields status.py reads; status computed from it must equal status from the objects
    the API server returns (with their pod templates, managedFields and all)."""
    sample = Path(__file__).resolve().parents[2] / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"
    doc = yaml.safe_load(sample.read_text())
    doc["metadata"].update({"namespace": "ns", "uid": "policy-uid", "generation": 2})
    policy = parse_policy(doc)
    deployments = []
    for i, d in enumerate(o for o in build_children(policy) if o["kind"] == "Deployment"):
        d = copy.deepcopy(d)
        d["metadata"].update({"uid": f"d{i}", "resourceVersion": "9", "generation": 4, "managedFields": [{"x": 1}]})
        want = d["spec"].get("replicas", 1)
        # One Deployment still rolling out, the others done.
        ready = 0 if i == 0 else want
        d["status"] = {"observedGeneration": 4, "replicas": want, "readyReplicas": ready, "updatedReplicas": want}
        deployments.append(d)
    stuck_pod = {
        "metadata": {
            "name": "p1",
            "namespace": "ns",
            "uid": "p1",
            "resourceVersion": "3",
            "labels": dict(deployments[0]["spec"]["template"]["metadata"]["labels"]),
        },
        "spec": {"containers": [{"name": "engine", "image": "x"}]},
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/7 nodes fit"}
            ],
        },
    }
    c = ChildCache(["Deployment", "Pod"])
    c.replace("Deployment", deployments)
    c.replace("Pod", [stuck_pod])
    pk = ("ns", policy.name)
    cached = c.deployments(pk)
    assert all("template" not in d["spec"] and "managedFields" not in d["metadata"] for d in cached.values())
    whole = {d["metadata"]["name"]: d for d in deployments}
    expected = compute_status(policy, whole, [stuck_pod])
    assert compute_status(policy, cached, c.pods(pk)) == expected
    degraded = [x for x in expected["conditions"] if x["type"] == "Degraded"]
    assert degraded[0]["status"] == "True"
    assert "0/7 nodes fit" in degraded[0]["message"]
