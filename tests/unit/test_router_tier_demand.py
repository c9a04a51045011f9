"""The router's per-tier demand gauge (tiergate_router_tier_demand{tier}), the External metric an autoscaled tier's
HPA reads through prometheus-adapter: requests routed to a tier count from the decision until they finish, over
HTTP and gRPC, and count against the tier the router chose, also while another tier answers them (fallback)."""

from __future__ import annotations

import asyncio
import json

from tests.support.harness import Harness
from tests.support.waiting import async_wait_for

DEMAND = "tiergate_router_tier_demand"


def test_demand_counts_requests_from_routing_to_their_end() -> None:
    h = Harness(tiers=(("small", 1), ("large", 1)), grpc=False).start()
    try:
        hold = asyncio.Event()
        for f in h.fakes["small"]:
            f.behaviour.hold = hold

        async def run() -> list[int]:
            import aiohttp

            async with aiohttp.ClientSession() as s:

                async def one(i: int, prompt: str) -> int:
                    async with s.post(
                        f"{h.url}/v1/chat/completions",
                        json={"model": "tiergate", "messages": [{"role": "user", "content": prompt}]},
                    ) as r:
                        await r.read()
                        return r.status

                tasks = [asyncio.create_task(one(i, f"q{i}")) for i in range(5)]
                small = h.fakes["small"][0].stats
                await async_wait_for("5 requests held on the small tier", lambda: small.running == 5)
                held = (h.metric(DEMAND, {"tier": "small"}), h.metric(DEMAND, {"tier": "large"}))
                # A request for the large tier (not held) comes and goes meanwhile.
                assert await one(99, "a HARD one") == 200
                assert held == (5.0, 0.0)
                assert h.metric(DEMAND, {"tier": "large"}) == 0.0
                h.thread.loop.call_soon_threadsafe(hold.set)
                return list(await asyncio.gather(*tasks))

        assert asyncio.run(run()) == [200] * 5
        assert h.metric(DEMAND, {"tier": "small"}) == 0.0
    finally:
        h.stop()


def test_demand_is_the_chosen_tiers_also_when_another_answers() -> None:
    """The small tier's only endpoint fails: the request falls back to large, yet it was demand on small (the tier
    that should have served it, whose autoscaler must see it), and nothing is left counted afterwards."""
    h = Harness(tiers=(("small", 1), ("large", 1)), grpc=False).start()
    try:
        h.fakes["small"][0].behaviour.fail_status = 503
        hold = asyncio.Event()
        h.fakes["large"][0].behaviour.hold = hold

        async def run() -> tuple[float, float, dict[str, str]]:
            import aiohttp

            async with aiohttp.ClientSession() as s:

                async def one() -> dict[str, str]:
                    async with s.post(
                        f"{h.url}/v1/chat/completions",
                        json={"model": "tiergate", "messages": [{"role": "user", "content": "easy"}]},
                    ) as r:
                        json.loads(await r.read())
                        return dict(r.headers)

                task = asyncio.create_task(one())
                large = h.fakes["large"][0].stats
                await async_wait_for("the fallback held on large", lambda: large.running == 1)
                during = (h.metric(DEMAND, {"tier": "small"}), h.metric(DEMAND, {"tier": "large"}))
                h.thread.loop.call_soon_threadsafe(hold.set)
                return *during, await task

        small, large, headers = asyncio.run(run())
        assert headers["x-tiergate-tier"] == "large"
        assert (small, large) == (1.0, 0.0)
        assert h.metric(DEMAND, {"tier": "small"}) == 0.0
    finally:
        h.stop()


def test_a_bookmark_event_moves_the_watch_on_instead_of_breaking_it() -> None:
    """The kubernetes client leaves a BOOKMARK's object a dict (it fails the model's required fields); the
    EndpointSlice watch must read its resourceVersion from it, as from a model, and not fail."""
    from types import SimpleNamespace

    from tiergate_router.discovery import event_resource_version

    assert event_resource_version({"kind": "EndpointSlice", "metadata": {"resourceVersion": "42"}}) == "42"
    assert event_resource_version(SimpleNamespace(metadata=SimpleNamespace(resource_version="43"))) == "43"
    assert event_resource_version({"metadata": {}}) is None
