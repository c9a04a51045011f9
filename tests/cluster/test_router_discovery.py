"""EndpointSlice discovery against the real control plane: tier pods on kwok GPU nodes get IPs in the test
network namespace, fake vLLM servers bind those IPs, and the router (in the host namespace) finds them through
EndpointSlices, following pods that become unready, disappear or appear."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.harness import LoopThread
from tests.support.procs import FakeProcess
from tests.support.scorers import KeywordScorer
from tiergate.devcluster.cluster import DevCluster, wait_for
from tiergate.devcluster.loop import ready_pod_ips as pods_ready_by_selector
from tiergate_router.classifier import MicroBatcher
from tiergate_router.config import RouterConfig, ServiceRef, TierConfig
from tiergate_router.server import RouterServer, ServeOptions

PORT = 8000


def tier_objects(name: str, replicas: int) -> str:
    labels = {"app": name}
    docs = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "nodeSelector": {"tiergate.io/pool": "gpu-small"},
                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                        "containers": [
                            {
                                "name": "vllm",
                                "image": "vllm/vllm-openai:v0.11.0",
                                "ports": [{"containerPort": PORT, "name": "http"}],
                                "resources": {"limits": {"nvidia.com/gpu": "1"}},
                            }
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": labels, "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]},
        },
    ]
    return "\n---\n".join(json.dumps(d) for d in docs)


def ready_pod_ips(cluster: DevCluster, ns: str, app: str) -> dict[str, str]:
    return pods_ready_by_selector(cluster, ns, f"app={app}")


@pytest.fixture
def fakes() -> Iterator[dict[str, FakeProcess]]:
    procs: dict[str, FakeProcess] = {}
    yield procs
    for p in procs.values():
        p.kill()


def start_fake(cluster: DevCluster, procs: dict[str, FakeProcess], pod: str, ip: str) -> None:
    procs[pod] = FakeProcess("small-model", name=pod, host=ip, port=PORT, prefix=cluster.netns_cmd([]))


def test_router_follows_endpointslices(
    cluster: DevCluster, namespace: str, k8s_api: Any, fakes: dict[str, FakeProcess]
) -> None:
    if cluster.pod_netns is None:
        pytest.skip("external cluster without a pod network namespace: fake pods cannot be bound")
    name = "chat-tier-small"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=tier_objects(name, 2))
    ips = wait_for(
        "two Ready pods", lambda: (lambda d: d if len(d) == 2 else None)(ready_pod_ips(cluster, namespace, name))
    )
    assert all(ip.startswith("198.18.") for ip in ips.values())
    for pod, ip in ips.items():
        start_fake(cluster, fakes, pod, ip)

    ref = ServiceRef(namespace=namespace, name=name, port=PORT)
    cfg = RouterConfig(tiers=(TierConfig(name="small", service=ref),), thresholds_bp=(), breaker_open_s=60.0)
    loop = LoopThread()
    server = RouterServer(
        cfg, MicroBatcher(KeywordScorer()), ServeOptions(port=0, discovery=True, kube_api_client=k8s_api, grace_s=1.0)
    )
    loop.call(server.start())
    try:
        pool = server.router.dispatcher.pools["small"]

        def endpoints() -> set[str]:
            return {ep.base_url for ep in pool.endpoints}

        expected = {f"http://{ip}:{PORT}/v1" for ip in ips.values()}
        wait_for("both pods discovered", lambda: endpoints() == expected)

        def ask(n: int) -> set[str]:
            seen = set()
            for i in range(n):
                req = urllib.request.Request(
                    f"http://127.0.0.1:{server.http_port}/v1/chat/completions",
                    data=json.dumps({"model": "tiergate", "messages": [{"role": "user", "content": f"q{i}"}]}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=30) as r:
                    assert r.headers["x-tiergate-tier"] == "small"
                    seen.add(json.loads(r.read())["choices"][0]["message"]["content"].split("-tok")[0])
            return seen

        assert ask(6) == set(ips)  # balanced over both pods, reached at their pod IPs

        # One pod becomes unready: its endpoint leaves the EndpointSlice's ready set, the router stops using it.
        unready_pod = sorted(ips)[0]
        other_pod = sorted(ips)[1]
        cluster.kubectl(
            "patch",
            "pod",
            unready_pod,
            "-n",
            namespace,
            "--subresource=status",
            "--type=json",
            "-p",
            json.dumps(
                [
                    {
                        "op": "replace",
                        "path": "/status/conditions",
                        "value": [{"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "False"}],
                    }
                ]
            ),
        )
        wait_for("unready pod dropped", lambda: endpoints() == {f"http://{ips[other_pod]}:{PORT}/v1"}, 90)
        assert ask(4) == {other_pod}

        # The other pod disappears (deleted); the ReplicaSet replaces it. A deleted pod's server goes with it, and
        # kwok may hand the freed IP to the replacement, so the check follows the Endpoint object, not the URL:
        # the old one must be dropped (marked removed) and a new one must serve the new pod.
        old_ep = next(ep for ep in pool.endpoints if ep.base_url == f"http://{ips[other_pod]}:{PORT}/v1")
        fakes.pop(other_pod).kill()
        cluster.kubectl("delete", "pod", other_pod, "-n", namespace, "--wait=false")

        def replaced() -> dict[str, str] | None:
            now = ready_pod_ips(cluster, namespace, name)
            new = {p: ip for p, ip in now.items() if p not in ips}
            return new or None

        new = wait_for("a replacement pod", replaced)
        new_pod, new_ip = next(iter(new.items()))
        start_fake(cluster, fakes, new_pod, new_ip)
        wait_for(
            "deleted pod dropped, new pod discovered",
            lambda: (
                old_ep.removed
                and any(ep.base_url == f"http://{new_ip}:{PORT}/v1" and ep is not old_ep for ep in pool.endpoints)
            ),
            30,
        )
        assert new_pod in ask(4)
    finally:
        loop.call(server.stop())
        loop.close()


def test_router_is_ready_only_while_a_tier_has_an_endpoint(
    cluster: DevCluster, namespace: str, k8s_api: Any, fakes: dict[str, FakeProcess]
) -> None:
    """No pod behind the tier's Service: HTTP /ready says 503 and gRPC health NOT_SERVING (the router pod's
    readiness probe), while liveness stays SERVING. A pod appears: both turn ready, and a request is answered by
    it. The pod goes: not ready again. Every wait follows a condition (the health Watch stream, the API)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tiergate.api.naming import ROUTER_LIVENESS_SERVICE

    if cluster.pod_netns is None:
        pytest.skip("external cluster without a pod network namespace: fake pods cannot be bound")
    name = "chat-tier-small"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=tier_objects(name, 0))
    ref = ServiceRef(namespace=namespace, name=name, port=PORT)
    cfg = RouterConfig(tiers=(TierConfig(name="small", service=ref),), thresholds_bp=())
    loop = LoopThread()
    server = RouterServer(
        cfg,
        MicroBatcher(KeywordScorer()),
        ServeOptions(port=0, grpc_port=0, discovery=True, kube_api_client=k8s_api, grace_s=1.0),
    )
    loop.call(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    health = health_pb2_grpc.HealthStub(channel)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    def http_ready() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/ready", timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    def check(service: str = "") -> int:
        return int(health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)

    def watch_until(status: int) -> None:
        for resp in health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120):
            if resp.status == status:
                return
        raise AssertionError(f"gRPC health never became {status}")

    try:
        # The Service exists and has no pods: the discovery watch has listed its (empty) slices, or not yet: either
        # way there is no endpoint, and the router must say so.
        assert check() == not_serving
        assert http_ready() == 503
        assert check(ROUTER_LIVENESS_SERVICE) == serving

        cluster.kubectl("scale", "deployment", name, "-n", namespace, "--replicas=1")
        ips = wait_for(
            "one Ready pod", lambda: (lambda d: d if len(d) == 1 else None)(ready_pod_ips(cluster, namespace, name))
        )
        pod, ip = next(iter(ips.items()))
        start_fake(cluster, fakes, pod, ip)
        watch_until(serving)
        assert http_ready() == 200
        req = urllib.request.Request(
            f"http://127.0.0.1:{server.http_port}/v1/chat/completions",
            data=json.dumps({"model": "tiergate", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["choices"][0]["message"]["content"].startswith(pod)

        cluster.kubectl("scale", "deployment", name, "-n", namespace, "--replicas=0")
        watch_until(not_serving)
        assert http_ready() == 503
        assert check(ROUTER_LIVENESS_SERVICE) == serving
    finally:
        channel.close()
        loop.call(server.stop())
        loop.close()
