"""The operator against the real control plane: the sample comes up on the right pools, updates roll, removed
tiers go, deleted policies are garbage-collected, deleted children come back, status tells the truth."""

from __future__ import annotations

import copy
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.operator_cluster import (
    SAMPLE,
    SAMPLE_CHILDREN,
    Operator,
    apply_policy,
    child_keys,
    children,
    classifier_configmap,
    condition,
    get_json,
    install_crd,
    kubectl_raw,
    operator_running,
    policy,
    sample_doc,
    wait_for,
    wait_ready,
)
from tiergate.devcluster.cluster import DevCluster

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def crd(cluster: DevCluster) -> None:
    install_crd(cluster)


@pytest.fixture
def operator(
    cluster: DevCluster, crd: None, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Operator]:
    # Extra environment by indirect parametrisation, e.g. a resync too long to matter within a test.
    env: dict[str, str] = getattr(request, "param", {})
    yield from operator_running(Operator(cluster, tmp_path, "--namespace", namespace, env=env))


def _pool_of_pods(cluster: DevCluster, ns: str, selector: str) -> list[str]:
    pods = get_json(cluster, "pods", "-n", ns, "-l", selector)["items"]
    pools = []
    for p in pods:
        node = p["spec"].get("nodeName")
        assert node, f"pod {p['metadata']['name']} not scheduled: {p['status']}"
        labels = get_json(cluster, "node", node)["metadata"]["labels"]
        pools.append(labels["tiergate.io/pool"])
    return pools


def test_sample_policy_comes_up_on_the_right_pools(cluster: DevCluster, namespace: str, operator: Operator) -> None:
    classifier_configmap(cluster, namespace)
    cluster.kubectl("apply", "-n", namespace, "-f", str(SAMPLE))
    p = wait_ready(cluster, namespace, "chat")
    assert p["status"]["observedGeneration"] == p["metadata"]["generation"] == 1
    assert p["status"]["readyTiers"] == "2/2"
    assert p["status"]["routerEndpoint"] == f"http://chat-router.{namespace}.svc:8080/v1"
    assert [(t["name"], t["readyReplicas"]) for t in p["status"]["tiers"]] == [("small", 2), ("large", 1)]

    items = children(cluster, namespace, "chat")
    assert len(items) == SAMPLE_CHILDREN, sorted(child_keys(items))
    for obj in items:
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["uid"] == p["metadata"]["uid"]
        assert ref["controller"] is True
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tiergate-operator"

    expected = {
        "tiergate.io/tier=small": ("gpu-small", 2),
        "tiergate.io/tier=large": ("gpu-large", 1),
        "app.kubernetes.io/component=router": ("cpu", 2),
        "app.kubernetes.io/component=reward-model": ("reward", 1),
    }
    for selector, (pool, count) in expected.items():
        pools = _pool_of_pods(cluster, namespace, f"tiergate.io/policy=chat,{selector}")
        assert pools == [pool] * count, f"{selector}: {pools}"

    table = cluster.kubectl("get", "rp", "-n", namespace)
    assert "small,large" in table
    assert "True" in table
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=chat")
    assert "Created" in events
    assert "Ready" in events


def _deployment(cluster: DevCluster, ns: str, name: str) -> dict[str, Any]:
    d: dict[str, Any] = get_json(cluster, "deployment", name, "-n", ns)
    return d


