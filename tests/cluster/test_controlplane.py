"""The test bed itself, against the real control plane: scheduling onto GPU pools, CRD validation, garbage
collection, RBAC, tools, and fake pods that can be reached for real."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tiergate.devcluster import netns, nodes, versions
from tiergate.devcluster.cluster import DevCluster, wait_for
from tiergate.devcluster.errors import StartError


def _deployment(name: str, *, gpus: int = 0, pool: str | None = None, tolerate: bool = False) -> str:
    container: dict[str, Any] = {"name": "main", "image": "registry.example/tiergate/fake:1"}
    if gpus:
        container["resources"] = {"limits": {nodes.GPU_RESOURCE: str(gpus)}}
    pod_spec: dict[str, Any] = {"containers": [container]}
    if pool:
        pod_spec["nodeSelector"] = {nodes.POOL_LABEL: pool}
    if tolerate:
        pod_spec["tolerations"] = [{"key": nodes.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
            },
        }
    )


def _pods(cluster: DevCluster, ns: str, app: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", ns, "-l", f"app={app}", "-o", "json")
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def _pool_of(cluster: DevCluster, node: str) -> str:
    return cluster.kubectl("get", "node", node, "-o", "jsonpath={.metadata.labels.tiergate\\.io/pool}")


def test_gpu_deployment_with_toleration_lands_on_gpu_large_and_is_ready(cluster: DevCluster, namespace: str) -> None:
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=_deployment("big", gpus=1, pool="gpu-large", tolerate=True)
    )
    pod = wait_for("a Ready pod", lambda: next((p for p in _pods(cluster, namespace, "big") if _ready(p)), None))
    assert _pool_of(cluster, pod["spec"]["nodeName"]) == "gpu-large"
    assert pod["status"]["podIP"].startswith("198.18.")


def test_gpu_deployment_without_toleration_stays_pending_unschedulable(cluster: DevCluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=_deployment("untolerated", gpus=1, pool="gpu-large"))

    def unschedulable() -> dict[str, Any] | None:
        for p in _pods(cluster, namespace, "untolerated"):
            for c in p.get("status", {}).get("conditions", []):
                if c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable":
                    return {"pod": p, "cond": c}
        return None

    found = wait_for("an Unschedulable condition", unschedulable)
    assert found["pod"]["status"]["phase"] == "Pending"
    assert "spec.nodeName" not in json.dumps(found["pod"]["spec"]) or not found["pod"]["spec"].get("nodeName")
    assert "untolerated taint" in found["cond"]["message"]
    events = cluster.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        "reason=FailedScheduling",
        "-o",
        "jsonpath={.items[*].message}",
    )
    assert "untolerated taint" in events


def test_cpu_only_deployment_lands_on_the_cpu_pool(cluster: DevCluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=_deployment("cpu-only"))
    pod = wait_for("a Ready pod", lambda: next((p for p in _pods(cluster, namespace, "cpu-only") if _ready(p)), None))
    assert _pool_of(cluster, pod["spec"]["nodeName"]) == "cpu"


def test_more_gpus_than_any_node_has_is_unschedulable_by_resources(cluster: DevCluster, namespace: str) -> None:
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=_deployment("huge", gpus=64, pool="gpu-large", tolerate=True)
    )

    def message() -> str:
        for p in _pods(cluster, namespace, "huge"):
            for c in p.get("status", {}).get("conditions", []):
                if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable":
                    return str(c["message"])
        return ""

    assert f"Insufficient {nodes.GPU_RESOURCE}" in wait_for("an Unschedulable condition", message)


CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.testbed.tiergate.io
spec:
  group: testbed.tiergate.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 10}
              min: {type: integer}
              max: {type: integer}
            x-kubernetes-validations:
            - rule: "!has(self.min) || !has(self.max) || self.min <= self.max"
              message: "min must not exceed max"
              fieldPath: ".min"
"""


