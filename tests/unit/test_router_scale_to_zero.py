"""A tier scaled to zero, router side (spec.tiers[].autoscaling.whenScaledToZero): while the tier has no endpoint,
requests routed to it are answered by the fallback tier (Fallback) or wait for an endpoint (Hold, up to maxHoldSeconds
or the request's deadline, then fall back); either way they count in the tier's demand gauge, which has a 0 series
per tier from the start, and the tier serves again as soon as discovery finds a pod. Real loopback servers: fake vLLM
tiers, the router's HTTP server; discovery is faked by publishing endpoint URLs as the EndpointSlice watch does."""

from __future__ import annotations

import asyncio
import copy
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.fake_vllm import Behaviour, FakeVLLM
from tests.support.harness import LoopThread
from tests.support.scorers import KeywordScorer
from tests.support.waiting import wait_for
from tests.unit.test_operator_autoscaling import KEDA, doc_with, refusal
from tiergate.api.policy import parse_policy
from tiergate_router.classifier import MicroBatcher
from tiergate_router.config import RouterConfig, ServiceRef, TierConfig, from_policy
from tiergate_router.server import RouterServer, ServeOptions

DEMAND = "tiergate_router_tier_demand"
HOLDS = "tiergate_router_holds_total"
EASY, HARD = "easy", "a HARD one"  # KeywordScorer: small, large


class Bed:
    """Fake tiers `small` (reached only through discovery, so it starts at zero endpoints) and `large` (a static
    URL), and a router serving them over HTTP."""

    def __init__(self, *, hold_s: float | None, large: bool = True, request_timeout_s: float = 120.0) -> None:
        self.loop = LoopThread()
        self.small = FakeVLLM("small-model", name="small0", behaviour=Behaviour())
        self.large = FakeVLLM("large-model", name="large0", behaviour=Behaviour())
        self.loop.call(self.small.start())
        self.loop.call(self.large.start())
        small = TierConfig(
            name="small",
            service=ServiceRef(namespace="ns", name="chat-tier-small", port=8000),
            hold_when_empty_s=hold_s,
            scales_to_zero=True,
        )
        tiers = (small, TierConfig(name="large", base_urls=(self.large.base_url,))) if large else (small,)
        cfg = RouterConfig(tiers=tiers, thresholds_bp=(5000,) if large else (), request_timeout_s=request_timeout_s)
        self.server = RouterServer(cfg, MicroBatcher(KeywordScorer()), ServeOptions(port=0, grpc_port=None))
        self.loop.call(self.server.start())
        self.pool = self.server.router.dispatcher.pools["small"]
        self._clients = ThreadPoolExecutor(4)

    def discover(self, urls: list[str]) -> None:
        async def publish() -> None:
            self.server.set_discovered("small", urls)

        self.loop.call(publish())

    def metric(self, name: str, labels: dict[str, str]) -> float | None:
        return self.server.router.metrics.registry.get_sample_value(name, labels)

    def post(self, prompt: str, timeout_ms: int | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.server.http_port}/v1/chat/completions",
            data=json.dumps({"model": "tiergate", "messages": [{"role": "user", "content": prompt}]}).encode(),
            headers={"Content-Type": "application/json"}
            | ({"x-tiergate-timeout-ms": str(timeout_ms)} if timeout_ms else {}),
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    def post_async(self, prompt: str, timeout_ms: int | None = None) -> Future[tuple[int, dict[str, str], Any]]:
        return self._clients.submit(self.post, prompt, timeout_ms)

    def ready(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.server.http_port}/ready", timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return e.code

    def close(self) -> None:
        self._clients.shutdown(wait=True)
        self.loop.call(self.server.stop())
        self.loop.call(self.small.stop())
        self.loop.call(self.large.stop())
        self.loop.close()


@pytest.fixture
def fallback_bed() -> Iterator[Bed]:
    bed = Bed(hold_s=None)
    yield bed
    bed.close()


@pytest.fixture
def hold_bed() -> Iterator[Bed]:
    bed = Bed(hold_s=60.0)
    yield bed
    bed.close()


def test_demand_has_a_zero_series_per_tier_from_the_start(fallback_bed: Bed) -> None:
    """The HPA and KEDA need a series to read: 0 for every tier before any request."""
    assert fallback_bed.metric(DEMAND, {"tier": "small"}) == 0.0
    assert fallback_bed.metric(DEMAND, {"tier": "large"}) == 0.0


