"""A tier scaled to zero on the real control plane, router side, KEDA-less: the tier's Deployment is scaled to 0 and
back by hand (what KEDA does on the router's demand; the policy's mode External with replicas.min 0 allows it), kwok
runs its pods, fake vLLM servers bind their IPs, and the router built from the policy finds them through
EndpointSlices. While the tier has no pod, its requests are answered by the fallback tier (whenScaledToZero Fallback)
or held (Hold) and counted in its demand; when a pod is back, the tier answers again, the held request included."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.cluster.test_router_discovery import PORT, fakes, ready_pod_ips, tier_objects
from tests.support.fake_vllm import Behaviour, FakeVLLM
from tests.support.harness import LoopThread
from tests.support.procs import FakeProcess
from tests.support.scorers import KeywordScorer
from tiergate.api.policy import parse_policy
from tiergate.devcluster.cluster import DevCluster, wait_for
from tiergate_router.classifier import MicroBatcher
from tiergate_router.config import RouterConfig, from_policy
from tiergate_router.server import RouterServer, ServeOptions

pytestmark = pytest.mark.cluster

__all__ = ["fakes"]  # the fixture, shared with the discovery tests

NAME = "chat-tier-small"  # naming.tier_name("chat", "small"): the Service the router's discovery watches


def router_config(ns: str, large_url: str, when: dict[str, Any]) -> RouterConfig:
    """The router's config from a policy: tier small deployed (mode External, min 0: scaled by hand here), tier large
    an external endpoint (a fake on loopback), so it is always there to fall back to."""
    doc = {
        "apiVersion": "tiergate.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "chat", "namespace": ns},
        "spec": {
            "tiers": [
                {
                    "name": "small",
                    "model": "small-model",
                    "price": {"inputPerMillion": 1, "outputPerMillion": 2},
                    "replicas": {"min": 0},
                    "autoscaling": {"mode": "External", **when},
                },
                {
                    "name": "large",
                    "model": "large-model",
                    "price": {"inputPerMillion": 5, "outputPerMillion": 10},
                    "endpoint": {"url": large_url},
                },
            ],
            "router": {"thresholdBasisPoints": 5000},
        },
    }
    return from_policy(parse_policy(doc), discovery=True)


def test_fallback_then_hold_while_at_zero_and_the_tier_back_after_scaling_up(
    cluster: DevCluster, namespace: str, k8s_api: Any, fakes: dict[str, FakeProcess]
) -> None:
    if cluster.pod_netns is None:
        pytest.skip("external cluster without a pod network namespace: fake pods cannot be bound")
    ns = namespace
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=tier_objects(NAME, 0))  # at zero from the start
    loop = LoopThread()
    large = FakeVLLM("large", name="large0", behaviour=Behaviour())
    loop.call(large.start())
    server = RouterServer(
        router_config(ns, large.base_url, {"whenScaledToZero": "Fallback"}),
        MicroBatcher(KeywordScorer()),
        ServeOptions(port=0, discovery=True, kube_api_client=k8s_api, grace_s=1.0),
    )
    loop.call(server.start())
    clients = ThreadPoolExecutor(2)
    pool = server.router.dispatcher.pools["small"]

    def metric(name: str, labels: dict[str, str]) -> float | None:
        return server.router.metrics.registry.get_sample_value(name, labels)

    def ask() -> dict[str, str]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{server.http_port}/v1/chat/completions",
            data=json.dumps({"model": "tiergate", "messages": [{"role": "user", "content": "easy"}]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return {k.lower(): v for k, v in r.headers.items()}

    try:
        # Fallback: the tier has no pod; the router stays ready (its requests are the demand that would wake the
        # tier) and the large tier answers at once.
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/ready", timeout=10) as r:
            assert r.status == 200
        assert metric("tiergate_router_tier_demand", {"tier": "small"}) == 0.0  # a series to scale on, at 0
        h = ask()
        assert (h["x-tiergate-decision"], h["x-tiergate-tier"], h["x-tiergate-fallback"]) == ("small", "large", "true")

        # Hold (a policy reload): the request waits, counted in the tier's demand, until the tier is scaled up,
        # its pod is ready and discovered; then the tier itself answers it.
        hold = router_config(ns, large.base_url, {"whenScaledToZero": "Hold", "maxHoldSeconds": 300})

        async def reload() -> None:
            server.router.apply_config(hold)

        loop.call(reload())
        pending = clients.submit(ask)
        wait_for("the request held for tier small", lambda: pool.holding == 1, timeout=60, interval=0.05)
        assert metric("tiergate_router_tier_demand", {"tier": "small"}) == 1.0
        # The tier's server, bound to every address of the pod network namespace before the pod exists: a real pod
        # is Ready only once its server answers (its readiness probe), but kwok's pods are Ready at once, so the
        # server must listen before the pod's IP is known, or the woken request would find nothing there.
        fakes["small"] = FakeProcess("small", name="small-pod", host="0.0.0.0", port=PORT, prefix=cluster.netns_cmd([]))
        cluster.kubectl("scale", "deployment", NAME, "-n", ns, "--replicas=1")  # what KEDA does on that demand
        h = pending.result(180)
        assert (h["x-tiergate-tier"], h["x-tiergate-fallback"]) == ("small", "false")
        (ip,) = ready_pod_ips(cluster, ns, NAME).values()
        assert {ep.base_url for ep in pool.endpoints} == {f"http://{ip}:{PORT}/v1"}  # reached at the pod's IP
        assert metric("tiergate_router_holds_total", {"tier": "small", "outcome": "endpoint"}) == 1.0
        assert ask()["x-tiergate-tier"] == "small"
        assert large.stats.completed == 1  # only the request of the Fallback phase

        # Scaled to zero again: discovery drops the pod, and the next request is held again.
        cluster.kubectl("scale", "deployment", NAME, "-n", ns, "--replicas=0")
        wait_for("the pod gone from discovery", lambda: not pool.endpoints, timeout=90)
        pending = clients.submit(ask)
        wait_for("a request held again", lambda: pool.holding == 1, timeout=60, interval=0.05)
        assert not pending.done()
    finally:
        clients.shutdown(wait=False, cancel_futures=True)
        loop.call(server.stop())
        loop.call(large.stop())
        loop.close()