def test_a_crd_rejects_an_invalid_object_naming_the_field(cluster: DevCluster, namespace: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=CRD)
    wait_for(
        "the CRD to be established",
        lambda: (
            cluster.kubectl(
                "get",
                "crd",
                "widgets.testbed.tiergate.io",
                "-o",
                'jsonpath={.status.conditions[?(@.type=="Established")].status}',
                check=False,
            )
            == "True"
        ),
    )

    def widget(spec: str) -> str:
        return f"apiVersion: testbed.tiergate.io/v1\nkind: Widget\nmetadata: {{name: w}}\nspec: {spec}\n"

    with pytest.raises(StartError) as err:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=widget("{size: 99}"))
    assert "spec.size" in str(err.value)
    assert "less than or equal to 10" in str(err.value)
    with pytest.raises(StartError) as err:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=widget("{size: 2, min: 5, max: 1}"))
    assert "spec.min" in str(err.value)
    assert "min must not exceed max" in str(err.value)
    assert cluster.kubectl("get", "widgets", "-n", namespace, "-o", "name") == ""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=widget("{size: 2, min: 1, max: 5}"))
    assert cluster.kubectl("get", "widgets", "-n", namespace, "-o", "name").strip() == "widget.testbed.tiergate.io/w"


def test_deleting_an_owner_garbage_collects_what_it_owns(cluster: DevCluster, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = cluster.kubectl("get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}")
    owned = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "owned",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(owned))
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_for(
        "the owned ConfigMap to be collected",
        lambda: cluster.kubectl("get", "configmap", "owned", "-n", namespace, "--ignore-not-found", "-o", "name") == "",
    )
    # And the workload chain: Deployment -> ReplicaSet -> Pod.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=_deployment("gc"))
    wait_for("a pod", lambda: _pods(cluster, namespace, "gc"))
    cluster.kubectl("delete", "deployment", "gc", "-n", namespace)
    wait_for(
        "ReplicaSets and pods to be collected",
        lambda: cluster.kubectl("get", "replicasets,pods", "-n", namespace, "-l", "app=gc", "-o", "name") == "",
    )


def test_a_service_account_without_a_binding_is_forbidden(cluster: DevCluster, namespace: str, tmp_path: Path) -> None:
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    token = cluster.kubectl("create", "token", "nobody", "-n", namespace).strip()
    assert token.count(".") == 2  # a signed JWT from the TokenRequest API
    ca = cluster.kubectl(
        "config", "view", "--minify", "--raw", "-o", "jsonpath={.clusters[0].cluster.certificate-authority}"
    )
    as_sa = tmp_path / "sa.kubeconfig"
    server = cluster.info.server if cluster.info else ""
    as_sa.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{server}", certificate-authority: "{ca}"}}}}]
