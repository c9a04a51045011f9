"""The children's cache (what the watches have seen) and the rule that skips an unneeded apply, without a cluster."""

from __future__ import annotations

from typing import Any

import pytest

from tiergate_operator.builders import KIND_ORDER
from tiergate_operator.cache import ChildCache, Seen
from tiergate_operator.reconcile import Applied, intent_digest, needs_apply
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


def _seen(uid: str = "u1", rv: str = "10", gen: int | None = 3) -> Seen:
    return Seen(uid=uid, resource_version=rv, generation=gen, owner_uids=frozenset())


@pytest.mark.parametrize(
    ("last", "seen", "strict", "expected", "why"),
    [
        (None, _seen(), False, True, "never applied by this process"),
        (Applied("h", "u1", "10", "g3"), None, False, True, "deleted, or not seen yet"),
        (Applied("other", "u1", "10", "g3"), _seen(), False, True, "the policy asks for something else now"),
        (Applied("h", "u1", "10", "g3"), _seen(uid="u2"), False, True, "deleted and re-created by someone"),
        (Applied("h", "u1", "10", "g3"), _seen(gen=4, rv="11"), False, True, "spec edited (new generation)"),
        (Applied("h", "u1", "10", "g3"), _seen(rv="12"), False, False, "status update only: not ours to undo"),
        (Applied("h", "u1", "10", "g3"), _seen(rv="12"), True, True, "resync: any change at all (labels too)"),
        (Applied("h", "u1", "10", "g3"), _seen(), True, False, "resync: exactly what our apply returned"),
        (Applied("h", "u1", "10", "r10"), _seen(gen=None, rv="11"), False, True, "edit of a kind without generation"),
        (Applied("h", "u1", "10", "r10"), _seen(gen=None), False, False, "kind without generation, unchanged"),
    ],
)
def test_needs_apply(last: Applied | None, seen: Seen | None, strict: bool, expected: bool, why: str) -> None:
    assert needs_apply("h", last, seen, strict=strict) is expected, why


def test_intent_digest_ignores_key_order_but_not_values() -> None:
    a = {"kind": "Service", "spec": {"ports": [{"port": 80}], "selector": {"a": "1"}}}
    b = {"spec": {"selector": {"a": "1"}, "ports": [{"port": 80}]}, "kind": "Service"}
    assert intent_digest(a) == intent_digest(b)
    b["spec"]["ports"][0]["port"] = 81
    assert intent_digest(a) != intent_digest(b)
