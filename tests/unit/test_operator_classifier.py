"""Classifier changes take effect: the operator's check and copy of a classifier artifact, the digest of the
router's start-time inputs on its pod template, and the one test tying that digest to what the router's reload
refuses. No cluster: the builders are pure, and reconcile's reads go through a small fake."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.artifacts import fit_to_shipped_n_tier as n_tier_fit
from tiergate.api.policy import RoutingPolicy, parse_policy
from tiergate_operator import builders as b
from tiergate_operator import classifier as oc
from tiergate_operator.cache import ChildCache
from tiergate_operator.config import OperatorConfig
from tiergate_operator.controller import Controller
from tiergate_operator.reconcile import PolicyMemory, resolve_classifier
from tiergate_operator.status import compute_status
from tiergate_operator.watches import SourceWatch
from tiergate_router import restart_inputs as ri
from tiergate_router.artifact_classifier import default_artifact_path
from tiergate_router.errors import ConfigError
from tiergate_router.metrics import RouterMetrics

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"
# Two real, different artifacts: the shipped default routers (two-tier and N-tier).
TWO_TIER = default_artifact_path()
MULTI_TIER = TWO_TIER.with_name("multi-tier.json")


def policy(mutate: Callable[[dict[str, Any]], None] | None = None) -> RoutingPolicy:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update({"namespace": "team-a", "uid": "uid-123", "generation": 4})
    if mutate:
        mutate(doc)
    return parse_policy(doc)


def user_cm(text: str | None, key: str = "router.json", name: str = "chat-router-artifact") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "team-a"}, "data": {} if text is None else {key: text}}


def good(path: Path = TWO_TIER) -> oc.ClassifierCopy:
    found = oc.read_source(policy(n_tier_fit if path == MULTI_TIER else None), user_cm(path.read_text()))
    assert isinstance(found, oc.ClassifierCopy)
    return found


# --- the check ------------------------------------------------------------------------------------------------


def test_check_accepts_real_artifacts_and_reports_their_own_sha256() -> None:
    for path in (TWO_TIER, MULTI_TIER):
        text = path.read_text()
        assert oc.check_artifact(text, "x") == json.loads(text)["sha256"]
    assert good(TWO_TIER).sha256 != good(MULTI_TIER).sha256


def test_check_agrees_with_the_run_time_loader_on_the_checksum() -> None:
    """The operator checks the checksum with the format module alone (no numpy): an artifact the run-time module
    writes passes, and one field edited by hand fails both."""
    from tiergate.routing.artifact import ArtifactError, dumps, loads

    art = loads(TWO_TIER.read_bytes()).with_updates(default_threshold_bp=4321)
    text = dumps(art).decode()
    assert oc.check_artifact(text, "x") == json.loads(text)["sha256"] != json.loads(TWO_TIER.read_text())["sha256"]
    edited = text.replace('"default_threshold_bp": 4321', '"default_threshold_bp": 4322')
    assert edited != text
    with pytest.raises(ValueError, match="checksum mismatch"):
        oc.check_artifact(edited, "x")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        loads(edited)


def _reformat(doc_edit: Callable[[dict[str, Any]], None]) -> str:
    doc = json.loads(TWO_TIER.read_text())
    doc_edit(doc)
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not JSON"),
        ('{"format": "something.else"}', "not a router artifact"),
        (_reformat(lambda d: d.update(format_version=99)), "format version 99"),
        (_reformat(lambda d: d.update(kind="three_tier")), "checksum mismatch"),
        (TWO_TIER.read_text()[:-200], "not JSON"),
        ("x" * (1024 * 1024), "more than a router artifact may hold"),
    ],
)
def test_broken_artifacts_are_refused_naming_the_configmap_and_key(text: str, fragment: str) -> None:
    found = oc.read_source(policy(), user_cm(text))
    assert isinstance(found, oc.ClassifierProblem)
    assert found.reason == oc.INVALID
    assert "ConfigMap team-a/chat-router-artifact key router.json" in found.message
    assert fragment in found.message


def test_a_two_tier_artifact_for_more_than_two_tiers_is_refused_an_n_tier_one_is_not() -> None:
    def three(d: dict[str, Any]) -> None:
        mid = dict(d["spec"]["tiers"][0], name="mid")
        d["spec"]["tiers"].insert(1, mid)

    found = oc.read_source(policy(three), user_cm(TWO_TIER.read_text()))
    assert isinstance(found, oc.ClassifierProblem)
    assert found.reason == oc.INVALID
    assert found.message.startswith("spec.tiers: 3 tiers, but ConfigMap team-a/chat-router-artifact key router.json")
    assert "mid would never be chosen" in found.message
    n_tier = oc.read_source(policy(_both(three, n_tier_fit)), user_cm(MULTI_TIER.read_text()))
    assert isinstance(n_tier, oc.ClassifierCopy)


def test_an_n_tier_artifact_is_refused_for_what_the_router_would_refuse() -> None:
    """Named tiers it does not know, a two-tier knob, prices its calibration does not describe: ClassifierInvalid
    naming the field (test_operator_router_agree.py holds these verdicts equal to the router's)."""
    art = user_cm(MULTI_TIER.read_text())

    def problem(*mutations: Callable[[dict[str, Any]], None]) -> str:
        found = oc.read_source(policy(_both(n_tier_fit, *mutations)), art)
        assert isinstance(found, oc.ClassifierProblem)
        assert found.reason == oc.INVALID
        return found.message

    knob = problem(lambda d: d["spec"]["router"].update(thresholdBasisPoints=5000))
    assert knob.startswith("spec.router.thresholdBasisPoints: a two-tier knob, but ConfigMap team-a/chat-router-")
    unknown = problem(lambda d: d["spec"]["tiers"][1].update(servedModelName="gpt-9", model="org/gpt-9"))
    assert unknown.startswith("spec.tiers[1] (large): matches no tier of ConfigMap team-a/chat-router-artifact")
    twice = problem(lambda d: d["spec"]["tiers"][1].update(servedModelName="gemma-2-9b-it"))
    assert "spec.tiers[1] (large): maps to artifact tier 'gemma-2-9b-it'" in twice
    priced = problem(lambda d: d["spec"]["tiers"][1]["price"].update(inputPerMillion="5"))
    assert priced.startswith("spec.tiers[1].price: 5.9 $/Mtok (input + output) is not 1 x the artifact's 1.8 for")
    assert "costWeightBasisPoints" in priced
    budget = problem(
        lambda d: d["spec"]["tiers"][1]["price"].update(inputPerMillion="5"),
        lambda d: d["spec"]["router"].update(budgetPerMillion="1"),
    )
    assert "spec.router.budgetPerMillion comes from it" in budget
    # The same prices with a cost weight: served (the weight is taken against them).
    weighted = _both(
        n_tier_fit,
        lambda d: d["spec"]["tiers"][1]["price"].update(inputPerMillion="5"),
        lambda d: d["spec"]["router"].update(costWeightBasisPoints=500),
    )
    assert isinstance(oc.read_source(policy(weighted), art), oc.ClassifierCopy)

    # Prices in the artifact's ratios (all doubled): its calibration holds, served.
    def doubled(d: dict[str, Any]) -> None:
        for t in d["spec"]["tiers"]:
            t["price"]["outputPerMillion"] = f"{3 * float(t['price']['inputPerMillion']):.6f}"  # in + out: 2 x

    assert isinstance(oc.read_source(policy(_both(n_tier_fit, doubled)), art), oc.ClassifierCopy)


def test_a_two_tier_artifact_is_refused_with_an_n_tier_knob() -> None:
    def weight(d: dict[str, Any]) -> None:
        d["spec"]["router"].pop("targetStrongShareBasisPoints")
        d["spec"]["router"]["costWeightBasisPoints"] = 5

    found = oc.read_source(policy(weight), user_cm(TWO_TIER.read_text()))
    assert isinstance(found, oc.ClassifierProblem)
    assert found.message.startswith("spec.router.costWeightBasisPoints: an N-tier knob, but ConfigMap team-a/")


def test_missing_configmap_or_key_and_binary_data() -> None:
    absent = oc.read_source(policy(), None)
    assert isinstance(absent, oc.ClassifierProblem)
    assert absent.reason == oc.MISSING
    assert "team-a/chat-router-artifact" in absent.message
    assert "does not exist" in absent.message
    no_key = oc.read_source(policy(), user_cm("{}", key="other.json"))
    assert isinstance(no_key, oc.ClassifierProblem)
    assert no_key.reason == oc.MISSING
    assert "no such key (keys: other.json)" in no_key.message
    import base64

    raw = base64.b64encode(TWO_TIER.read_bytes()).decode()
    binary = oc.read_source(policy(), {"metadata": {}, "binaryData": {"router.json": raw}})
    assert isinstance(binary, oc.ClassifierCopy)
    assert binary.sha256 == good().sha256
    # A policy naming no classifier ConfigMap (the shipped default, or a path) has nothing to check.
    assert oc.read_source(policy(lambda d: d["spec"]["router"].pop("classifier")), None) is None


def test_the_operators_own_configmaps_are_refused_as_sources() -> None:
    def name_it(n: str) -> Callable[[dict[str, Any]], None]:
        return lambda d: d["spec"]["router"]["classifier"]["configMap"].update(name=n)

    for n in ("chat-router-classifier", "chat-router"):
        found = oc.read_source(policy(name_it(n)), user_cm(TWO_TIER.read_text(), name=n))
        assert isinstance(found, oc.ClassifierProblem)
        assert "operator's own ConfigMap" in found.message


# --- the builders ---------------------------------------------------------------------------------------------


def router_deployment(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "chat-router"]
    return dep


def digest(p: RoutingPolicy, c: oc.ClassifierCopy | None) -> str:
    ann = router_deployment(b.build_children(p, c))["spec"]["template"]["metadata"]["annotations"]
    return str(ann[oc.ROUTER_INPUTS_ANNOTATION])


def test_the_copy_is_a_child_and_the_router_mounts_it() -> None:
    c = good()
    objs = b.build_children(policy(), c)
    (copy,) = [o for o in objs if b.child_key(o) == ("ConfigMap", "chat-router-classifier")]
    assert copy["data"] == {oc.COPY_KEY: TWO_TIER.read_text()}
    assert copy["metadata"]["annotations"] == {oc.CLASSIFIER_SHA_ANNOTATION: c.sha256}
    assert copy["metadata"]["ownerReferences"][0]["uid"] == "uid-123"
    kinds = [o["kind"] for o in objs]
    assert kinds.index("ConfigMap") < kinds.index("Deployment")
    vols = {v["name"]: v for v in router_deployment(objs)["spec"]["template"]["spec"]["volumes"]}
    assert vols["classifier"]["configMap"]["name"] == "chat-router-classifier"
    # Before any artifact was good there is no copy to apply; the router still mounts it (and waits for it).
    assert ("ConfigMap", "chat-router-classifier") not in {b.child_key(o) for o in b.build_children(policy())}


def test_the_digest_moves_with_the_artifact_and_nothing_the_router_reloads() -> None:
    base = digest(policy(), good())
    assert digest(policy(), good()) == base  # deterministic
    assert digest(policy(), good(MULTI_TIER)) != base
    assert digest(policy(), None) != base

    def threshold(d: dict[str, Any]) -> None:
        d["spec"]["router"]["targetStrongShareBasisPoints"] = 1234

    assert digest(policy(threshold), good()) == base


# --- the tie between the two sides ----------------------------------------------------------------------------


def _external_tier(secret: str, key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        d["spec"]["tiers"] = [t for t in d["spec"]["tiers"] if t["name"] != "ext"]
        d["spec"]["tiers"].append(
            {
                "name": "ext",
                "model": "gpt-x",
                "endpoint": {"url": "https://api.example.com/v1", "apiKeySecretRef": {"name": secret, "key": key}},
                "price": {"inputPerMillion": "1", "outputPerMillion": "2"},
            }
        )

    return mutate


def _both(*ms: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        for m in ms:
            m(d)

    return mutate


def _classifier(**ref: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["spec"]["router"].update(classifier=ref)


# One policy change per start-time field the router names, and changes it reloads (the control group).
START_TIME_CHANGES: dict[str, list[Callable[[dict[str, Any]], None]]] = {
    ri.CLASSIFIER_REF: [
        _classifier(configMap={"name": "other-artifact", "key": "router.json"}),
        _classifier(configMap={"name": "chat-router-artifact", "key": "v2.json"}),
        _classifier(path="/models/router.json"),
    ],
    ri.API_KEY_REFS: [
        _external_tier("other-secret", "token"),
        _external_tier("llm-keys", "other-key"),
    ],
    ri.CANARY_REF: [
        lambda d: d["spec"]["router"].update(
            canary={"classifier": {"path": "/models/new.json"}, "shareBasisPoints": 1}
        ),
        lambda d: d["spec"]["router"].update(
            canary={"classifier": {"configMap": {"name": "new", "key": "b.json"}}, "shareBasisPoints": 1}
        ),
    ],
}
RELOADABLE_CHANGES: list[Callable[[dict[str, Any]], None]] = [
    lambda d: d["spec"]["router"].update(targetStrongShareBasisPoints=1234),
    lambda d: d["spec"]["router"].update(timeouts={"connectSeconds": 7, "requestSeconds": 99}),
    lambda d: d["spec"]["tiers"][0]["price"].update(inputPerMillion="0.5"),
    lambda d: d["spec"]["router"].update(fallbackOrder=["small", "large"]),
]


def test_the_digest_covers_exactly_what_the_routers_reload_refuses() -> None:
    """The router names the inputs it reads only at start (its reload refuses a change to them); the operator's
    digest on the router's pod template covers exactly those, so each such change rolls the router. Adding a
    start-time input on one side without the other fails here."""
    assert oc.ROUTER_INPUTS == ri.STARTUP_INPUTS
    assert set(oc.router_inputs(policy(), good())) == set(ri.STARTUP_INPUTS)
    artifacts = {ri.CLASSIFIER_ARTIFACT, ri.CANARY_ARTIFACT}
    assert set(START_TIME_CHANGES) == set(ri.RELOAD_REFUSED) == ri.STARTUP_INPUTS - artifacts
    running = policy(_external_tier("llm-keys", "token"))
    base = digest(running, good())
    for field, changes in START_TIME_CHANGES.items():
        for change in changes:
            new = policy(_both(_external_tier("llm-keys", "token"), change))
            with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
                ri.refuse_restart_changes(running, new)
            assert digest(new, good()) != base, field
    for change in RELOADABLE_CHANGES:
        new = policy(_both(_external_tier("llm-keys", "token"), change))
        ri.refuse_restart_changes(running, new)
        assert digest(new, good()) == base
    # The artifact's content is the one start-time input that is no policy field: the digest follows it.
    assert digest(running, good(MULTI_TIER)) != base


def test_router_reports_the_classifier_it_serves() -> None:
    m = RouterMetrics()
    sha = ri.report_classifier(m, TWO_TIER, "two_tier")
    assert sha == json.loads(TWO_TIER.read_text())["sha256"]
    text = m.render().decode()
    assert f'tiergate_router_classifier_info{{kind="two_tier",sha256="{sha}",source="{TWO_TIER}"}} 1.0' in text
    m2 = RouterMetrics()
    assert ri.report_classifier(m2, None, "none") == "none"
    assert 'sha256="none"' in m2.render().decode()


# --- reconcile, status, controller, watch ---------------------------------------------------------------------


class FakeKube:
    """Only GET, which is all resolve_classifier does."""

    def __init__(self, objects: dict[str, dict[str, Any]]) -> None:
        self.objects = objects
        self.gets: list[str] = []

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        self.gets.append(name)
        return self.objects.get(name)


def test_a_broken_artifact_keeps_the_last_good_one_even_across_a_restart() -> None:
    p = policy()
    kube = FakeKube({"chat-router-artifact": user_cm(TWO_TIER.read_text())})
    mem = PolicyMemory()
    first = resolve_classifier(kube, p, mem)  # type: ignore[arg-type]
    assert first is not None
    assert first.sha256 == good().sha256
    assert mem.classifier_problem is None
    kube.objects["chat-router-artifact"] = user_cm("{broken")
    kept = resolve_classifier(kube, p, mem)  # type: ignore[arg-type]
    assert kept == first
    assert mem.classifier_problem is not None
    assert mem.classifier_problem.reason == oc.INVALID
    # A restarted operator remembers nothing: the last good artifact comes back from its copy in the cluster.
    copy = b.build_classifier_configmap(p, first)
    kube.objects["chat-router-classifier"] = copy
    fresh = PolicyMemory()
    assert resolve_classifier(kube, p, fresh) == oc.ClassifierCopy(  # type: ignore[arg-type]
        first.content, first.sha256, "ConfigMap team-a/chat-router-classifier key artifact.json"
    )
    del kube.objects["chat-router-artifact"]
    assert resolve_classifier(kube, p, fresh) is not None  # type: ignore[arg-type]
    assert fresh.classifier_problem is not None
    assert fresh.classifier_problem.reason == oc.MISSING
    # Never good, no copy: nothing to serve, and the status says why.
    none = PolicyMemory()
    assert resolve_classifier(FakeKube({}), p, none) is None  # type: ignore[arg-type]
    assert none.classifier_problem is not None


def _ready(name: str, n: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "generation": 1},
        "spec": {"replicas": n},
        "status": {"observedGeneration": 1, "replicas": n, "readyReplicas": n, "updatedReplicas": n},
    }


def test_a_refused_classifier_makes_the_policy_degraded_not_rolling_out() -> None:
    p = policy()
    deps = {d: _ready(d, n) for d, n in {"chat-tier-small": 2, "chat-tier-large": 1, "chat-router": 2}.items()}
    deps["chat-reward"] = _ready("chat-reward", 1)
    assert {c["type"]: c["status"] for c in compute_status(p, deps, [])["conditions"]}["Ready"] == "True"
    st = compute_status(p, deps, [], router_problem=(oc.MISSING, "ConfigMap team-a/x key k: does not exist"))
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Degraded"]["status"] == "True"
    assert conds["Degraded"]["reason"] == oc.MISSING
    assert "router: 2/2 ready: ConfigMap team-a/x key k" in conds["Degraded"]["message"]
    assert conds["Ready"]["status"] == "False"
    assert conds["Ready"]["reason"] == oc.MISSING
    assert conds["Progressing"]["status"] == "False"
    # Even while the router's pod waits for a copy that never came.
    deps.pop("chat-router")
    st = compute_status(p, deps, [], router_problem=(oc.MISSING, "gone"))
    assert {c["type"]: c["reason"] for c in st["conditions"]}["Degraded"] == oc.MISSING


def test_a_changed_configmap_requeues_the_policies_naming_it() -> None:
    async def go() -> None:
        c = Controller(OperatorConfig(), kube=None, cache=ChildCache(["Deployment"]))  # type: ignore[arg-type]
        body = {"metadata": {"name": "chat"}, "spec": {"router": {"classifier": {"configMap": {"name": "art"}}}}}
        c.policy_event("ns", "chat", 1, deleted=False, body=body)
        c.policy_event("ns", "other", 1, deleted=False, body={"spec": {"router": {}}})
        c._queued.clear()
        c._need_apply.clear()
        c.source_event("ns", "unrelated")
        c.source_event("elsewhere", "art")
        assert not c._queued
        c.source_event("ns", "art")
        assert c._queued == {("ns", "chat")}
        assert c._need_apply == {("ns", "chat")}
        # The policy moves to another ConfigMap, then goes: the old name stops mattering.
        c._queued.clear()
        moved = {"spec": {"router": {"classifier": {"configMap": {"name": "art2"}}}}}
        c.policy_event("ns", "chat", 2, deleted=False, body=moved)
        c._queued.clear()
        c.source_event("ns", "art")
        assert not c._queued
        c.policy_event("ns", "chat", 2, deleted=True)
        c.source_event("ns", "art2")
        assert not c._queued
        c._executor.shutdown()
        c._apply_pool.shutdown()

    asyncio.run(go())


def test_the_source_watch_reports_changes_made_while_it_was_down() -> None:
    seen: list[tuple[str, str]] = []

    class Loop:
        def call_soon_threadsafe(self, f: Callable[..., None], *args: Any) -> None:
            f(*args)

    w = SourceWatch(kube=None, namespace=None, loop=Loop(), on_event=lambda ns, n: seen.append((ns, n)))  # type: ignore[arg-type]

    def item(name: str, rv: str) -> dict[str, Any]:
        return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": rv}}

    w.relisted([item("a", "1"), item("b", "1"), item("c", "1")])
    assert seen == []  # the first list: the reconciles at start read every source anyway
    w.changed("MODIFIED", item("a", "2"))
    assert seen == [("ns", "a")]
    seen.clear()
    w.relisted([item("a", "2"), item("b", "5")])  # b changed, c went, while no watch ran
    assert sorted(seen) == [("ns", "b"), ("ns", "c")]


def test_the_operator_checks_artifacts_without_numpy() -> None:
    """The operator image has no numpy (the `operator` extra): the check must not need it, on import or in use."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['numpy'] = None  # any import of numpy now fails\n"
        "import tiergate_operator.main\n"
        "from tiergate_operator.classifier import check_artifact\n"
        f"print(check_artifact(open({str(TWO_TIER)!r}).read(), 'x'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == json.loads(TWO_TIER.read_text())["sha256"]