def test_update_rolls_then_tier_removal_then_deletion(cluster: DevCluster, namespace: str, operator: Operator) -> None:
    classifier_configmap(cluster, namespace)
    doc = sample_doc()
    apply_policy(cluster, namespace, doc)
    wait_ready(cluster, namespace, "chat")
    before = _deployment(cluster, namespace, "chat-tier-small")
    large_before = _deployment(cluster, namespace, "chat-tier-large")

    # 1. A new model and extra args for the small tier: its Deployment rolls (new ReplicaSet), nothing else does.
    doc2 = copy.deepcopy(doc)
    doc2["spec"]["tiers"][0]["model"] = "Qwen/Qwen3-8B"
    doc2["spec"]["tiers"][0]["engine"]["args"].append("--enable-prefix-caching")
    # A new field the router reads (spec.tiers[].modalities) reaches it through the policy document, defaults filled.
    doc2["spec"]["tiers"][0]["modalities"] = ["text", "image"]
    apply_policy(cluster, namespace, doc2)
    p = wait_ready(cluster, namespace, "chat")
    assert p["metadata"]["generation"] == 2
    after = _deployment(cluster, namespace, "chat-tier-small")
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    args = after["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["--model", "Qwen/Qwen3-8B"]
    assert "--enable-prefix-caching" in args
    rs = get_json(cluster, "replicasets", "-n", namespace, "-l", "tiergate.io/tier=small")["items"]
    assert len(rs) == 2, "a rollout makes a second ReplicaSet"
    new_rs = max(rs, key=lambda r: int(r["metadata"]["annotations"]["deployment.kubernetes.io/revision"]))
    assert new_rs["status"].get("readyReplicas") == 2
    assert (
        _deployment(cluster, namespace, "chat-tier-large")["metadata"]["generation"]
        == large_before["metadata"]["generation"]
    )
    cm = get_json(cluster, "configmap", "chat-router", "-n", namespace)
    assert "Qwen/Qwen3-8B" in cm["data"]["policy.yaml"]
    mounted = yaml.safe_load(cm["data"]["policy.yaml"])["spec"]["tiers"]
    assert {t["name"]: t["modalities"] for t in mounted} == {"small": ["text", "image"], "large": ["text"]}

    # 2. Remove the large tier (and what referred to it): its Deployment, Service and PDB go, the rest stays.
    doc3 = copy.deepcopy(doc2)
    doc3["spec"]["tiers"] = [t for t in doc3["spec"]["tiers"] if t["name"] != "large"]
    doc3["spec"]["router"]["fallbackOrder"] = ["small"]
    apply_policy(cluster, namespace, doc3)
    wait_for(
        "large tier's children deleted",
        lambda: not any("chat-tier-large" in n for _, n in child_keys(children(cluster, namespace, "chat"))),
        timeout=60,
    )
    p = wait_ready(cluster, namespace, "chat")
    assert p["status"]["readyTiers"] == "1/1"
    assert len(children(cluster, namespace, "chat")) == SAMPLE_CHILDREN - 3
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=chat")
    assert "Deleted" in events

    # 3. Delete the policy: garbage collection removes every child (and their pods).
    cluster.kubectl("delete", "routingpolicy", "chat", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for("all children garbage-collected", lambda: children(cluster, namespace, "chat") == [], timeout=90)
    wait_for(
        "all pods gone",
        lambda: get_json(cluster, "pods", "-n", namespace, "-l", "tiergate.io/policy=chat")["items"] == [],
        timeout=90,
    )


# The periodic resync is pushed out of reach: everything below comes back through the watches, or not at all, so
# the waits need no tight bound to tell the two apart.
@pytest.mark.parametrize("operator", [{"TIERGATE_OPERATOR_RESYNC_SECONDS": "3600"}], indirect=True)
def test_deleted_and_edited_children_are_restored(cluster: DevCluster, namespace: str, operator: Operator) -> None:
    classifier_configmap(cluster, namespace)
    cluster.kubectl("apply", "-n", namespace, "-f", str(SAMPLE))
    wait_ready(cluster, namespace, "chat")
    original = {
        k: o["metadata"]["uid"]
        for o in children(cluster, namespace, "chat")
        for k in [(o["kind"], o["metadata"]["name"])]
    }

    for kind, name in [("deployment", "chat-tier-small"), ("service", "chat-router"), ("configmap", "chat-router")]:
        cluster.kubectl("delete", kind, name, "-n", namespace, "--wait=true")

    def restored() -> bool:
        now = {(o["kind"], o["metadata"]["name"]): o["metadata"]["uid"] for o in children(cluster, namespace, "chat")}
        return (
            set(now) == set(original)
            and now[("Deployment", "chat-tier-small")] != original[("Deployment", "chat-tier-small")]
            and now[("Service", "chat-router")] != original[("Service", "chat-router")]
            and now[("ConfigMap", "chat-router")] != original[("ConfigMap", "chat-router")]
        )

    wait_for("deleted children restored", restored, timeout=60)
    wait_ready(cluster, namespace, "chat")

    # A hand edit of a field the operator owns is reverted.
    cluster.kubectl("scale", "deployment", "chat-tier-large", "-n", namespace, "--replicas=3")
    wait_for(
        "hand-scaled tier back to its policy's replicas",
        lambda: _deployment(cluster, namespace, "chat-tier-large")["spec"]["replicas"] == 1,
        timeout=60,
    )

    # Edits that move no generation (a label the operator sets, on a PDB) and children of the kinds that were once
    # left to the resync (a RoleBinding) come back through the watches too (the resync is an hour away).
    binding_uid = get_json(cluster, "rolebinding", "chat-router", "-n", namespace)["metadata"]["uid"]
    cluster.kubectl(
        "label", "pdb", "chat-router", "-n", namespace, "app.kubernetes.io/part-of=someone-else", "--overwrite"
    )
    cluster.kubectl("delete", "rolebinding", "chat-router", "-n", namespace, "--wait=true")

    def metadata_restored() -> bool:
        pdb = get_json(cluster, "pdb", "chat-router", "-n", namespace)
        r = kubectl_raw(cluster, "get", "rolebinding", "chat-router", "-n", namespace, "-o", "json")
        return (
            pdb["metadata"]["labels"].get("app.kubernetes.io/part-of") == "tiergate"
            and r.returncode == 0
            and json.loads(r.stdout)["metadata"]["uid"] != binding_uid
        )

    wait_for("PDB label and RoleBinding restored", metadata_restored, timeout=120)


def test_unschedulable_tier_is_degraded(cluster: DevCluster, namespace: str, operator: Operator) -> None:
    classifier_configmap(cluster, namespace)
    doc = sample_doc()
    doc["spec"]["tiers"][1]["resources"]["gpus"] = 16  # the biggest node has 8
    apply_policy(cluster, namespace, doc)

    def degraded() -> dict[str, Any] | None:
        # The large tier's own verdict: the reward model can be briefly Unschedulable too, while the previous
        # test's reward pod (the reward pool has one GPU) is still being deleted.
        c = condition(policy(cluster, namespace, "chat"), "Degraded")
        return c if c.get("status") == "True" and "tier large" in c.get("message", "") else None

    c = wait_for("Degraded=True", degraded, timeout=90)
    assert c["reason"] == "Unschedulable"
    assert "tier large" in c["message"]
    assert "Insufficient nvidia.com/gpu" in c["message"], c["message"]
    # The small tier's pods may still be starting when the large one is found stuck: wait for them, while the
    # large tier stays Degraded.
    p = wait_for(
        "the small tier ready beside the stuck one",
        lambda: (q := policy(cluster, namespace, "chat")) and q["status"].get("readyTiers") == "1/2" and q,
        timeout=60,
    )
    ready = condition(p, "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "Unschedulable"
    assert condition(p, "Degraded")["status"] == "True"
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=chat")
    assert "Unschedulable" in events

    # Fix the spec: Degraded clears and the policy becomes Ready.
    doc["spec"]["tiers"][1]["resources"]["gpus"] = 4
    apply_policy(cluster, namespace, doc)
    p = wait_ready(cluster, namespace, "chat")
    assert condition(p, "Degraded")["status"] == "False"


@pytest.mark.parametrize("operator", [{"TIERGATE_OPERATOR_EXTERNAL_CHECK_SECONDS": "1"}], indirect=True)
def test_external_tier_deploys_nothing_and_counts_ready_by_a_real_check(
    cluster: DevCluster, namespace: str, operator: Operator
) -> None:
    """An external tier is ready in status when its endpoint answers `GET /models` (a server on loopback, which the
    operator, a process on this host, reaches), and Degraded, naming the tier and the error, when it stops."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        classifier_configmap(cluster, namespace)
        doc = sample_doc()
        # The strongest tier served elsewhere (the sample's classifier is two-tier: two tiers).
        doc["spec"]["tiers"][1] = {
            "name": "large",
            "model": "gpt-5",
            "endpoint": {"url": url},
            "price": {"inputPerMillion": "1.25", "outputPerMillion": 10},
        }
        apply_policy(cluster, namespace, doc)
        p = wait_ready(cluster, namespace, "chat")
        assert p["status"]["readyTiers"] == "2/2"
        large = p["status"]["tiers"][1]
        assert (large["reachable"], large["message"]) == (True, f"GET {url}/models: HTTP 200")
        assert not any("large" in n for _, n in child_keys(children(cluster, namespace, "chat")))
        r = kubectl_raw(cluster, "get", "rp", "chat", "-n", namespace, "-o", "jsonpath={.spec.tiers[1].price}")
        assert json.loads(r.stdout) == {"inputPerMillion": "1.25", "outputPerMillion": 10}
    finally:
        server.shutdown()
        server.server_close()

    def unreachable() -> dict[str, Any] | None:
        c = condition(policy(cluster, namespace, "chat"), "Degraded")
        return c if c.get("status") == "True" else None

    c = wait_for("Degraded for the external tier", unreachable, timeout=60)
    assert c["reason"] == "ExternalTierUnreachable"
    assert f"tier large (external): unreachable: GET {url}/models: " in c["message"], c["message"]
    p = policy(cluster, namespace, "chat")
    assert p is not None
    assert p["status"]["readyTiers"] == "1/2"
    assert p["status"]["tiers"][1]["reachable"] is False


class _Models(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server's model list, all an external tier's check asks for."""

    def do_GET(self) -> None:
        body = b'{"object": "list", "data": [{"id": "gpt-5", "object": "model"}]}'
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_all_namespaces_by_default(cluster: DevCluster, crd: None, namespace: str, tmp_path: Path) -> None:
    """`tiergate operator` with no flags watches every namespace (the form scripts and the chart rely on)."""
    op = Operator(cluster, tmp_path).start()
    try:
        classifier_configmap(cluster, namespace)
        cluster.kubectl("apply", "-n", namespace, "-f", str(SAMPLE))
        p = wait_ready(cluster, namespace, "chat")
        assert p["status"]["routerEndpoint"] == f"http://chat-router.{namespace}.svc:8080/v1"
        assert "watching all namespaces" in op.full_log()
    finally:
        assert op.stop() == 0, op.log()
