"""Per-tier autoscaling (spec.tiers[].autoscaling): the typed model's refusals, the HPA and ScaledObject builders,
the KEDA-not-installed refusal and the optional-kind watch. (The router's demand gauge the HPAs read has its own
tests with the router.)"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_operator_spec_status import FakeKube, body, conditions
from tiergate.api import naming
from tiergate.api.errors import PolicyValidationError
from tiergate.api.policy import RoutingPolicy, load_policy, parse_policy
from tiergate_operator import builders as b
from tiergate_operator import watches
from tiergate_operator.autoscaling import demand_query, keda_unavailable, waiting_query
from tiergate_operator.cache import ChildCache
from tiergate_operator.config import OperatorConfig
from tiergate_operator.reconcile import PolicyMemory, reconcile
from tiergate_operator.status import KEDA_NOT_INSTALLED, components, refused_status
from tiergate_operator.watches import WATCHED_KINDS

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"
AUTOSCALING_SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy_autoscaling.yaml"
PROM = "http://prometheus.monitoring.svc:9090"


def doc_with(large: dict[str, Any] | None = None, small: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sample with autoscaling blocks on its tiers (small: min 2 max 6, large: min 1 max 2)."""
    doc: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update({"namespace": "team-a", "uid": "uid-123", "generation": 4})
    if small is not None:
        doc["spec"]["tiers"][0]["autoscaling"] = small
    if large is not None:
        doc["spec"]["tiers"][1]["autoscaling"] = large
    return doc


def policy_with(large: dict[str, Any] | None = None, small: dict[str, Any] | None = None) -> RoutingPolicy:
    return parse_policy(doc_with(large, small))


HPA = {"mode": "HPA", "targets": {"routerDemandPerReplica": 4, "vllmWaitingPerReplica": 5}}
KEDA = {"mode": "KEDA", "targets": {"routerDemandPerReplica": 3}, "prometheusServerAddress": PROM}


# --- the typed model ----------------------------------------------------------------------------------------------


def refusal(doc: dict[str, Any]) -> PolicyValidationError:
    with pytest.raises(PolicyValidationError) as e:
        parse_policy(doc)
    return e.value


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node: Any = doc
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node[p]
    node[parts[-1]] = value
    return doc


BAD = [
    # (mutation path under spec.tiers.1, value, field in the error, words of the message)
    ("autoscaling.targets.routerDemandPerReplica", 0, "autoscaling.targets.routerDemandPerReplica", "greater than"),
    ("autoscaling.targets.vllmWaitingPerReplica", 0, "autoscaling.targets.vllmWaitingPerReplica", "greater than"),
    ("autoscaling.targets.routerDemandPerReplica", 1.5, "autoscaling.targets.routerDemandPerReplica", "integer"),
    ("autoscaling.targets", {}, "autoscaling.targets", "routerDemandPerReplica or vllmWaitingPerReplica"),
    ("autoscaling.mode", "Keda", "autoscaling.mode", "'HPA', 'KEDA' or 'External'"),
    ("autoscaling.prometheusServerAddress", PROM, "autoscaling.prometheusServerAddress", "required with mode KEDA"),
    ("autoscaling.pollingIntervalSeconds", 5, "autoscaling.pollingIntervalSeconds", "only used with mode KEDA"),
    ("replicas.min", 0, "replicas.min", "KEDA to scale an idle tier to zero"),
    ("replicas.max", None, "replicas.max", "needs replicas.max"),
    ("replicas.min", 3, "replicas", "must not exceed replicas.max"),
    ("replicas.managedBy", "Autoscaler", "replicas.managedBy", "autoscaling.mode External"),
]


