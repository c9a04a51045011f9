"""The Helm chart and the kubebuilder-style manifests: lint, render, and install for real under the restricted
Pod Security Standard."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.support.operator_cluster import ROOT, get_json, install_crd, kubectl_raw, wait_for
from tiergate.devcluster.cluster import DevCluster
from tiergate.devcluster.errors import StartError

pytestmark = pytest.mark.cluster

CHART = ROOT / "charts" / "tiergate"


def _render(cluster: DevCluster, *args: str) -> list[dict[str, Any]]:
    # --kube-version: offline rendering otherwise assumes the Kubernetes version helm was built against.
    out = cluster.helm("template", "tg", str(CHART), "--namespace", "ops", "--kube-version", "1.36.3", *args)
    return [d for d in yaml.safe_load_all(out) if d]


def _one(docs: list[dict[str, Any]], kind: str, name_part: str = "") -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"]]
    return doc


def test_helm_lint_with_every_scenario(cluster: DevCluster) -> None:
    cluster.helm("lint", "--strict", str(CHART))
    for values in sorted((CHART / "ci").glob("*.yaml")):
        cluster.helm("lint", "--strict", str(CHART), "-f", str(values))


def test_default_render_is_ha_and_restricted(cluster: DevCluster) -> None:
    docs = _render(cluster)
    dep = _one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["tiergate", "operator"]
    assert "--leader-elect" in c["args"]
    assert not any(a.startswith("--namespace") for a in c["args"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    labels = dep["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert labels["app.kubernetes.io/part-of"] == "tiergate"
    # The chart's operator ClusterRole and manifests/rbac grant exactly the same rules.
    role = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "tg-tiergate-operator"]
    assert len(role) == 1
    chart_rules = role[0]["rules"]
    manifest_rules = yaml.safe_load((ROOT / "manifests" / "rbac" / "role.yaml").read_text())["rules"]
    assert chart_rules == manifest_rules
    lease_role = _one(docs, "Role", "leader-election")
    assert {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]} in lease_role["rules"]
    assert _one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    # CRDs come from crds/, which `helm template` leaves out unless asked.
    assert not any(d["kind"] == "CustomResourceDefinition" for d in docs)
    with_crds = _render(cluster, "--include-crds")
    crd = _one(with_crds, "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "routingpolicies.tiergate.io"


def test_namespaced_scenario_uses_a_role_only(cluster: DevCluster) -> None:
    docs = _render(cluster, "-f", str(CHART / "ci" / "namespaced-values.yaml"))
    dep = _one(docs, "Deployment")
    assert "--namespace=team-a" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--no-leader-elect" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs)
    role = _one(docs, "Role")
    assert role["metadata"]["namespace"] == "team-a"
    assert not any(d["kind"] == "PodDisruptionBudget" for d in docs)


def test_monitoring_objects_are_off_by_default_and_carry_the_chart_files(cluster: DevCluster) -> None:
    """Each monitoring object renders only when asked, with the content of files/metrics/ unchanged (the files the
    test bed's Prometheus and prometheus-adapter run), and the PodMonitor relabels as the scrape configs do."""
    kinds = {"PodMonitor", "Secret", "ConfigMap"}
    assert not [d["metadata"]["name"] for d in _render(cluster) if d["kind"] in kinds]
    docs = _render(cluster, "-f", str(CHART / "ci" / "metrics-values.yaml"))
    files = CHART / "files" / "metrics"
    scrape = _one(docs, "Secret", "scrape-configs")
    assert scrape["stringData"]["scrape-configs.yaml"] == (files / "scrape-configs.yaml").read_text()
    rules = _one(docs, "ConfigMap", "prometheus-adapter-rules")
    assert rules["metadata"]["namespace"] == "monitoring"
    assert rules["data"]["config.yaml"] == (files / "prometheus-adapter-rules.yaml").read_text()
    dash = _one(docs, "ConfigMap", "dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dash["metadata"]["annotations"] == {"grafana_folder": "Tiergate"}
    assert dash["data"]["tiergate-routing.json"] == (files / "dashboard.json").read_text()
    monitor = _one(docs, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    job = yaml.safe_load((files / "scrape-configs.yaml").read_text())[0]
    from_labels = [
        (r["source_labels"], r["target_label"])
        for r in job["relabel_configs"]
        if r["source_labels"][0].startswith("__meta_kubernetes_pod_label_") and r.get("action") != "keep"
    ]
    assert [(r["sourceLabels"], r["targetLabel"]) for r in endpoint["relabelings"]] == from_labels
    assert tuple(t for _, t in from_labels) == ("routingpolicy", "component", "tier")


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (["--set", "workers=0"], "/workers"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "watchNamespace=Not_A_Namespace"], "/watchNamespace"),
        (["--set", "unknownValue=1"], "unknownValue"),
        (["--set", "replicaCount=2", "--set", "leaderElection.enabled=false"], "needs leaderElection.enabled"),
        (["--set", "leaderElection.renewDeadlineSeconds=15"], "leaseDurationSeconds > renewDeadlineSeconds"),
        (["--set", "metrics.podMonitor.interval=often"], "/metrics/podMonitor/interval"),
        (["--set", "metrics.dashboard.enable=true"], "enable"),
    ],
    ids=["workers", "pullPolicy", "namespace", "unknown", "ha-without-lease", "lease-timing", "interval", "typo"],
)
def test_bad_values_are_refused(cluster: DevCluster, bad: list[str], why: str) -> None:
    with pytest.raises(StartError, match=re.escape(why)):
        cluster.helm("template", "tg", str(CHART), "--kube-version", "1.36.3", *bad)