def test_fallback_answers_while_at_zero_counting_demand_then_the_tier_serves_again(fallback_bed: Bed) -> None:
    bed = fallback_bed
    assert bed.ready() == 200
    # The fallback tier holds the request, so the demand is read while it is in flight.
    hold = bed.large.behaviour.hold = asyncio.Event()
    pending = bed.post_async(EASY)
    wait_for("the fallback held on large", lambda: bed.large.stats.running == 1, timeout=30, interval=0.02)
    assert bed.metric(DEMAND, {"tier": "small"}) == 1.0  # demand on the tier at zero: it wakes it
    assert bed.metric(DEMAND, {"tier": "large"}) == 0.0
    bed.loop.loop.call_soon_threadsafe(hold.set)
    status, headers, _ = pending.result(60)
    assert (status, headers["x-tiergate-tier"], headers["x-tiergate-fallback"]) == (200, "large", "true")
    assert headers["x-tiergate-decision"] == "small"
    assert bed.metric(DEMAND, {"tier": "small"}) == 0.0
    assert bed.small.stats.completed == 0
    bed.large.behaviour.hold = None
    # The tier's pod becomes ready: discovery publishes it and the next request is served by it.
    bed.discover([bed.small.base_url])
    status, headers, _ = bed.post(EASY)
    assert (status, headers["x-tiergate-tier"], headers["x-tiergate-fallback"]) == (200, "small", "false")
    assert bed.small.stats.completed == 1
    assert bed.metric(HOLDS, {"tier": "small", "outcome": "expired"}) is None  # Fallback never holds


def test_hold_waits_for_an_endpoint_and_the_tier_answers(hold_bed: Bed) -> None:
    bed = hold_bed
    pending = bed.post_async(EASY)
    wait_for("the request held for small", lambda: bed.pool.holding == 1, timeout=30, interval=0.02)
    assert bed.metric(DEMAND, {"tier": "small"}) == 1.0
    assert not pending.done()
    # A request for the other tier is not held meanwhile.
    assert bed.post(HARD)[1]["x-tiergate-tier"] == "large"
    bed.discover([bed.small.base_url])
    status, headers, _ = pending.result(60)
    assert (status, headers["x-tiergate-tier"], headers["x-tiergate-fallback"]) == (200, "small", "false")
    assert bed.large.stats.completed == 1  # only the HARD one
    assert bed.metric(HOLDS, {"tier": "small", "outcome": "endpoint"}) == 1.0
    assert bed.metric(DEMAND, {"tier": "small"}) == 0.0
    assert bed.pool.holding == 0


def test_hold_expires_into_the_fallback() -> None:
    bed = Bed(hold_s=0.2)
    try:
        status, headers, _ = bed.post(EASY)
        assert (status, headers["x-tiergate-tier"], headers["x-tiergate-fallback"]) == (200, "large", "true")
        assert bed.metric(HOLDS, {"tier": "small", "outcome": "expired"}) == 1.0
    finally:
        bed.close()


def test_hold_expires_into_503_without_a_fallback_tier_and_the_router_stays_ready() -> None:
    """One tier, at zero: the router stays ready (its requests are the demand that wakes the tier), holds, then
    answers 503 naming the tier that had no endpoint."""
    bed = Bed(hold_s=0.2, large=False)
    try:
        assert bed.ready() == 200
        status, headers, body = bed.post(EASY)
        assert (status, headers["x-tiergate-tier"]) == (503, "none")
        assert "small: no endpoint after holding" in body["error"]["message"]
        assert bed.metric(HOLDS, {"tier": "small", "outcome": "expired"}) == 1.0
    finally:
        bed.close()


def test_the_requests_deadline_ends_a_hold_with_504(hold_bed: Bed) -> None:
    status, _, body = hold_bed.post(EASY, timeout_ms=300)
    assert status == 504, body
    assert hold_bed.metric(HOLDS, {"tier": "small", "outcome": "deadline"}) == 1.0
    assert hold_bed.large.stats.completed == 0  # no time left for the fallback: the deadline is the request's


