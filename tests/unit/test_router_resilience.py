"""Dispatch under failure with real backends on loopback: endpoint killed mid-burst, whole tier down, errors,
saturation, and policy changes while requests are in flight."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import openai
import pytest

from tests.support.harness import Harness
from tests.support.procs import FakeProcess
from tests.support.waiting import async_wait_for, wait_for
from tiergate_router.breaker import BreakerState
from tiergate_router.config import RouterConfig


@pytest.fixture
def small_procs() -> Iterator[list[FakeProcess]]:
    procs = [FakeProcess("small-model", name=f"small-p{i}", latency_s=0.02) for i in range(2)]
    yield procs
    for p in procs:
        p.kill()


def test_endpoint_killed_during_burst_of_1000_loses_no_request(small_procs: list[FakeProcess]) -> None:
    h = Harness(
        tiers=(("small", 0), ("large", 1)), grpc=False, external={"small": [p.base_url for p in small_procs]}
    ).start()
    try:

        async def burst() -> tuple[Counter[str], list[str]]:
            client = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0, timeout=60)
            sem = asyncio.Semaphore(64)
            done = 0
            tiers: Counter[str] = Counter()
            errors: list[str] = []

            async def one(i: int) -> None:
                nonlocal done
                async with sem:
                    try:
                        r = await client.chat.completions.with_raw_response.create(
                            model="tiergate", messages=[{"role": "user", "content": f"easy question {i}"}]
                        )
                        comp = r.parse()
                        assert comp.choices[0].message.content
                        tiers[r.headers["x-tiergate-tier"] + ":" + comp.choices[0].message.content.split("-")[0]] += 1
                    except Exception as e:
                        errors.append(f"{i}: {e!r}")
                    done += 1
                    if done == 300:
                        small_procs[0].kill()  # SIGKILL: in-flight requests on it see a reset connection

            await asyncio.gather(*(one(i) for i in range(1000)))
            await client.close()
            return tiers, errors

        tiers, errors = asyncio.run(burst())
        assert errors == []
        assert sum(tiers.values()) == 1000
        # the surviving endpoint of the small tier took over: all answered by small
        assert set(tiers) == {"small:small"}
        retries = sum(
            h.metric("tiergate_router_retries_total", {"tier": "small", "reason": r})
            for r in ("error", "down", "saturated")
        )
        assert retries >= 1, "the kill was not noticed (no retry happened)"
        killed = small_procs[0].base_url
        assert h.metric("tiergate_router_circuit_breaker_state", {"tier": "small", "endpoint": killed}) == 2
        assert (
            h.metric("tiergate_router_requests_total", {"tier": "small", "decision": "small", "outcome": "success"})
            == 1000
        )
    finally:
        h.stop()


def test_whole_small_tier_down_every_request_answered_by_fallback(small_procs: list[FakeProcess]) -> None:
    h = Harness(
        tiers=(("small", 0), ("large", 2)), grpc=False, external={"small": [p.base_url for p in small_procs]}
    ).start()
    try:
        for p in small_procs:
            p.kill()
        c = openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0)
        answered = Counter()
        for i in range(100):
            r = c.chat.completions.with_raw_response.create(
                model="tiergate", messages=[{"role": "user", "content": f"easy {i}"}]
            )
            assert r.headers["x-tiergate-decision"] == "small"
            assert r.headers["x-tiergate-fallback"] == "true"
            answered[r.headers["x-tiergate-tier"]] += 1
            assert (r.parse().model_extra or {})["tiergate"]["fallback"] is True
        assert answered == {"large": 100}
        assert (
            h.metric("tiergate_router_requests_total", {"tier": "large", "decision": "small", "outcome": "success"})
            == 100
        )
        moved = sum(
            h.metric("tiergate_router_fallbacks_total", {"from_tier": "small", "to_tier": "large", "reason": r})
            for r in ("down", "error")
        )
        assert moved == 100
        for p in small_procs:
            assert h.metric("tiergate_router_circuit_breaker_state", {"tier": "small", "endpoint": p.base_url}) == 2
        with urllib.request.urlopen(f"{h.url}/metrics") as resp:
            text = resp.read().decode()
        assert 'tiergate_router_fallbacks_total{from_tier="small",reason="down",to_tier="large"}' in text
    finally:
        h.stop()


def test_5xx_endpoint_is_retried_and_breaker_opens_then_recovers() -> None:
    # Open for an hour: however slowly the 10 requests below go, the breaker cannot turn half-open among them.
    h = Harness(tiers=(("small", 2), ("large", 1)), grpc=False, config_overrides={"breaker_open_s": 3600.0}).start()
    try:
        bad, _good = h.fakes["small"]
        bad.behaviour.fail_status = 500
        c = openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0)
        for i in range(10):
            r = c.chat.completions.with_raw_response.create(
                model="tiergate", messages=[{"role": "user", "content": f"q{i}"}]
            )
            assert r.headers["x-tiergate-tier"] == "small"
            assert r.parse().choices[0].message.content.startswith("small1")  # type: ignore[union-attr]
        assert h.metric("tiergate_router_circuit_breaker_state", {"tier": "small", "endpoint": bad.base_url}) == 2
        # 3 failures open the breaker; afterwards the bad endpoint gets no more traffic
        assert len(bad.stats.requests) == 3
        bad.behaviour.fail_status = None
        # A policy change shortens the open period (kept endpoints take the new breaker settings); wait until the
        # breaker admits a probe rather than sleeping past the period.
        assert h.server is not None
        router = h.server.router
        h.thread.loop.call_soon_threadsafe(router.apply_config, replace(router.config, breaker_open_s=0.05))
        breaker = next(ep.breaker for ep in router.dispatcher.pools["small"].endpoints if ep.base_url == bad.base_url)
        wait_for("the breaker half-open", lambda: breaker.state is BreakerState.HALF_OPEN, interval=0.01)
        for i in range(6):
            c.chat.completions.create(model="tiergate", messages=[{"role": "user", "content": f"r{i}"}])
        assert h.metric("tiergate_router_circuit_breaker_state", {"tier": "small", "endpoint": bad.base_url}) == 0
        assert bad.stats.completed >= 2  # back in rotation
    finally:
        h.stop()


def test_upstream_4xx_is_passed_through_not_retried() -> None:
    h = Harness(tiers=(("small", 2), ("large", 1)), grpc=False).start()
    try:
        for f in h.fakes["small"]:
            f.behaviour.fail_status = 400
        c = openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="scripted failure 400"):
            c.chat.completions.create(model="tiergate", messages=[{"role": "user", "content": "x"}])
        assert sum(len(f.stats.requests) for f in h.fakes["small"]) == 1
        assert len(h.fakes["large"][0].stats.requests) == 0
    finally:
        h.stop()


def test_all_tiers_down_is_a_clear_503_not_a_crash() -> None:
    h = Harness(tiers=(("small", 1), ("large", 1)), grpc=False).start()
    try:
        for fakes in h.fakes.values():
            for f in fakes:
                h.call(f.stop())
        c = openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="tiergate", messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 503
        assert "no tier could answer" in str(e.value)
    finally:
        h.stop()


def test_saturated_tier_falls_back_by_429_and_by_vllm_queue_metric() -> None:
    h = Harness(tiers=(("small", 1), ("large", 1)), grpc=False, config_overrides={"saturation_waiting": 2}).start()
    try:
        small = h.fakes["small"][0]
        small.behaviour.fail_status = 429
        c = openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.with_raw_response.create(model="tiergate", messages=[{"role": "user", "content": "x"}])
        assert r.headers["x-tiergate-tier"] == "large"
        assert (
            h.metric(
                "tiergate_router_fallbacks_total", {"from_tier": "small", "to_tier": "large", "reason": "saturated"}
            )
            == 1
        )
        # 429 is back-pressure, not a fault: the breaker stays closed
        assert h.metric("tiergate_router_circuit_breaker_state", {"tier": "small", "endpoint": small.base_url}) == 0
        small.behaviour.fail_status = None
        # Now a long queue reported through vllm:num_requests_waiting (scraped from the backend's /metrics).
        small.stats.waiting = 5
        assert h.server is not None
        h.call(h.server.router.dispatcher.scrape_queue_lengths())
        r = c.chat.completions.with_raw_response.create(model="tiergate", messages=[{"role": "user", "content": "y"}])
        assert r.headers["x-tiergate-tier"] == "large"
        assert r.headers["x-tiergate-fallback"] == "true"
        small.stats.waiting = 0
        h.call(h.server.router.dispatcher.scrape_queue_lengths())
        r = c.chat.completions.with_raw_response.create(model="tiergate", messages=[{"role": "user", "content": "z"}])
        assert r.headers["x-tiergate-tier"] == "small"
    finally:
        h.stop()


def test_config_swap_keeps_in_flight_requests() -> None:
    h = Harness(tiers=(("small", 1), ("large", 1), ("spare", 1)), grpc=False).start()
    try:
        hold = asyncio.Event()  # the small tier answers only once the new policy is in place
        for f in h.fakes["small"]:
            f.behaviour.hold = hold
        assert h.server is not None
        server = h.server

        async def run() -> tuple[list[tuple[int, str]], str]:
            import aiohttp

            async with aiohttp.ClientSession() as s:

                async def one(i: int) -> tuple[int, str]:
                    async with s.post(
                        f"{h.url}/v1/chat/completions",
                        json={"model": "small", "messages": [{"role": "user", "content": f"q{i}"}]},
                    ) as r:
                        body = json.loads(await r.read())
                        return r.status, body.get("choices", [{}])[0].get("message", {}).get("content", "")

                tasks = [asyncio.create_task(one(i)) for i in range(20)]
                small = h.fakes["small"][0].stats
                await async_wait_for("20 requests held in flight on the old small tier", lambda: small.running == 20)
                old = server.router.config
                # new policy: the small tier now points at the spare server; in-flight requests keep theirs
                spare = h.fakes["spare"][0].base_url
                new = RouterConfig(
                    tiers=(old.tiers[0].__class__(name="small", base_urls=(spare,)), old.tiers[1]),
                    thresholds_bp=(5000,),
                )
                h.thread.loop.call_soon_threadsafe(server.router.apply_config, new)
                h.thread.loop.call_soon_threadsafe(hold.set)  # same loop, FIFO: released after the swap
                answers = await asyncio.gather(*tasks)
                async with s.post(
                    f"{h.url}/v1/chat/completions",
                    json={"model": "small", "messages": [{"role": "user", "content": "after"}]},
                ) as r:
                    after = json.loads(await r.read())["choices"][0]["message"]["content"]
                return list(answers), after

        answers, after = asyncio.run(run())
        assert [status for status, _ in answers] == [200] * 20
        # answered by the endpoint they were sent to, not retried on the new one
        assert all(text.startswith("small0-") for _, text in answers), answers
        assert h.fakes["small"][0].stats.completed == 20
        assert len(h.fakes["spare"][0].stats.requests) == 1  # only the request sent after the swap
        assert after.startswith("spare")
    finally:
        h.stop()
