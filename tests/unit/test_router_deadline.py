"""The overall deadline, the per-try timeout and the retry budget, through the router over real HTTP with fake vLLM
tiers that hang (answer after an hour) or fail.

What is asserted is causality, never a tight clock: a hanging tier leads to a fallback answer (the per-try timeout
is counted on the hanging tier) or to a 504 in the OpenAI error shape, and the answer comes long before the old
120 s per-attempt timeout would have let it (bounds are the deadline plus a generous slack, for a loaded machine)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.support.harness import Harness

HANG_S = 3600.0
# Far above any deadline below, far below the 120 s a hanging tier used to hold every request for.
SLACK_S = 30.0


def _post(
    h: Harness, model: str, *, stream: bool = False, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": stream}
    req = urllib.request.Request(
        f"{h.url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=HANG_S) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _timed_post(h: Harness, model: str, **kw: Any) -> tuple[float, int, dict[str, str], bytes]:
    t0 = time.monotonic()
    status, headers, body = _post(h, model, **kw)
    return time.monotonic() - t0, status, headers, body


def _hang(h: Harness, tier: str) -> None:
    for fake in h.fakes[tier]:
        fake.behaviour.latency_s = HANG_S


@pytest.fixture
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    h = Harness(tiers=(("small", 1), ("large", 1)), grpc=False, config_overrides=request.param).start()
    try:
        yield h
    finally:
        h.stop()


def _limits(**kw: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("harness", [kw], indirect=True)


@_limits(request_timeout_s=SLACK_S, per_try_timeout_s=1.0, max_attempts_per_tier=1)
def test_a_hanging_tier_falls_back_within_the_deadline(harness: Harness) -> None:
    _hang(harness, "small")
    elapsed, status, headers, body = _timed_post(harness, "small")
    assert status == 200
    assert (headers["x-tiergate-tier"], headers["x-tiergate-fallback"]) == ("large", "true")
    assert json.loads(body)["tiergate"]["fallback"] is True
    # Why it moved on: the hanging tier's try hit the per-try timeout, once; the answer came within the deadline.
    assert harness.metric("tiergate_router_try_timeouts_total", {"tier": "small", "limit": "per_try"}) == 1
    assert (
        harness.metric("tiergate_router_fallbacks_total", {"from_tier": "small", "to_tier": "large", "reason": "error"})
        == 1
    )
    assert elapsed < SLACK_S


@_limits(request_timeout_s=2.0, max_attempts_per_tier=1)
def test_all_tiers_hanging_end_in_a_504_at_the_deadline(harness: Harness) -> None:
    _hang(harness, "small")
    _hang(harness, "large")
    elapsed, status, headers, body = _timed_post(harness, "small")
    assert status == 504
    assert headers["x-tiergate-tier"] == "none"
    err = json.loads(body)["error"]
    assert (err["type"], err["code"]) == ("server_error", "deadline_exceeded")
    assert err["message"].startswith("deadline exceeded")
    # Without a per-try timeout the hanging first tier had the whole deadline; the fallback tier was never sent to.
    assert harness.metric("tiergate_router_try_timeouts_total", {"tier": "small", "limit": "deadline"}) == 1
    assert harness.fakes["large"][0].stats.requests == []
    assert (
        harness.metric(
            "tiergate_router_requests_total", {"tier": "none", "decision": "forced", "outcome": "deadline_exceeded"}
        )
        == 1
    )
    # Never before the deadline (asyncio's timeout cannot fire early), never near the old 120 s per try.
    assert 2.0 <= elapsed < 2.0 + SLACK_S
    # The abandoned try was closed upstream, so the tier stops generating (vLLM aborts a request whose client left).
    small = harness.fakes["small"][0]
    harness.call(_wait_for(lambda: small.stats.aborted == 1, "the hanging tier to see its request aborted"))


@_limits(request_timeout_s=SLACK_S, per_try_timeout_s=1.0, max_attempts_per_tier=1)
def test_every_try_timing_out_is_a_504_not_a_503(harness: Harness) -> None:
    _hang(harness, "small")
    _hang(harness, "large")
    elapsed, status, _, body = _timed_post(harness, "small")
    assert status == 504
    assert json.loads(body)["error"]["code"] == "deadline_exceeded"
    for tier in ("small", "large"):
        assert harness.metric("tiergate_router_try_timeouts_total", {"tier": tier, "limit": "per_try"}) == 1
    assert elapsed < SLACK_S


@_limits(request_timeout_s=2.0, max_attempts_per_tier=1)
def test_a_streaming_request_gets_its_504_before_any_byte(harness: Harness) -> None:
    _hang(harness, "small")
    _hang(harness, "large")
    elapsed, status, headers, body = _timed_post(harness, "small", stream=True)
    assert status == 504
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "deadline_exceeded"
    assert elapsed < 2.0 + SLACK_S


@_limits(request_timeout_s=2.0, per_try_timeout_s=1.0, stream_idle_timeout_s=SLACK_S, max_attempts_per_tier=1)
def test_a_stream_past_its_first_byte_is_not_cut_by_the_deadline(harness: Harness) -> None:
    # Eight tokens 0.4 s apart: the stream lasts longer than the 2 s deadline, which ends at the first byte.
    for fake in harness.fakes["small"]:
        fake.behaviour.token_delay_s = 0.4
    status, headers, body = _post(harness, "small", stream=True)
    assert (status, headers["x-tiergate-tier"]) == (200, "small")
    assert body.rstrip().endswith(b"data: [DONE]")
    assert harness.fakes["small"][0].stats.completed == 1


@_limits(request_timeout_s=SLACK_S, breaker_failures=1, max_attempts_per_tier=1)
def test_a_clients_shorter_deadline_applies_without_blaming_the_endpoint(harness: Harness) -> None:
    _hang(harness, "small")
    _hang(harness, "large")
    elapsed, status, _, body = _timed_post(harness, "small", headers={"x-tiergate-timeout-ms": "500"})
    assert status == 504
    assert json.loads(body)["error"]["code"] == "deadline_exceeded"
    assert elapsed < SLACK_S
    # One failure would open the breaker (breaker_failures=1): the client's impatience did not count as one.
    small = harness.fakes["small"][0].base_url
    assert harness.metric("tiergate_router_circuit_breaker_state", {"tier": "small", "endpoint": small}) == 0
    status, _, body = _post(harness, "small", headers={"x-tiergate-timeout-ms": "soon"})
    assert status == 400
    assert json.loads(body)["error"]["param"] == "x-tiergate-timeout-ms"


async def _wait_for(condition: Any, what: str) -> None:
    """Poll a condition on the router's loop (no fixed sleep decides the outcome; the bound only ends a hung test)."""
    for _ in range(6000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@_limits(
    request_timeout_s=SLACK_S * 10,
    retry_budget_percent=0,
    min_retry_concurrency=1,
    max_attempts_per_tier=1,
    breaker_failures=1000,
)
def test_retries_stop_when_the_retry_budget_is_spent(harness: Harness) -> None:
    """Budget: one retry in flight (0 % of requests, minimum 1). The small tier fails every try with HTTP 500; the
    large tier hangs. Request A's retry (its fallback to large) takes the one slot; request B's retry is refused
    (503 retry_budget_exhausted, counted); once A is gone, request C's retry is allowed again."""
    h = harness
    for fake in h.fakes["small"]:
        fake.behaviour.fail_status = 500
    _hang(h, "large")
    large = h.fakes["large"][0]
    dispatcher = h.server.router.dispatcher if h.server is not None else None
    assert dispatcher is not None
    url = f"{h.url}/v1/chat/completions"
    body = {"model": "small", "messages": [{"role": "user", "content": "hello"}]}

    async def scenario() -> tuple[int, dict[str, Any], int, dict[str, Any]]:
        async with aiohttp.ClientSession() as s:

            async def post() -> tuple[int, dict[str, Any]]:
                async with s.post(url, json=body) as r:
                    return r.status, await r.json()

            a = asyncio.ensure_future(post())
            await _wait_for(lambda: large.stats.running == 1, "request A's retry to reach the hanging tier")
            b_status, b_body = await post()
            a.cancel()
            await asyncio.gather(a, return_exceptions=True)
            await _wait_for(lambda: dispatcher._retrying == 0, "request A's retry to end")
            large.behaviour.latency_s = 0.0
            c_status, c_body = await post()
            return b_status, b_body, c_status, c_body

    b_status, b_body, c_status, c_body = h.call(scenario(), timeout=HANG_S)
    assert b_status == 503
    assert b_body["error"]["code"] == "retry_budget_exhausted"
    assert h.metric("tiergate_router_retry_budget_exhausted_total", {"tier": "large"}) == 1
    assert c_status == 200
    assert c_body["tiergate"] == {"tier": "large", "score": None, "decision": "forced", "fallback": True, "samples": 1}
    assert h.metric("tiergate_router_retry_budget_exhausted_total", {"tier": "large"}) == 1
