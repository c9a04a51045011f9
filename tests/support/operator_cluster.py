"""Helpers for the operator's cluster tests: the CRD, an operator subprocess, and waiting on real state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tiergate.devcluster.cluster import DevCluster, wait_for
from tiergate.devcluster.loop import service_account_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"
CRD = ROOT / "tiergate" / "api" / "crd.yaml"
CHILD_KINDS = "deployments,services,configmaps,serviceaccounts,poddisruptionbudgets,roles,rolebindings"
# test_children_of_sample_are_complete_and_ordered's 16, plus the operator's copy of the classifier artifact.
SAMPLE_CHILDREN = 17


def restrict_namespace(cluster: DevCluster, ns: str) -> str:
    """Label `ns` to enforce the `restricted` Pod Security Standard (latest version); returns `ns`."""
    cluster.kubectl(
        "label",
        "namespace",
        ns,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )
    return ns


def token_kubeconfig(cluster: DevCluster, ns: str, path: Path, account: str = "op") -> Path:
    """A kubeconfig at `path` that authenticates as nothing but the ServiceAccount `account` of `ns` (a bound
    token), its context's namespace `ns` (`tiergate.devcluster.loop.service_account_kubeconfig`)."""
    return service_account_kubeconfig(cluster, ns, account, path)


def install_crd(cluster: DevCluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/routingpolicies.tiergate.io", "--timeout=60s")


def kubectl_raw(cluster: DevCluster, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """kubectl with its exit status and stderr (cluster.kubectl hides stderr when check=False)."""
    return subprocess.run(
        [str(cluster.bin_dir / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )


def get_json(cluster: DevCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json"))


def sample_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    return doc


def apply_policy(cluster: DevCluster, ns: str, doc: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))


def small_artifact(bias: float = 0.0) -> str:
    """A real two-tier router artifact of a few KiB (the shipped default router's encoder, a head that ignores the
    prompt: every score is sigmoid(bias)), as `tiergate train` would write it. Different biases, different
    artifacts (and sha256s); `tiergate serve` loads any of them."""
    import numpy as np

    from tiergate.routing.artifact import EncoderSpec, Layer, Member, RouterArtifact, Tier, dumps
    from tiergate.routing.operating_points import CalibrationTable, ThresholdPoint
    from tiergate_router.artifact_classifier import default_artifact_path

    enc = json.loads(default_artifact_path().read_text())["encoder"]
    layer = Layer(np.zeros((enc["dim"], 1), np.float32), np.array([bias], np.float32), "identity")
    art = RouterArtifact(
        encoder=EncoderSpec(**enc),
        kind="two_tier",
        label_mode="deterministic",
        tiers=[Tier("small", 0.1), Tier("large", 1.0)],
        members=[Member(layers=[layer], output="sigmoid")],
        calibration=CalibrationTable(thresholds=(ThresholdPoint(5000, 0.3, 0.5, 0.0),)),
        provenance={"purpose": f"cluster tests: constant score, bias {bias}"},
    )
    return dumps(art).decode()


def classifier_configmap(
    cluster: DevCluster, ns: str, name: str = "chat-router-artifact", artifact: str | None = None
) -> None:
    """The sample's classifier ConfigMap (what `tiergate train` writes), created as a user would: the operator
    checks it and copies it for the router to mount. `artifact`: the text under `router.json` (default: a small
    real one)."""
    text = small_artifact() if artifact is None else artifact
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"router.json": text}}
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-n", ns, "-f", "-", input=json.dumps(cm))


def policy(cluster: DevCluster, ns: str, name: str) -> dict[str, Any] | None:
    r = kubectl_raw(cluster, "get", "routingpolicy", name, "-n", ns, "-o", "json")
    return json.loads(r.stdout) if r.returncode == 0 else None


def condition(p: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((p or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


def wait_ready(cluster: DevCluster, ns: str, name: str, timeout: float = 90.0) -> dict[str, Any]:
    """Ready=True for the policy's current generation."""

    def ready() -> dict[str, Any] | None:
        p = policy(cluster, ns, name)
        if p is None:
            return None
        gen = p["metadata"]["generation"]
        c = condition(p, "Ready")
        if (
            c.get("status") == "True"
            and c.get("observedGeneration") == gen
            and p["status"].get("observedGeneration") == gen
        ):
            return p
        return None

    result: dict[str, Any] = wait_for(f"RoutingPolicy {ns}/{name} Ready", ready, timeout)
    return result


def children(cluster: DevCluster, ns: str, policy_name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json(cluster, CHILD_KINDS, "-n", ns, "-l", f"tiergate.io/policy={policy_name}")[
        "items"
    ]
    return items


def child_keys(items: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(i["kind"], i["metadata"]["name"]) for i in items}


class Operator:
    """`tiergate operator` as a subprocess, exactly as a user starts it; its log is kept for failure messages."""

    def __init__(self, cluster: DevCluster, log_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.cluster = cluster
        self.args = list(args)
        self.env = env or {}
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    def start(self) -> Operator:
        self.starts += 1
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig), **self.env}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tiergate.cli", "operator", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        return self

    def log(self) -> str:
        """The tail of each run's log: enough for a failure message."""
        return "\n".join(self.full_log(i)[-6000:] for i in range(1, self.starts + 1))

    def full_log(self, start: int = 1) -> str:
        """All of one run's log (the first by default), for checks on the order of what it did."""
        return (self.log_dir / f"operator-{start}.log").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything or release the lease."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: frozen as by a stalled VM or a debugger; sockets stay open, nothing runs."""
        assert self.proc is not None
        assert self.proc.poll() is None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.resume()  # a paused process handles the pending SIGTERM once resumed
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def operator_running(op: Operator) -> Iterator[Operator]:
    """Body of an `operator` fixture (`yield from operator_running(Operator(...))`): starts it, and after the test
    stops it and fails the test if it exited with an error, printing its log either way."""
    yield op.start()
    rc = op.stop()
    print(op.log())
    assert rc in (0, None), f"operator exited {rc}:\n{op.log()}"
