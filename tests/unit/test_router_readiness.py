"""Readiness says whether the router can serve (HTTP /ready and gRPC health alike), liveness does not depend on it,
and the per-endpoint series of endpoints that discovery or a reload removed leave /metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.harness import LoopThread
from tests.support.scorers import KeywordScorer
from tiergate.api.naming import ROUTER_LIVENESS_SERVICE
from tiergate_router.classifier import MicroBatcher
from tiergate_router.config import RouterConfig, ServiceRef, TierConfig, tier_at
from tiergate_router.dispatch import Dispatcher
from tiergate_router.metrics import RouterMetrics
from tiergate_router.server import RouterServer, ServeOptions

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
POD_A, POD_B = "http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"


def discovered_only() -> RouterConfig:
    """One tier reached only through its Service's pods: no endpoint until discovery publishes some."""
    ref = ServiceRef(namespace="ns", name="chat-tier-small", port=8000)
    return RouterConfig(tiers=(TierConfig(name="small", service=ref),), thresholds_bp=())


class Running:
    def __init__(self, cfg: RouterConfig) -> None:
        self.loop = LoopThread()
        self.server = RouterServer(cfg, MicroBatcher(KeywordScorer()), ServeOptions(port=0, grpc_port=0, grace_s=0.5))
        self.loop.call(self.server.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.grpc_port}")
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def discover(self, tier: str, urls: list[str]) -> None:
        async def publish() -> None:
            self.server.set_discovered(tier, urls)

        self.loop.call(publish())

    def http_ready(self) -> tuple[int, dict[str, object]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.server.http_port}/ready", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def check(self, service: str = "") -> int:
        status: int = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        return status

    def wait_status(self, want: int, service: str = "") -> None:
        """Follow the health Watch stream (it sends every change) until `want`: no polling, no sleeping."""
        for resp in self.health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30):
            if resp.status == want:
                return
        raise AssertionError(f"health of {service!r} never became {want}")

    def close(self) -> None:
        self.channel.close()
        self.loop.call(self.server.stop())
        self.loop.close()


@pytest.fixture
def running() -> Iterator[Running]:
    r = Running(discovered_only())
    yield r
    r.close()


def test_not_ready_without_endpoints_ready_when_one_appears_and_not_when_it_goes(running: Running) -> None:
    assert running.check() == NOT_SERVING
    assert running.check("tiergate.v1.RouterService") == NOT_SERVING
    assert running.http_ready() == (503, {"ready": False, "endpoints": {"small": 0}})
    # Alive all along: a liveness probe must not restart a router that waits for its tier's pods.
    assert running.check(ROUTER_LIVENESS_SERVICE) == SERVING

    running.discover("small", [POD_A])
    running.wait_status(SERVING)
    assert running.check("tiergate.v1.RouterService") == SERVING
    assert running.http_ready() == (200, {"ready": True, "endpoints": {"small": 1}})

    running.discover("small", [])
    running.wait_status(NOT_SERVING)
    assert running.http_ready()[0] == 503
    assert running.check(ROUTER_LIVENESS_SERVICE) == SERVING


def test_static_urls_count_as_endpoints() -> None:
    """A router whose tiers are all external (or reached by Service DNS name) is ready from the start: a URL is
    an endpoint, reachable or not; breakers and fallback deal with one that fails."""
    r = Running(RouterConfig(tiers=(tier_at("ext", "https://api.example.invalid/v1"),), thresholds_bp=()))
    try:
        assert r.check() == SERVING
        assert r.http_ready()[0] == 200
    finally:
        r.close()


def breaker_endpoints(metrics: RouterMetrics) -> set[tuple[str, str]]:
    return {
        (s.labels["tier"], s.labels["endpoint"])
        for fam in metrics.registry.collect()
        if fam.name == "tiergate_router_circuit_breaker_state"
        for s in fam.samples
    }


def endpoint_gauge_tiers(metrics: RouterMetrics) -> set[str]:
    return {
        s.labels["tier"]
        for fam in metrics.registry.collect()
        if fam.name == "tiergate_router_endpoints"
        for s in fam.samples
    }


def test_series_of_removed_endpoints_leave_metrics() -> None:
    metrics = RouterMetrics()
    cfg = discovered_only()
    d = Dispatcher(cfg, metrics)
    d.set_discovered("small", [POD_A, POD_B])
    assert breaker_endpoints(metrics) == {("small", POD_A), ("small", POD_B)}

    d.set_discovered("small", [POD_B])  # pod A went away
    assert breaker_endpoints(metrics) == {("small", POD_B)}
    assert f'endpoint="{POD_A}"' not in metrics.render().decode()

    # A reload that moves the tier to a static URL, then one that drops the tier: its series go with it.
    d.apply_config(RouterConfig(tiers=(tier_at("small", "http://svc/v1"), tier_at("large", "http://l/v1"))))
    assert breaker_endpoints(metrics) == {("small", "http://svc/v1"), ("large", "http://l/v1")}
    d.apply_config(RouterConfig(tiers=(tier_at("large", "http://l/v1"),), thresholds_bp=()))
    assert breaker_endpoints(metrics) == {("large", "http://l/v1")}
    assert endpoint_gauge_tiers(metrics) == {"large"}