@pytest.mark.parametrize(("path", "value", "where", "words"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_autoscaling_is_refused_naming_the_field(path: str, value: Any, where: str, words: str) -> None:
    doc = doc_with(copy.deepcopy(HPA))
    large = doc["spec"]["tiers"][1]
    if value is None:
        parent, _, leaf = path.rpartition(".")
        (large[parent] if parent else large).pop(leaf)
    else:
        _set(large, path, value)
    err = refusal(doc)
    assert f"spec.tiers[1].{where}" in err.paths, err.paths
    assert words in str(err), str(err)


def test_keda_and_external_rules() -> None:
    # KEDA needs the Prometheus its triggers query.
    no_address = {k: v for k, v in KEDA.items() if k != "prometheusServerAddress"}
    err = refusal(doc_with(no_address))
    assert "spec.tiers[1].autoscaling.prometheusServerAddress" in err.paths
    # KEDA at zero woken by vLLM's own metric only would never wake: refused, naming the target it needs.
    doc = doc_with({"mode": "KEDA", "targets": {"vllmWaitingPerReplica": 5}, "prometheusServerAddress": PROM})
    doc["spec"]["tiers"][1]["replicas"]["min"] = 0
    err = refusal(doc)
    assert "spec.tiers[1].autoscaling.targets" in err.paths
    assert "routerDemandPerReplica" in str(err)
    # External takes nothing the operator would not act on.
    err = refusal(doc_with({"mode": "External", "targets": {"routerDemandPerReplica": 1}}))
    assert "mode External takes no targets" in str(err)
    # An external endpoint tier deploys nothing to scale.
    doc = doc_with()
    external = {"endpoint": {"url": "https://api.example.com/v1"}, "autoscaling": {"mode": "External"}}
    doc["spec"]["tiers"][1].update(external)
    err = refusal(doc)
    assert "spec.tiers[1].autoscaling" in err.paths
    assert "endpoint" in str(err)


def test_valid_forms_load() -> None:
    p = policy_with(HPA, small={"mode": "External"})
    assert p.spec.tiers[1].autoscaled
    assert p.spec.tiers[0].autoscaled
    # KEDA may scale to zero when the router's demand can wake the tier.
    doc = doc_with(copy.deepcopy(KEDA))
    doc["spec"]["tiers"][1]["replicas"]["min"] = 0
    assert parse_policy(doc).spec.tiers[1].replicas.min == 0
    # External keeps min 0 (someone else scales it) and needs no max.
    doc = doc_with({"mode": "External"})
    doc["spec"]["tiers"][1]["replicas"] = {"min": 0}
    assert parse_policy(doc).spec.tiers[1].autoscaling is not None


def test_autoscaling_sample_loads() -> None:
    p = load_policy(AUTOSCALING_SAMPLE)
    modes = {t.name: (t.autoscaling.mode.value if t.autoscaling else None) for t in p.spec.tiers}
    assert modes == {"small": "HPA", "large": "HPA"}


# --- builders -----------------------------------------------------------------------------------------------------


def test_hpa_has_the_bounds_metrics_and_behaviour() -> None:
    p = policy_with({**HPA, "behavior": {"scaleUpStabilizationSeconds": 15, "scaleDownStabilizationSeconds": 120}})
    objs = b.build_children(p)
    (hpa,) = [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["metadata"]["name"] == "chat-tier-large"
    assert hpa["metadata"]["ownerReferences"][0]["uid"] == "uid-123"
    assert hpa["metadata"]["labels"][naming.POLICY_LABEL] == "chat"
    assert hpa["metadata"]["labels"][naming.TIER_LABEL] == "large"
    assert hpa["spec"] == {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat-tier-large"},
        "minReplicas": 1,
        "maxReplicas": 2,
        "metrics": [
            {
                "type": "External",
                "external": {
                    "metric": {
                        "name": "tiergate_router_tier_demand",
                        "selector": {"matchLabels": {"routingpolicy": "chat", "tier": "large"}},
                    },
                    "target": {"type": "AverageValue", "averageValue": "4"},
                },
            },
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": "vllm_num_requests_waiting"},
                    "target": {"type": "AverageValue", "averageValue": "5"},
                },
            },
        ],
        "behavior": {"scaleUp": {"stabilizationWindowSeconds": 15}, "scaleDown": {"stabilizationWindowSeconds": 120}},
    }
    # The autoscaler owns the count: the Deployment's apply leaves replicas out; the other tier keeps min.
    deps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    assert "replicas" not in deps["chat-tier-large"]["spec"]
    assert deps["chat-tier-small"]["spec"]["replicas"] == 2
    # Applied after the Deployment it scales.
    kinds = [o["kind"] for o in objs]
    assert kinds.index("HorizontalPodAutoscaler") > max(i for i, k in enumerate(kinds) if k == "Deployment")


def test_only_one_target_gives_one_metric_and_default_behaviour() -> None:
    p = policy_with({"mode": "HPA", "targets": {"vllmWaitingPerReplica": 7}})
    (hpa,) = [o for o in b.build_children(p) if o["kind"] == "HorizontalPodAutoscaler"]
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]
    assert hpa["spec"]["behavior"]["scaleDown"] == {"stabilizationWindowSeconds": 300}
    assert hpa["spec"]["behavior"]["scaleUp"] == {"stabilizationWindowSeconds": 0}


