"""Body limits: `spec.router.bodyLimits` and their flags, gRPC requests counted in the one in-flight body budget,
and a tier's non-streaming answer capped (HTTP 502 naming the tier, not retried)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web

from tests.support.harness import Harness
from tests.support.waiting import wait_for
from tiergate.api.policy import RoutingPolicy
from tiergate_router._proto import router_pb2, router_pb2_grpc
from tiergate_router.admission import ByteBudget
from tiergate_router.config import (
    ConfigError,
    LocalOverrides,
    RouterConfig,
    TierConfig,
    apply_overrides,
    from_policy,
)
from tiergate_router.config.types import DEFAULT_INFLIGHT_BODY_BYTES, DEFAULT_RESPONSE_BYTES
from tiergate_router.dispatch import Dispatcher
from tiergate_router.errors import UpstreamTooLargeError, outcome_of
from tiergate_router.metrics import RouterMetrics

MIB = 1024 * 1024


def _policy(limits: dict[str, Any] | None) -> RoutingPolicy:
    router: dict[str, Any] = {"thresholdBasisPoints": 5000}
    if limits is not None:
        router["bodyLimits"] = limits
    price = {"inputPerMillion": 1, "outputPerMillion": 1}
    return RoutingPolicy.model_validate(
        {
            "apiVersion": "tiergate.io/v1alpha1",
            "kind": "RoutingPolicy",
            "metadata": {"name": "p"},
            "spec": {
                "tiers": [
                    {"name": "a", "model": "m", "endpoint": {"url": "http://a/v1"}, "price": price},
                    {"name": "b", "model": "m", "endpoint": {"url": "http://b/v1"}, "price": price},
                ],
                "router": router,
            },
        }
    )


def test_policy_body_limits_and_flags_reach_the_config() -> None:
    cfg = from_policy(_policy(None))
    assert (cfg.max_inflight_body_bytes, cfg.max_response_bytes) == (
        DEFAULT_INFLIGHT_BODY_BYTES,
        DEFAULT_RESPONSE_BYTES,
    )
    assert (DEFAULT_INFLIGHT_BODY_BYTES, DEFAULT_RESPONSE_BYTES) == (64 * MIB, 16 * MIB)  # as documented
    cfg = from_policy(_policy({"maxInFlightRequestBytes": 8 * MIB, "maxResponseBytes": 4096}))
    assert (cfg.max_inflight_body_bytes, cfg.max_response_bytes) == (8 * MIB, 4096)
    # Flags win over the policy.
    over = apply_overrides(cfg, LocalOverrides(inflight_body_bytes=16 * MIB, response_bytes=2048))
    assert (over.max_inflight_body_bytes, over.max_response_bytes) == (16 * MIB, 2048)
    with pytest.raises(ConfigError, match="max_response_bytes: must be at least 1024"):
        apply_overrides(cfg, LocalOverrides(response_bytes=10))


@pytest.mark.parametrize(
    "limits",
    [
        {"maxInFlightRequestBytes": MIB},  # less than one maximal body
        {"maxInFlightRequestBytes": "64Mi"},  # integers only
        {"maxResponseBytes": 100},
        {"maxResponseBytes": 2 << 30},
        {"maxResponseBytes": 1.5},
    ],
)
def test_policy_body_limits_are_validated(limits: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="bodyLimits"):
        _policy(limits)


def test_crd_schema_bounds_the_fields() -> None:
    from tiergate.api.crd import build_crd

    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    limits = spec["properties"]["router"]["properties"]["bodyLimits"]["properties"]
    assert limits["maxInFlightRequestBytes"]["minimum"] == 4 * MIB
    assert (limits["maxResponseBytes"]["minimum"], limits["maxResponseBytes"]["maximum"]) == (1024, 1 << 30)
    assert limits["maxResponseBytes"]["type"] == "integer"


def test_budget_resize_lets_waiters_in_and_reload_resizes_the_routers_budget() -> None:
    async def main() -> None:
        budget = ByteBudget(10)
        async with budget.hold(10):
            waiter = asyncio.create_task(_hold_once(budget, 5))
            for _ in range(5):
                await asyncio.sleep(0)
            assert budget.waiting == 1
            budget.resize(15)
            await waiter
        assert budget.held == 0

    asyncio.run(main())
    h = Harness(tiers=(("small", 1), ("large", 1)), grpc=False).start()
    try:
        assert h.server is not None
        router = h.server.router
        assert router.body_budget.limit == DEFAULT_INFLIGHT_BODY_BYTES
        import dataclasses

        router.apply_config(dataclasses.replace(router.config, max_inflight_body_bytes=5 * MIB))
        assert router.body_budget.limit == 5 * MIB
    finally:
        h.stop()


async def _hold_once(budget: ByteBudget, n: int) -> None:
    async with budget.hold(n):
        pass


def test_grpc_requests_wait_in_the_same_budget_as_http() -> None:
    """The budget full (as if HTTP bodies held it): a gRPC Generate waits in it, in line, and is answered as soon as
    room is given back; with no room within the request timeout it gets RESOURCE_EXHAUSTED."""
    h = Harness(tiers=(("small", 1), ("large", 1)), config_overrides={"request_timeout_s": 30.0}).start()
    try:
        assert h.server is not None
        budget = h.server.router.body_budget
        release = asyncio.Event()
        held = threading.Event()

        async def occupy() -> None:
            async with budget.hold(budget.limit):
                held.set()
                await release.wait()

        occupier = asyncio.run_coroutine_threadsafe(occupy(), h.thread.loop)
        held.wait(10)
        result: dict[str, Any] = {}

        def call() -> None:
            with grpc.insecure_channel(h.grpc_target) as ch:
                stub = router_pb2_grpc.RouterServiceStub(ch)
                result["reply"] = stub.Generate(router_pb2.GenerateRequest(prompt="hello", tier="small"), timeout=30)

        t = threading.Thread(target=call)
        t.start()
        wait_for("the gRPC request waiting for room", lambda: budget.waiting == 1, interval=0.02)
        assert "reply" not in result
        h.thread.loop.call_soon_threadsafe(release.set)
        t.join(30)
        occupier.result(10)
        assert result["reply"].tier == "small"
        assert budget.waited >= 1
        assert budget.held == 0
    finally:
        h.stop()

    h = Harness(tiers=(("small", 1), ("large", 1)), config_overrides={"request_timeout_s": 0.2}).start()
    try:
        assert h.server is not None
        budget = h.server.router.body_budget
        full = asyncio.run_coroutine_threadsafe(_hold_forever(budget), h.thread.loop)
        wait_for("budget held", lambda: budget.held == budget.limit, interval=0.02)
        with grpc.insecure_channel(h.grpc_target) as ch, pytest.raises(grpc.RpcError) as err:
            router_pb2_grpc.RouterServiceStub(ch).Generate(router_pb2.GenerateRequest(prompt="hi"), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "router busy" in (err.value.details() or "")
        full.cancel()
    finally:
        h.stop()


async def _hold_forever(budget: ByteBudget) -> None:
    async with budget.hold(budget.limit):
        await asyncio.Event().wait()


def test_a_tiers_oversized_answer_is_a_502_naming_the_tier_and_not_retried() -> None:
    h = Harness(tiers=(("small", 1), ("large", 1)), grpc=False, config_overrides={"max_response_bytes": 2048}).start()
    try:
        small, large = h.fakes["small"][0], h.fakes["large"][0]
        small.behaviour.tokens = 2000  # a completion of several KB

        async def post() -> tuple[int, dict[str, Any], dict[str, str]]:
            async with aiohttp.ClientSession() as s:
                body = {"model": "small", "messages": [{"role": "user", "content": "write a lot"}]}
                async with s.post(f"{h.url}/v1/chat/completions", json=body) as r:
                    return r.status, await r.json(), dict(r.headers)

        status, body, headers = h.run(post)
        assert status == 502
        assert body["error"]["code"] == "upstream_response_too_large"
        assert "tier small" in body["error"]["message"]
        assert "2048 bytes" in body["error"]["message"]
        assert headers["x-tiergate-tier"] == "none"
        assert len(small.stats.requests) == 1  # not retried on the tier ...
        assert large.stats.requests == []  # ... nor sent to another
        assert (
            h.metric(
                "tiergate_router_requests_total", {"tier": "none", "decision": "forced", "outcome": "upstream_error"}
            )
            == 1
        )
        # A small answer from the same tier still passes.
        small.behaviour.tokens = 4
        assert h.run(post)[0] == 200
    finally:
        h.stop()


def test_the_cap_holds_without_a_content_length() -> None:
    """A chunked answer (no Content-Length) is cut off once it passes the cap, not read whole first."""

    async def main() -> None:
        async def chunked(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for _ in range(100):  # 100 x 1 KB
                await resp.write(b"x" * 1024)
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chunked)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        cfg = RouterConfig(
            tiers=(TierConfig(name="t", base_urls=(f"http://127.0.0.1:{port}/v1",), served_model="m"),),
            thresholds_bp=(),
            max_response_bytes=4096,
        )
        d = Dispatcher(cfg, RouterMetrics())
        await d.start()
        try:
            with pytest.raises(UpstreamTooLargeError, match=r"tier t \(http://127.0.0.1:\d+/v1\) .* limit of 4096"):
                await d.complete(["t"], "/chat/completions", {"messages": []})
        finally:
            await d.aclose()
            await runner.cleanup()

    asyncio.run(main())
    assert outcome_of(UpstreamTooLargeError("x", [])) == "upstream_error"