def test_chart_installs_under_restricted_pod_security(cluster: DevCluster, namespace: str) -> None:
    install_crd(cluster)
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    release = f"tg{namespace[-6:]}"
    cluster.helm("install", release, str(CHART), "--namespace", namespace, "--skip-crds", "--wait", "--timeout", "300s")
    try:
        dep = get_json(cluster, "deployment", "-n", namespace, "-l", f"app.kubernetes.io/instance={release}")
        (d,) = dep["items"]
        wait_for(
            "operator pods admitted and ready",
            lambda: (
                get_json(cluster, "deployment", d["metadata"]["name"], "-n", namespace)["status"].get("readyReplicas")
                == 2
            ),
            timeout=180,
        )
        status = cluster.helm("status", release, "--namespace", namespace)
        assert "STATUS: deployed" in status
    finally:
        cluster.helm("uninstall", release, "--namespace", namespace, check=False)


def test_kustomize_default_applies_for_real(cluster: DevCluster) -> None:
    out = cluster.kubectl("kustomize", str(ROOT / "manifests" / "default"))
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert "CustomResourceDefinition" in kinds
    assert kinds.count("ClusterRole") == 3
    dep = _one(docs, "Deployment")
    assert dep["metadata"]["namespace"] == "tiergate-system"
    assert dep["spec"]["replicas"] == 2
    for d in docs:
        if d["kind"] in ("Deployment", "ServiceAccount", "Role", "RoleBinding"):
            assert d["metadata"]["namespace"] == "tiergate-system", d["metadata"]["name"]

    # A real server-side apply (a dry run cannot create the namespace its other objects need), then a dry run
    # of the same on top, which must pass too.
    r = kubectl_raw(cluster, "apply", "--server-side", "--force-conflicts", "-k", str(ROOT / "manifests" / "default"))
    try:
        assert r.returncode == 0, r.stderr
        wait_for(
            "operator Deployment from manifests/ admitted (restricted PSS) and ready",
            lambda: (
                get_json(cluster, "deployment", "tiergate-operator", "-n", "tiergate-system")["status"].get(
                    "readyReplicas"
                )
                == 2
            ),
            timeout=180,
        )
        r2 = kubectl_raw(cluster, "apply", "--dry-run=server", "-k", str(ROOT / "manifests" / "default"))
        assert r2.returncode == 0, r2.stderr
    finally:
        for d in docs:
            if d["kind"] in ("CustomResourceDefinition", "Namespace"):
                continue  # the CRD is shared with the other tests; the namespace goes last
            kind = d["kind"].lower()
            args = ["delete", kind, d["metadata"]["name"], "--ignore-not-found", "--wait=false"]
            if d["metadata"].get("namespace"):
                args += ["-n", d["metadata"]["namespace"]]
            kubectl_raw(cluster, *args)
        kubectl_raw(cluster, "delete", "namespace", "tiergate-system", "--wait=false", "--ignore-not-found")