def test_external_mode_builds_nothing_and_leaves_replicas_alone() -> None:
    p = policy_with({"mode": "External"})
    objs = b.build_children(p)
    assert not [o for o in objs if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    (dep,) = [o for o in objs if o["metadata"]["name"] == "chat-tier-large" and o["kind"] == "Deployment"]
    assert "replicas" not in dep["spec"]
    by_tier = {c.tier: c.desired for c in components(p) if c.tier}
    assert by_tier == {"small": 2, "large": None}  # None: read from the Deployment


def test_scaled_object_queries_the_same_metrics() -> None:
    doc = doc_with(copy.deepcopy(KEDA) | {"targets": {"routerDemandPerReplica": 3, "vllmWaitingPerReplica": 5}})
    doc["spec"]["tiers"][1]["replicas"]["min"] = 0
    p = parse_policy(doc)
    (so,) = [o for o in b.build_children(p) if o["kind"] == "ScaledObject"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["metadata"]["name"] == "chat-tier-large"
    # KEDA's own HPA gets none of our labels: it is KEDA's, not a child our watches should take for the policy's.
    excluded = so["metadata"]["annotations"]["scaledobject.keda.sh/hpa-excluded-labels"].split(",")
    assert set(excluded) == set(so["metadata"]["labels"])
    assert naming.POLICY_LABEL in excluded
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat-tier-large"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 2)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": 300
    }
    # The last replica goes after the same window (KEDA's cooldown); the poll is KEDA's default unless set.
    assert spec["cooldownPeriod"] == 300
    assert "pollingInterval" not in spec
    demand, waiting = spec["triggers"]
    assert demand["type"] == waiting["type"] == "prometheus"
    assert demand["metricType"] == "AverageValue"
    assert demand["metadata"]["serverAddress"] == PROM
    assert demand["metadata"]["threshold"] == "3"
    assert waiting["metadata"]["threshold"] == "5"
    assert demand["metadata"]["query"] == (
        'sum(tiergate_router_tier_demand{namespace="team-a",routingpolicy="chat",tier="large"})'
    )
    assert waiting["metadata"]["query"] == (
        'sum({__name__="vllm:num_requests_waiting",namespace="team-a",pod=~"chat-tier-large-[a-z0-9]+-[a-z0-9]+"})'
    )
    assert all(isinstance(v, str) for t in spec["triggers"] for v in t["metadata"].values())
    assert demand_query(p, p.spec.tier("large")) in demand["metadata"]["query"]
    assert waiting_query(p, p.spec.tier("small")) != waiting_query(p, p.spec.tier("large"))


def test_keda_poll_and_cooldown_come_from_the_policy() -> None:
    keda = copy.deepcopy(KEDA) | {"pollingIntervalSeconds": 2, "behavior": {"scaleDownStabilizationSeconds": 45}}
    doc = doc_with(keda)
    doc["spec"]["tiers"][1]["replicas"]["min"] = 0
    (so,) = [o for o in b.build_children(parse_policy(doc)) if o["kind"] == "ScaledObject"]
    assert so["spec"]["pollingInterval"] == 2
    assert so["spec"]["cooldownPeriod"] == 45
    hpa_behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert hpa_behavior["scaleDown"] == {"stabilizationWindowSeconds": 45}
    for bad in (0, 3601, "5"):
        err = refusal(_set(copy.deepcopy(doc), "spec.tiers.1.autoscaling.pollingIntervalSeconds", bad))
        assert "spec.tiers[1].autoscaling.pollingIntervalSeconds" in err.paths, (bad, err.paths)


def test_switching_mode_changes_the_child_kind() -> None:
    """HPA -> none: the HPA is no longer wanted, so reconcile's pruning deletes it (it is in KIND_ORDER)."""
    with_hpa = {b.child_key(o) for o in b.build_children(policy_with(HPA))}
    without = {b.child_key(o) for o in b.build_children(policy_with())}
    assert with_hpa - without == {("HorizontalPodAutoscaler", "chat-tier-large")}
    assert "HorizontalPodAutoscaler" in b.KIND_ORDER
    assert "ScaledObject" in b.KIND_ORDER
    assert "ScaledObject" in watches.OPTIONAL_KINDS


# --- KEDA not installed -------------------------------------------------------------------------------------------


def test_keda_policy_is_refused_while_scaled_objects_cannot_be_listed() -> None:
    p = policy_with(KEDA)
    assert keda_unavailable(p, None) is None  # KEDA installed
    assert keda_unavailable(policy_with(HPA), "list ScaledObject: 404") is None  # nobody asked for it
    problem = keda_unavailable(p, "list ScaledObject: 404 NotFound")
    assert problem is not None
    assert problem.reason == KEDA_NOT_INSTALLED == "KedaNotInstalled"
    assert problem.field == "spec.tiers[1].autoscaling.mode"
    assert "404 NotFound" in problem.message
    assert "install KEDA" in problem.message
    st = refused_status({}, problem, 4)
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "KedaNotInstalled"
    assert "spec.tiers[1].autoscaling.mode" in ready["message"]
    assert "nothing applied" in ready["message"]


class _FakeKube:
    """Answers the ScaledObject list with 404 until `installed` is set, then with an empty list and no watch."""

    def __init__(self) -> None:
        self.installed = threading.Event()
        self.lists = 0

    def request(self, method: str, path: str, **_: Any) -> tuple[int, dict[str, Any]]:
        self.lists += 1
        if not self.installed.is_set():
            return 404, {"reason": "NotFound", "message": "the server could not find the requested resource"}
        return 200, {"items": [], "metadata": {"resourceVersion": "7"}}

    def stream_lines(self, *_: Any, **__: Any) -> Any:
        raise RuntimeError("watch ended")


def test_absent_kind_counts_as_synced_and_is_noticed_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watches, "_ABSENT_RECHECK_SECONDS", 0.01)
    monkeypatch.setattr(watches, "_RETRY_SECONDS", 0.01)
    cache = ChildCache(["ScaledObject"])
    kube = _FakeKube()
    stop = threading.Event()
    listed: list[int] = []

    def on_list(items: list[dict[str, Any]]) -> None:
        cache.replace("ScaledObject", items)
        listed.append(len(items))

    t = threading.Thread(
        target=watches.list_and_watch,
        args=(kube, "ScaledObject", "/apis/keda.sh/v1alpha1/scaledobjects", {}, stop),
        kwargs={
            "on_list": on_list,
            "on_event": lambda *_: None,
            "on_absent": lambda why: cache.mark_absent("ScaledObject", why),
        },
        daemon=True,
    )
    t.start()
    try:
        assert cache.wait_synced(5)  # a 404 does not hold up the operator's start
        why = cache.absent("ScaledObject")
        assert why is not None
        assert "404" in why
        kube.installed.set()
        for _ in range(500):
            if listed:
                break
            stop.wait(0.01)
        assert listed
        assert cache.absent("ScaledObject") is None
    finally:
        stop.set()
        t.join(5)


