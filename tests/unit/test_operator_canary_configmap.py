"""A canary artifact given as a ConfigMap key (spec.router.canary.classifier.configMap): checked and copied like the
primary classifier, mounted where the router looks for it, in the router-inputs digest, watched, and refused in
status naming the field while it is missing or was never good. Real artifacts (the shipped routers), a fake API
server (tests/unit/test_operator_spec_status.py's), no cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.unit.test_operator_spec_status import FakeKube, body, cm, conditions
from tiergate.api import naming
from tiergate.api.policy import RoutingPolicy, parse_policy
from tiergate_operator import builders as b
from tiergate_operator import classifier as oc
from tiergate_operator.cache import ChildCache
from tiergate_operator.config import OperatorConfig
from tiergate_operator.reconcile import PolicyMemory, reconcile
from tiergate_operator.references import configmaps_named
from tiergate_operator.status import INVALID_SPEC, MISSING_REFERENCE
from tiergate_operator.watches import WATCHED_KINDS
from tiergate_router.artifact_classifier import default_artifact_path
from tiergate_router.config.shadow import policy_canary_path

TWO_TIER = default_artifact_path()
MULTI_TIER = TWO_TIER.with_name("multi-tier.json")
FIELD = "spec.router.canary.classifier.configMap"
COPY = "chat-router-canary-classifier"


def canary_body(name: str = "canary-art", key: str = "b.json") -> dict[str, Any]:
    doc = body()
    doc["spec"]["router"]["canary"] = {
        "classifier": {"configMap": {"name": name, "key": key}},
        "shareBasisPoints": 2000,
    }
    return doc


def good_canary(p: RoutingPolicy, path: Path = TWO_TIER) -> oc.ClassifierCopy:
    found = oc.read_canary_source(p, cm("canary-art", **{"b.json": path.read_text()}))
    assert isinstance(found, oc.ClassifierCopy)
    return found


def router(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = [o for o in objs if b.child_key(o) == ("Deployment", "chat-router")]
    return dep


def test_the_canary_copy_is_a_child_mounted_where_the_router_reads_it() -> None:
    p = parse_policy(canary_body())
    c = good_canary(p)
    objs = b.build_children(p, None, c)
    (copy,) = [o for o in objs if b.child_key(o) == ("ConfigMap", COPY)]
    assert copy["data"] == {oc.COPY_KEY: TWO_TIER.read_text()}
    assert copy["metadata"]["annotations"] == {oc.CLASSIFIER_SHA_ANNOTATION: c.sha256}
    assert copy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    pod = router(objs)["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "canary-classifier"]
    assert vol["configMap"] == {"name": COPY, "items": [{"key": oc.COPY_KEY, "path": "b.json"}]}
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "canary-classifier"]
    # The router loads the canary from the file the mount makes.
    assert Path(mount["mountPath"]) / "b.json" == policy_canary_path(p)
    assert mount["mountPath"] == naming.CANARY_MOUNT_DIR
    # A path canary mounts nothing and has no copy.
    path_doc = body()
    path_doc["spec"]["router"]["canary"] = {"classifier": {"path": "/models/b.json"}, "shareBasisPoints": 2000}
    plain = b.build_children(parse_policy(path_doc))
    assert ("ConfigMap", COPY) not in {b.child_key(o) for o in plain}
    assert "canary-classifier" not in {v["name"] for v in router(plain)["spec"]["template"]["spec"]["volumes"]}


def test_the_digest_moves_with_the_canary_artifact() -> None:
    p = parse_policy(canary_body())

    def digest(c: oc.ClassifierCopy | None) -> str:
        ann = router(b.build_children(p, None, c))["spec"]["template"]["metadata"]["annotations"]
        return str(ann[oc.ROUTER_INPUTS_ANNOTATION])

    assert digest(good_canary(p)) == digest(good_canary(p))
    assert digest(good_canary(p)) != digest(None)
    other = good_canary(p, TWO_TIER)
    changed = oc.ClassifierCopy(other.content, "0" * 64, other.source)
    assert digest(changed) != digest(other)
    assert oc.router_inputs(p, None, other)[oc.CANARY_ARTIFACT] == other.sha256


def test_a_misfit_or_broken_canary_is_refused_naming_the_field() -> None:
    p = parse_policy(canary_body())
    # An N-tier artifact under the policy's two-tier knob: the router would refuse it.
    misfit = oc.read_canary_source(p, cm("canary-art", **{"b.json": MULTI_TIER.read_text()}))
    assert isinstance(misfit, oc.ClassifierProblem)
    assert misfit.message.startswith(f"{FIELD}: ")
    broken = oc.read_canary_source(p, cm("canary-art", **{"b.json": "{broken"}))
    assert isinstance(broken, oc.ClassifierProblem)
    assert broken.message.startswith(f"{FIELD}: ConfigMap team-a/canary-art key b.json: not JSON")
    own = oc.read_canary_source(parse_policy(canary_body(name=COPY)), cm(COPY, **{"b.json": TWO_TIER.read_text()}))
    assert isinstance(own, oc.ClassifierProblem)
    assert "operator's own ConfigMap" in own.message
    assert configmaps_named(canary_body()) == {"canary-art"}


def test_reconcile_refuses_until_a_good_canary_then_keeps_the_last_good_one() -> None:
    kube, cache, mem = FakeKube(), ChildCache(WATCHED_KINDS), PolicyMemory()
    doc = canary_body()
    # The ConfigMap does not exist: a missing reference naming the field, nothing applied.
    reconcile(kube, doc, OperatorConfig(), mem, cache)  # type: ignore[arg-type]
    assert kube.applied == []
    degraded = conditions(kube.statuses[-1])["Degraded"]
    assert (degraded["reason"], mem.refused and mem.refused.field) == (MISSING_REFERENCE, FIELD)
    assert FIELD in degraded["message"]
    # It exists but holds no good artifact: still refused, as an invalid spec naming the field.
    kube.configmaps["canary-art"] = cm("canary-art", **{"b.json": "{broken"})
    reconcile(kube, doc, OperatorConfig(), mem, cache)  # type: ignore[arg-type]
    assert kube.applied == []
    degraded = conditions(kube.statuses[-1])["Degraded"]
    assert degraded["reason"] == INVALID_SPEC
    assert f"{FIELD}: ConfigMap team-a/canary-art key b.json: not JSON" in degraded["message"]
    # A good one: copied and mounted, the router rolled with its digest.
    kube.configmaps["canary-art"] = cm("canary-art", **{"b.json": TWO_TIER.read_text()})
    reconcile(kube, doc, OperatorConfig(), mem, cache)  # type: ignore[arg-type]
    assert mem.refused is None
    assert ("ConfigMap", COPY) in kube.applied
    assert ("Deployment", "chat-router") in kube.applied
    good = mem.canary
    assert good is not None
    # Broken again: the last good copy keeps serving, the policy is Degraded naming the field.
    kube.configmaps["canary-art"] = cm("canary-art", **{"b.json": "{broken"})
    reconcile(kube, doc, OperatorConfig(), mem, cache)  # type: ignore[arg-type]
    assert mem.refused is None
    assert mem.canary == good
    degraded = conditions(kube.statuses[-1])["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", oc.INVALID)
    assert FIELD in degraded["message"]
    assert f"sha256 {good.sha256[:12]}" in degraded["message"]