def test_a_reload_dropping_the_tier_releases_its_held_requests(hold_bed: Bed) -> None:
    bed = hold_bed
    pending = bed.post_async(EASY)
    wait_for("the request held for small", lambda: bed.pool.holding == 1, timeout=30, interval=0.02)
    large_only = RouterConfig(tiers=(bed.server.router.config.tier("large"),), thresholds_bp=())

    async def reload() -> None:
        bed.server.router.apply_config(large_only)

    bed.loop.call(reload())
    status, headers, _ = pending.result(60)
    assert (status, headers["x-tiergate-tier"], headers["x-tiergate-fallback"]) == (200, "large", "true")
    assert bed.metric(DEMAND, {"tier": "small"}) is None  # the gone tier's series left /metrics


# --- the policy: CRD-validated knob, and what the router makes of it ----------------------------------------------


def keda_at_zero(**extra: Any) -> dict[str, Any]:
    doc = doc_with(copy.deepcopy(KEDA) | extra)
    doc["spec"]["tiers"][1]["replicas"]["min"] = 0
    return doc


def router_config(doc: dict[str, Any]) -> RouterConfig:
    """The router's config from the policy, with a threshold given (no classifier artifact to calibrate from)."""
    router = doc["spec"]["router"]
    router.pop("targetStrongShareBasisPoints", None)
    router["thresholdBasisPoints"] = 5000
    return from_policy(parse_policy(doc), discovery=True)


def test_policy_hold_reaches_the_router_config() -> None:
    cfg = router_config(keda_at_zero(whenScaledToZero="Hold", maxHoldSeconds=45))
    large = cfg.tier("large")
    assert (large.hold_when_empty_s, large.scales_to_zero) == (45.0, True)
    assert (cfg.tier("small").hold_when_empty_s, cfg.tier("small").scales_to_zero) == (None, False)
    fallback = router_config(keda_at_zero(whenScaledToZero="Fallback")).tier("large")
    assert (fallback.hold_when_empty_s, fallback.scales_to_zero) == (None, True)
    # KEDA at zero without the knob falls back (its absence means Fallback) and still keeps the router ready.
    assert router_config(keda_at_zero()).tier("large").scales_to_zero
    # External with min 0 (someone else scales it to zero) may hold too.
    doc = doc_with({"mode": "External", "whenScaledToZero": "Hold", "maxHoldSeconds": 5})
    doc["spec"]["tiers"][1]["replicas"] = {"min": 0}
    assert router_config(doc).tier("large").hold_when_empty_s == 5.0


BAD_KNOB = [
    # (autoscaling extras, replicas.min of the KEDA tier, field in the error, words of the message)
    ({"whenScaledToZero": "Hold"}, 0, "autoscaling.maxHoldSeconds", "required with whenScaledToZero Hold"),
    ({"whenScaledToZero": "Fallback", "maxHoldSeconds": 5}, 0, "autoscaling.maxHoldSeconds", "only used by it"),
    ({"maxHoldSeconds": 5}, 0, "autoscaling.maxHoldSeconds", "only used by it"),
    ({"whenScaledToZero": "Hold", "maxHoldSeconds": 0}, 0, "autoscaling.maxHoldSeconds", "greater than"),
    ({"whenScaledToZero": "Hold", "maxHoldSeconds": 3601}, 0, "autoscaling.maxHoldSeconds", "less than"),
    ({"whenScaledToZero": "Wait"}, 0, "autoscaling.whenScaledToZero", "'Fallback' or 'Hold'"),
    ({"whenScaledToZero": "Fallback"}, 1, "autoscaling.whenScaledToZero", "replicas.min 0"),
]


@pytest.mark.parametrize(("extra", "low", "where", "words"), BAD_KNOB, ids=[str(b[0]) + str(b[1]) for b in BAD_KNOB])
def test_bad_knob_is_refused_naming_the_field(extra: dict[str, Any], low: int, where: str, words: str) -> None:
    doc = keda_at_zero(**extra)
    doc["spec"]["tiers"][1]["replicas"]["min"] = low
    err = refusal(doc)
    assert f"spec.tiers[1].{where}" in err.paths, err.paths
    assert words in str(err), str(err)


def test_hpa_tier_cannot_take_the_knob() -> None:
    err = refusal(doc_with({"mode": "HPA", "targets": {"routerDemandPerReplica": 2}, "whenScaledToZero": "Fallback"}))
    assert "spec.tiers[1].autoscaling.whenScaledToZero" in err.paths
    assert "mode KEDA or External" in str(err)