def test_reconcile_refuses_a_keda_policy_whole_until_keda_is_there() -> None:
    """Nothing half-applied: while ScaledObjects cannot be listed, not even the HPA-less tiers or the router are
    applied; once they can, the ScaledObject goes with the Deployments, after them."""
    kube, cache, mem = FakeKube(), ChildCache(WATCHED_KINDS), PolicyMemory()
    for kind in WATCHED_KINDS:
        cache.replace(kind, [])
    cache.mark_absent("ScaledObject", "list ScaledObject: 404 NotFound")
    doc = body()
    doc["spec"]["tiers"][1]["autoscaling"] = copy.deepcopy(KEDA)
    reconcile(kube, doc, OperatorConfig(), mem, cache)  # type: ignore[arg-type]
    assert kube.applied == []
    conds = conditions(kube.statuses[-1])
    assert conds["Degraded"]["reason"] == KEDA_NOT_INSTALLED
    assert "spec.tiers[1].autoscaling.mode" in conds["Ready"]["message"]

    cache.replace("ScaledObject", [])  # KEDA installed: the watch lists them
    reconcile(kube, doc, OperatorConfig(), mem, cache)  # type: ignore[arg-type]
    assert mem.refused is None
    assert ("ScaledObject", "chat-tier-large") in kube.applied
    assert kube.applied.index(("ScaledObject", "chat-tier-large")) > kube.applied.index(
        ("Deployment", "chat-tier-large")
    )
    assert conditions(kube.statuses[-1])["Degraded"]["reason"] != KEDA_NOT_INSTALLED
