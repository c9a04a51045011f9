"""Admission by memory: request bodies held at once stay within the byte budget; requests beyond it wait their turn
(first come, first served) instead of failing, and give up with 503 only after the request timeout."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.support.harness import Harness
from tiergate_router.admission import BudgetTimeout, ByteBudget
from tiergate_router.config import ConfigError, RouterConfig, tier_at
from tiergate_router.http_api import BUDGET_KEY, build_app
from tiergate_router.openai_server import HTTPServer


async def _step() -> None:
    """Let every ready task run until it blocks (a few loop iterations; no clock involved)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_budget_waits_in_order_and_never_exceeds_its_limit() -> None:
    async def main() -> None:
        budget = ByteBudget(10)
        entered: list[str] = []
        gates = {name: asyncio.Event() for name in "abc"}

        async def req(name: str, n: int) -> None:
            async with budget.hold(n):
                entered.append(name)
                assert budget.held <= budget.limit
                await gates[name].wait()

        a = asyncio.create_task(req("a", 6))
        await _step()
        b = asyncio.create_task(req("b", 6))
        await _step()
        c = asyncio.create_task(req("c", 1))  # would fit, but never overtakes b
        await _step()
        assert entered == ["a"]
        assert budget.waiting == 2
        gates["a"].set()
        await _step()
        assert entered == ["a", "b", "c"]
        assert budget.held == 7
        gates["b"].set()
        gates["c"].set()
        await asyncio.gather(a, b, c)
        assert budget.held == 0
        assert budget.peak == 7
        assert budget.waited == 2

    asyncio.run(main())


def test_cancelled_waiter_leaves_the_line_and_oversize_holds_are_clamped() -> None:
    async def main() -> None:
        budget = ByteBudget(10)
        release = asyncio.Event()

        async def holder() -> None:
            async with budget.hold(100):  # more than the limit: clamped, so it can ever go
                await release.wait()

        h = asyncio.create_task(holder())
        await _step()
        assert budget.held == 10
        waiter = asyncio.create_task(holder())
        await _step()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert budget.waiting == 0
        with pytest.raises(BudgetTimeout):
            async with budget.hold(1, timeout_s=0.01):
                pass
        release.set()
        await h
        assert budget.held == 0

    asyncio.run(main())


def test_budget_below_one_body_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_inflight_body_bytes"):
        RouterConfig(tiers=(tier_at("a", "http://a/v1"),), thresholds_bp=(), max_inflight_body_bytes=1024)


def test_concurrent_large_requests_wait_for_room_and_all_succeed() -> None:
    """A budget of one maximal body: six 600 KB requests at once are let through one or so at a time, and every one
    is answered (the 413 of an oversize body is unaffected)."""
    limit = 1024 * 1024
    h = Harness(
        tiers=(("small", 1), ("large", 1)),
        grpc=False,
        config_overrides={"max_body_bytes": limit, "max_inflight_body_bytes": limit},
    ).start()
    try:
        assert h.server is not None
        app = build_app(h.server.router)
        http = HTTPServer(app, "127.0.0.1", 0)
        port = h.call(http.start())

        async def main() -> list[int]:
            async with aiohttp.ClientSession() as s:

                async def one(i: int, size: int) -> int:
                    body = {"model": "small", "messages": [{"role": "user", "content": f"{i} " + "x" * size}]}
                    async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body)) as r:
                        await r.read()
                        return r.status

                return await asyncio.gather(*(one(i, 600_000) for i in range(6)), one(99, 2 * limit))

        statuses = h.run(main)
        h.call(http.stop())
        budget = app[BUDGET_KEY]
        assert statuses == [200] * 6 + [413]
        assert 600_000 < budget.peak <= limit
        assert budget.held == 0
    finally:
        h.stop()


def test_sse_scanner_keeps_no_unbounded_line() -> None:
    """A tier streaming a line without end (here 10 MB with no newline) costs the scanner at most MAX_SSE_LINE
    bytes, and the usage event after it is still found."""
    from tiergate_router.router import MAX_SSE_LINE, SSEUsageScanner

    scanner = SSEUsageScanner()
    scanner.feed(b'data: {"choices": []}\n\ndata: ')
    for _ in range(10):
        scanner.feed(b"x" * 1_000_000)
        assert len(scanner._buf) <= MAX_SSE_LINE
    scanner.feed(b'tail\n\ndata: {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}\n\ndata: [DONE]\n\n')
    assert scanner.usage == {"prompt_tokens": 3, "completion_tokens": 4}
    assert scanner.events == 3  # the choices event, the usage event, [DONE]: the skipped line is not counted
