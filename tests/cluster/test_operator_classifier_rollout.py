"""Classifier changes take effect, on the real control plane: a new artifact in the policy's classifier ConfigMap
rolls the router onto a checked copy of it, and a broken one is refused (Degraded, a Warning Event naming the
ConfigMap and key) while the last good copy keeps being mounted. The router pods are kwok's (no container runs),
so a real `tiergate serve` on each copy's content shows which classifier a rolled router serves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.operator_cluster import (
    SAMPLE,
    Operator,
    classifier_configmap,
    condition,
    get_json,
    install_crd,
    operator_running,
    policy,
    small_artifact,
    wait_ready,
)
from tiergate.devcluster.cluster import DevCluster, wait_for

pytestmark = pytest.mark.cluster

ROUTER_SELECTOR = "tiergate.io/policy=chat,app.kubernetes.io/component=router"
DIGEST = "tiergate.io/router-inputs-digest"


@pytest.fixture
def operator(cluster: DevCluster, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    install_crd(cluster)
    yield from operator_running(Operator(cluster, tmp_path, "--namespace", namespace))


def _digest(cluster: DevCluster, ns: str) -> str:
    d = get_json(cluster, "deployment", "chat-router", "-n", ns)
    return str(d["spec"]["template"]["metadata"]["annotations"][DIGEST])


def _copy(cluster: DevCluster, ns: str) -> dict[str, Any]:
    cm: dict[str, Any] = get_json(cluster, "configmap", "chat-router-classifier", "-n", ns)
    return cm


def _replicasets(cluster: DevCluster, ns: str) -> set[str]:
    return {rs["metadata"]["name"] for rs in get_json(cluster, "rs", "-n", ns, "-l", ROUTER_SELECTOR)["items"]}


def _sha(text: str) -> str:
    return str(json.loads(text)["sha256"])


def _serve_reports(artifact: Path, port: int) -> str:
    """`tiergate serve` on an artifact (two tiers that are never called): the sha256 its classifier metric says."""
    flags = ["--router", str(artifact), "--port", str(port), "--grpc-port", "-1"]
    tiers = ["--tier", "small=http://127.0.0.1:9/v1", "--tier", "large=http://127.0.0.1:9/v1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiergate.cli", "serve", *flags, *tiers],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        text=True,
    )

    def info() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                text = r.read().decode()
        except (urllib.error.URLError, OSError):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            return None
        return next((ln for ln in text.splitlines() if ln.startswith("tiergate_router_classifier_info{")), None)

    try:
        line = wait_for(f"tiergate serve on {artifact} to report its classifier", info, timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    return line.split('sha256="', 1)[1].split('"', 1)[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_new_artifact_rolls_the_router_and_a_broken_one_is_refused(
    cluster: DevCluster, namespace: str, operator: Operator, tmp_path: Path
) -> None:
    ns = namespace
    first, second = small_artifact(-3.0), small_artifact(3.0)
    classifier_configmap(cluster, ns, artifact=first)
    cluster.kubectl("apply", "-n", ns, "-f", str(SAMPLE))
    wait_ready(cluster, ns, "chat")
    copy = _copy(cluster, ns)
    assert copy["data"] == {"artifact.json": first}
    assert copy["metadata"]["annotations"]["tiergate.io/classifier-sha256"] == _sha(first)
    digest_1, sets_1 = _digest(cluster, ns), _replicasets(cluster, ns)
    assert len(sets_1) == 1
    (tmp_path / "first.json").write_text(copy["data"]["artifact.json"])

    # A new artifact in the user's ConfigMap: copied, and the router rolls (a new ReplicaSet).
    classifier_configmap(cluster, ns, artifact=second)
    wait_for(
        "the copy to hold the new artifact",
        lambda: _copy(cluster, ns)["data"]["artifact.json"] == second,
        timeout=60,
    )
    digest_2 = wait_for("the router's digest to move", lambda: (d := _digest(cluster, ns)) != digest_1 and d, 60)
    sets_2 = wait_for("a new router ReplicaSet", lambda: (s := _replicasets(cluster, ns)) - sets_1 and s, 60)
    assert len(sets_2) == 2
    p = wait_ready(cluster, ns, "chat")
    assert p["metadata"]["generation"] == 1  # the policy never changed: its classifier's content did
    (tmp_path / "second.json").write_text(_copy(cluster, ns)["data"]["artifact.json"])

    # A broken artifact: refused, the last good copy and the digest stay, and the policy says why.
    classifier_configmap(cluster, ns, artifact=second[: len(second) // 2])

    def degraded() -> dict[str, Any] | None:
        c = condition(policy(cluster, ns, "chat"), "Degraded")
        return c if c.get("status") == "True" else None

    cond = wait_for("Degraded", degraded, timeout=60)
    assert cond["reason"] == "ClassifierInvalid"
    assert f"ConfigMap {ns}/chat-router-artifact key router.json: not JSON" in cond["message"]
    assert f"the router keeps the last good one (sha256 {_sha(second)[:12]})" in cond["message"]
    assert condition(policy(cluster, ns, "chat"), "Ready")["reason"] == "ClassifierInvalid"
    events = get_json(cluster, "events", "-n", ns, "--field-selector", "involvedObject.name=chat")["items"]
    warnings = [e for e in events if e["reason"] == "ClassifierInvalid"]
    assert warnings
    assert warnings[0]["type"] == "Warning"
    assert "chat-router-artifact key router.json" in warnings[0]["message"]
    assert _copy(cluster, ns)["data"]["artifact.json"] == second
    assert _digest(cluster, ns) == digest_2
    assert _replicasets(cluster, ns) == sets_2

    # Gone altogether: still the last good one, now ClassifierMissing; then mended: Ready again, no new rollout.
    cluster.kubectl("delete", "configmap", "chat-router-artifact", "-n", ns)
    wait_for(
        "ClassifierMissing",
        lambda: condition(policy(cluster, ns, "chat"), "Degraded").get("reason") == "ClassifierMissing",
        timeout=60,
    )
    assert _digest(cluster, ns) == digest_2
    classifier_configmap(cluster, ns, artifact=second)
    wait_ready(cluster, ns, "chat")
    assert condition(policy(cluster, ns, "chat"), "Degraded")["status"] == "False"
    # Ready comes from the reconcile that read the mended ConfigMap, after it applied whatever it would apply.
    assert _digest(cluster, ns) == digest_2
    assert _replicasets(cluster, ns) == sets_2

    # What the rolled router serves: a real `tiergate serve` on each copy says which classifier it loaded.
    assert _serve_reports(tmp_path / "first.json", _free_port()) == _sha(first)
    assert _serve_reports(tmp_path / "second.json", _free_port()) == _sha(second)


def test_a_canary_artifact_in_a_configmap_is_checked_copied_and_mounted(
    cluster: DevCluster, namespace: str, operator: Operator
) -> None:
    """spec.router.canary.classifier.configMap: the API server accepts it, the operator refuses the generation
    naming the field until the ConfigMap holds a good artifact, then copies it, mounts the copy where the router
    reads it, and rolls the router when the canary artifact changes."""
    ns = namespace
    field = "spec.router.canary.classifier.configMap"
    classifier_configmap(cluster, ns, artifact=small_artifact(-3.0))
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["spec"]["router"]["canary"] = {
        "classifier": {"configMap": {"name": "chat-canary-artifact", "key": "router.json"}},
        "shareBasisPoints": 2000,
    }
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))

    def degraded_reason() -> str | None:
        c = condition(policy(cluster, ns, "chat"), "Degraded")
        return str(c["reason"]) if c.get("status") == "True" and field in c.get("message", "") else None

    assert wait_for("MissingReference naming the canary field", degraded_reason, timeout=60) == "MissingReference"
    assert get_json(cluster, "deployment", "-n", ns, "-l", ROUTER_SELECTOR)["items"] == []

    first, second = small_artifact(1.0), small_artifact(2.0)
    classifier_configmap(cluster, ns, name="chat-canary-artifact", artifact=first)
    wait_ready(cluster, ns, "chat")
    copy = get_json(cluster, "configmap", "chat-router-canary-classifier", "-n", ns)
    assert copy["data"] == {"artifact.json": first}
    pod = get_json(cluster, "deployment", "chat-router", "-n", ns)["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "canary-classifier"]
    assert vol["configMap"]["name"] == "chat-router-canary-classifier"
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "canary-classifier"]
    assert mount["mountPath"] == "/etc/tiergate/canary"
    before = _digest(cluster, ns)

    classifier_configmap(cluster, ns, name="chat-canary-artifact", artifact=second)
    wait_for("the router's digest to move", lambda: _digest(cluster, ns) != before, timeout=60)
    assert get_json(cluster, "configmap", "chat-router-canary-classifier", "-n", ns)["data"] == {
        "artifact.json": second
    }
