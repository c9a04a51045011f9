"""A spec the operator refuses shows in `status.conditions` (reason, field, observedGeneration), and nothing of it is
applied: InvalidSpec (the typed model rejects what the CRD let through) and MissingReference (a ConfigMap a tier's
environment names does not exist, or lacks the key)."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tiergate.api import PolicyValidationError, parse_policy
from tiergate.api.policy import RoutingPolicy
from tiergate_operator.cache import ChildCache
from tiergate_operator.config import OperatorConfig
from tiergate_operator.controller import Controller
from tiergate_operator.reconcile import PolicyMemory, reconcile
from tiergate_operator.references import configmaps_named, missing_references
from tiergate_operator.status import (
    INVALID_SPEC,
    MISSING_REFERENCE,
    SpecProblem,
    invalid_spec,
    refused_status,
    status_changed,
)
from tiergate_operator.watches import WATCHED_KINDS

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"
ENV_FIELD = "spec.tiers[0].engine.env[1].valueFrom.configMapKeyRef"


def body(generation: int = 3, env: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update({"namespace": "team-a", "uid": "uid-1", "generation": generation})
    # A path classifier: no classifier ConfigMap to read, so the only GETs are the references'.
    doc["spec"]["router"]["classifier"] = {"path": "/models/router.json"}
    if env is not None:
        doc["spec"]["tiers"][0]["engine"]["env"] = env
    return doc


def with_ref(name: str = "vllm-extra", key: str = "flags") -> list[dict[str, Any]]:
    return [
        {"name": "A", "value": "1"},
        {"name": "EXTRA", "valueFrom": {"configMapKeyRef": {"name": name, "key": key}}},
    ]


def cm(name: str, **data: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "team-a"}, "data": data}


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


# --- pure functions ---------------------------------------------------------------------------------------------


def test_refused_status_names_reason_field_and_generation_and_keeps_the_rest() -> None:
    previous = {
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "AllComponentsReady", "lastTransitionTime": "T0"},
            {"type": "Degraded", "status": "False", "reason": "Healthy", "lastTransitionTime": "T0"},
        ],
        "observedGeneration": 2,
        "tiers": [{"name": "small", "readyReplicas": 2}],
        "readyTiers": "2/2",
    }
    problem = SpecProblem(MISSING_REFERENCE, ENV_FIELD, f"{ENV_FIELD}: ConfigMap team-a/x does not exist")
    st = refused_status(previous, problem, 3, now="T1")
    conds = conditions(st)
    assert set(conds) == {"Ready", "Progressing", "Degraded"}
    assert {t: (c["status"], c["reason"]) for t, c in conds.items()} == {
        "Ready": ("False", MISSING_REFERENCE),
        "Progressing": ("False", MISSING_REFERENCE),
        "Degraded": ("True", MISSING_REFERENCE),
    }
    for t in ("Ready", "Degraded"):
        assert ENV_FIELD in conds[t]["message"]
        assert "nothing applied" in conds[t]["message"]
    assert all(c["observedGeneration"] == 3 for c in conds.values())
    assert st["observedGeneration"] == 3
    assert all(c["lastTransitionTime"] == "T1" for c in conds.values())  # every one flipped
    # What the children are did not change: kept from the previous status.
    assert st["tiers"] == previous["tiers"]
    assert st["readyTiers"] == "2/2"
    # Refusing again changes nothing (no rewrite, no watch event), and keeps the transition times.
    again = refused_status(st, problem, 3, now="T2")
    assert not status_changed(st, again)
    assert all(c["lastTransitionTime"] == "T1" for c in again["conditions"])


def test_invalid_spec_names_the_models_field() -> None:
    doc = body()
    doc["spec"]["bestOfN"]["tier"] = "medium"
    with pytest.raises(PolicyValidationError) as info:
        parse_policy(doc)
    problem = invalid_spec(info.value.errors)
    assert problem.reason == INVALID_SPEC
    assert problem.field == "spec.bestOfN.tier"
    assert "spec.bestOfN.tier" in problem.message
    assert "medium" in problem.message
    st = refused_status({}, problem, 7)
    assert conditions(st)["Degraded"]["message"].startswith("invalid spec: spec.bestOfN.tier")
    assert st["observedGeneration"] == 7


def _policy(env: list[dict[str, Any]] | None) -> RoutingPolicy:
    return parse_policy(body(env=env))


def test_missing_references_checks_configmaps_and_keys_reading_each_once() -> None:
    reads: list[str] = []

    def get(objects: dict[str, dict[str, Any]]) -> Any:
        def go(name: str) -> dict[str, Any] | None:
            reads.append(name)
            return objects.get(name)

        return go

    assert missing_references(_policy(None), get({})) is None
    assert reads == []  # the sample names no ConfigMap in its environments

    absent = missing_references(_policy(with_ref()), get({}))
    assert absent == SpecProblem(
        MISSING_REFERENCE, ENV_FIELD, f"{ENV_FIELD}: ConfigMap team-a/vllm-extra does not exist"
    )

    no_key = missing_references(_policy(with_ref()), get({"vllm-extra": cm("vllm-extra", other="x")}))
    assert no_key is not None
    assert no_key.field == ENV_FIELD
    assert "has no key 'flags'" in no_key.message

    binary = {"metadata": {"name": "vllm-extra"}, "binaryData": {"flags": "eA=="}}
    assert missing_references(_policy(with_ref()), get({"vllm-extra": binary})) is None

    reads.clear()
    two = [*with_ref(), {"name": "MORE", "valueFrom": {"configMapKeyRef": {"name": "vllm-extra", "key": "more"}}}]
    found = missing_references(_policy(two), get({}))
    assert reads == ["vllm-extra"]
    assert found is not None
    assert found.field == ENV_FIELD
    assert "spec.tiers[0].engine.env[2].valueFrom.configMapKeyRef" in found.message

    # Secrets are not checked (the operator may not read them): a secretKeyRef is no missing reference.
    secret = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "token"}}}]
    assert missing_references(_policy(secret), get({})) is None


def test_configmaps_named_lists_classifier_and_environment_refs_of_a_raw_body() -> None:
    doc = body(env=with_ref())
    doc["spec"]["router"]["classifier"] = {"configMap": {"name": "art", "key": "router.json"}}
    assert configmaps_named(doc) == {"art", "vllm-extra"}
    assert configmaps_named({"spec": {"tiers": ["junk", {"engine": {"env": [{"valueFrom": None}]}}]}}) == set()


# --- reconcile and controller -----------------------------------------------------------------------------------


class FakeKube:
    """An API server of ConfigMaps the test sets, recording applies, status patches and Events."""

    def __init__(self) -> None:
        self.configmaps: dict[str, dict[str, Any]] = {}
        self.applied: list[tuple[str, str]] = []
        self.statuses: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        assert kind == "ConfigMap"
        return self.configmaps.get(name)

    def apply(self, obj: dict[str, Any], field_manager: str) -> dict[str, Any]:
        self.applied.append((obj["kind"], obj["metadata"]["name"]))
        out = copy.deepcopy(obj)
        out["metadata"].update(uid=f"u-{obj['metadata']['name']}", resourceVersion="1", generation=1)
        return out

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.statuses.append(copy.deepcopy(status))

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        raise AssertionError(f"nothing is pruned here: {kind} {name}")

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.events.append(obj)
        return obj


def test_a_missing_reference_applies_nothing_until_the_configmap_appears() -> None:
    kube, cache, mem = FakeKube(), ChildCache(WATCHED_KINDS), PolicyMemory()
    doc = body(env=with_ref())
    out = reconcile(kube, doc, OperatorConfig(), mem, cache)  # type: ignore[arg-type]
    assert kube.applied == []
    assert out.created == []
    assert out.status_written
    conds = conditions(kube.statuses[-1])
    assert conds["Degraded"]["reason"] == MISSING_REFERENCE
    assert ENV_FIELD in conds["Degraded"]["message"]
    assert kube.statuses[-1]["observedGeneration"] == 3

    # A status-only refresh (pods changed) keeps the refusal instead of computing a fresh rollout status.
    reconcile(kube, doc, OperatorConfig(), mem, cache, apply=False)  # type: ignore[arg-type]
    assert len(kube.statuses) == 1
    assert kube.applied == []

    kube.configmaps["vllm-extra"] = cm("vllm-extra", flags="--enforce-eager")
    out = reconcile(kube, doc, OperatorConfig(), mem, cache)  # type: ignore[arg-type]
    assert ("Deployment", "chat-tier-small") in kube.applied
    assert mem.refused is None
    conds = conditions(kube.statuses[-1])
    assert conds["Degraded"]["status"] == "False"
    assert conds["Ready"]["reason"] != MISSING_REFERENCE


def _three_tiers(doc: dict[str, Any]) -> dict[str, Any]:
    mid = copy.deepcopy(doc["spec"]["tiers"][0])
    mid["name"] = "mid"
    doc["spec"]["tiers"].insert(1, mid)
    return doc


def test_more_than_two_tiers_under_the_default_two_tier_classifier_are_an_invalid_spec() -> None:
    """The shipped default router scores one number (cheapest or strongest): a tier between would never be chosen
    and the router refuses such a policy, so the operator refuses it first, naming spec.tiers and that tier."""
    kube, cache, mem = FakeKube(), ChildCache(WATCHED_KINDS), PolicyMemory()
    doc = _three_tiers(body())
    del doc["spec"]["router"]["classifier"]
    reconcile(kube, doc, OperatorConfig(), mem, cache)  # type: ignore[arg-type]
    assert kube.applied == []
    assert mem.refused is not None
    assert (mem.refused.reason, mem.refused.field) == (INVALID_SPEC, "spec.tiers")
    conds = conditions(kube.statuses[-1])
    assert conds["Degraded"]["reason"] == INVALID_SPEC
    assert "spec.tiers: 3 tiers, but the shipped default router" in conds["Degraded"]["message"]
    assert "mid would never be chosen" in conds["Degraded"]["message"]
    # With a classifier named (an N-tier artifact, say) the operator applies; the artifact decides.
    doc["spec"]["router"]["classifier"] = {"path": "/models/multi.json"}
    reconcile(kube, doc, OperatorConfig(), mem, cache)  # type: ignore[arg-type]
    assert mem.refused is None
    assert ("Deployment", "chat-tier-mid") in kube.applied


def test_an_invalid_spec_is_reported_in_status_once_and_nothing_applied() -> None:
    async def go() -> None:
        kube = FakeKube()
        c = Controller(OperatorConfig(), kube=kube, cache=ChildCache(WATCHED_KINDS))  # type: ignore[arg-type]
        doc = body()
        doc["spec"]["bestOfN"]["tier"] = "medium"
        c.policy_event("team-a", "chat", 3, deleted=False, body=doc)
        c._reconcile_blocking(("team-a", "chat"))
        assert kube.applied == []
        (st,) = kube.statuses
        conds = conditions(st)
        assert conds["Ready"]["status"] == "False"
        assert conds["Ready"]["reason"] == INVALID_SPEC
        assert conds["Degraded"]["status"] == "True"
        assert "spec.bestOfN.tier" in conds["Degraded"]["message"]
        assert st["observedGeneration"] == 3
        (event,) = kube.events
        assert event["reason"] == INVALID_SPEC
        assert event["type"] == "Warning"
        assert "spec.bestOfN.tier" in event["message"]
        # A resync of the same generation: no new status write, no second Event.
        c._resync_due.discard(("team-a", "chat"))
        c._need_apply.add(("team-a", "chat"))
        c._reconcile_blocking(("team-a", "chat"))
        assert len(kube.statuses) == 1
        assert len(kube.events) == 1
        c._executor.shutdown()
        c._apply_pool.shutdown()

    asyncio.run(go())


def test_a_configmap_named_in_an_environment_requeues_its_policy() -> None:
    async def go() -> None:
        c = Controller(OperatorConfig(), kube=None, cache=ChildCache(["Deployment"]))  # type: ignore[arg-type]
        c.policy_event("team-a", "chat", 1, deleted=False, body=body(env=with_ref()))
        c._queued.clear()
        c._need_apply.clear()
        c.source_event("team-a", "vllm-extra")
        assert c._queued == {("team-a", "chat")}
        assert c._need_apply == {("team-a", "chat")}
        c._executor.shutdown()
        c._apply_pool.shutdown()

    asyncio.run(go())