users: [{{name: u, user: {{token: "{token}"}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u, namespace: {namespace}}}}}]
current-context: x
""")
    with pytest.raises(StartError) as err:
        cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=as_sa)
    assert "Forbidden" in str(err.value)
    assert f"system:serviceaccount:{namespace}:nobody" in str(err.value)
    # The same identity with a RoleBinding may list: the 403 came from RBAC, not from a broken token.
    cluster.kubectl("create", "role", "pod-reader", "-n", namespace, "--verb=list", "--resource=pods")
    cluster.kubectl(
        "create",
        "rolebinding",
        "nobody-reads",
        "-n",
        namespace,
        "--role=pod-reader",
        f"--serviceaccount={namespace}:nobody",
    )
    assert wait_for(
        "the binding to take effect",
        lambda: (
            cluster.kubectl("auth", "can-i", "list", "pods", "-n", namespace, kubeconfig=as_sa, check=False).strip()
            == "yes"
        ),
    )
    cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=as_sa)


def test_kubectl_and_helm_reach_the_cluster(cluster: DevCluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == versions.KUBERNETES
    assert "version.BuildInfo" in cluster.helm("version")
    assert cluster.helm("list", "--all-namespaces", "--output", "json").strip() == "[]"
    names = cluster.kubectl("get", "nodes", "-l", nodes.POOL_LABEL, "-o", "jsonpath={.items[*].metadata.name}")
    assert set(nodes.node_names()) <= set(names.split())


def test_python_client_reaches_the_cluster(k8s_api: Any, namespace: str) -> None:
    from kubernetes import client

    ns = client.CoreV1Api(k8s_api).read_namespace(namespace)
    assert ns.status.phase == "Active"


@pytest.mark.skipif(not netns.available()[0], reason=f"pod network: {netns.available()[1]}")
def test_a_fake_pod_is_reachable_through_its_endpointslice(cluster: DevCluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=_deployment("web"))
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(svc))

    def endpoint() -> str:
        return cluster.kubectl(
            "get",
            "endpointslices",
            "-n",
            namespace,
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "jsonpath={.items[*].endpoints[?(@.conditions.ready==true)].addresses[0]}",
        )

    ip = wait_for("a ready endpoint", endpoint).split()[0]
    assert ip.startswith("198.18.")
    code = (
        "import http.server,sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "  def do_GET(s):\n"
        "    b=b'hello from the pod';s.send_response(200);s.send_header('Content-Length',str(len(b)));"
        "s.end_headers();s.wfile.write(b)\n"
        "  def log_message(s,*a):pass\n"
        f"http.server.HTTPServer(('{ip}',8000),H).serve_forever()\n"
    )
    server = subprocess.Popen(cluster.netns_cmd([sys.executable, "-c", code]))
    try:

        def get() -> bytes:
            try:
                with socket.create_connection((ip, 8000), timeout=2) as s:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    chunks = []
                    while chunk := s.recv(4096):  # HTTP/1.0: the server closes after the body
                        chunks.append(chunk)
                    return b"".join(chunks)
            except OSError:
                return b""

        assert b"hello from the pod" in wait_for("the pod's server", get, timeout=60)
    finally:
        server.kill()
        server.wait()


def test_an_existing_cluster_gets_the_fake_pools_and_loses_them_at_stop(
    cluster: DevCluster, namespace: str, tmp_path: Path
) -> None:
    """TIERGATE_TEST_CLUSTER=existing mode, run against this session's cluster as the "existing" one: only kwok
    is started, it registers its own pools (a distinct owner value, so the session's kwok leaves them alone),
    pods land and run there, and stop removes the nodes again."""
    ext = DevCluster(
        cluster.bins,
        tmp_path / "ext",
        pod_network=False,
        external_kubeconfig=cluster.kubeconfig,
        node_prefix="ext-",
        kwok_owner="ext-test",
    )
    with ext:
        assert [c.name for c in ext.components] == ["kwok"]
        cluster.kubectl(
            "apply", "-n", namespace, "-f", "-", input=_deployment("ext", gpus=1, pool="gpu-large", tolerate=True)
        )
        cluster.kubectl(
            "patch",
            "deployment",
            "ext",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"template": {"spec": {"nodeName": "ext-gpu-large-0"}}}}),
        )
        pod = wait_for(
            "a Ready pod on the external kwok's node",
            lambda: next(
                (
                    p
                    for p in _pods(cluster, namespace, "ext")
                    if _ready(p) and p["spec"]["nodeName"] == "ext-gpu-large-0"
                ),
                None,
            ),
        )
        assert pod["status"]["podIP"]
    wait_for(
        "the external kwok's nodes to be removed",
        lambda: cluster.kubectl("get", "nodes", "-o", "name").count("node/ext-") == 0,
    )


@pytest.mark.skipif(not netns.available()[0], reason=f"pod network: {netns.available()[1]}")
def test_a_killed_test_process_leaves_no_stray_processes(cluster: DevCluster, tmp_path: Path) -> None:
    """Even `kill -9` of the process that started a cluster (a test runner killed by CI) stops every component
    (parent-death signal), and the next start removes the pod network it left behind."""
    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from tiergate.devcluster.cluster import DevCluster\n"
        f"bins = {{k: Path(v) for k, v in {json.dumps({k: str(v) for k, v in cluster.bins.items()})}.items()}}\n"
        "info = DevCluster(bins, Path(sys.argv[1]), pod_network=True).start()\n"
        "print(json.dumps({'pids': info.pids, 'netns': info.pod_netns}), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "doomed")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    pids = list(started["pids"].values())
    assert len(pids) == 5

    def all_gone() -> bool:
        alive = subprocess.run(
            ["ps", "-o", "pid=,stat=", "-p", ",".join(map(str, pids))], capture_output=True, text=True
        )
        return all(line.split()[1].startswith("Z") for line in alive.stdout.splitlines())

    wait_for("the orphaned control plane to exit", all_gone, timeout=60)
    assert started["netns"] in netns.reap_stale()
    assert started["netns"] not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
