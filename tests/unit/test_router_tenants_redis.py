"""Tenant limits shared through a real `redis-server` on loopback: the Lua token buckets, the fallback to
per-replica limits while Redis is down (and failing closed where the policy says so), and two `tiergate serve`
processes holding one tenant's requests-per-minute limit together under concurrent load, with Redis killed
mid-run and started again."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.support.procs import FakeProcess, fake_tiers
from tests.support.redis_server import RedisServer, redis_server
from tests.support.router_serve import Serve
from tests.support.waiting import wait_for
from tiergate_router.limits import Limiter, RedisStore, StoreUnavailable, bucket_keys


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from redis_server(tmp_path_factory.mktemp("redis"))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_request_bucket_admits_the_limit_then_says_when_to_retry(redis: RedisServer) -> None:
    async def go() -> list[Any]:
        store = RedisStore(redis.address)
        keys = bucket_keys("t/p", "req", "20261202")
        try:
            return [await store.admit(keys, 5, 0) for _ in range(6)]
        finally:
            await store.aclose()

    verdicts = run(go())
    assert [v.allowed for v in verdicts] == [True] * 5 + [False]
    assert verdicts[-1].limit == "requests"
    assert 0 < verdicts[-1].retry_after_ms <= 12_000  # 5 a minute: one back within 12 s


def test_tokens_are_charged_after_the_fact_and_spend_adds_up(redis: RedisServer) -> None:
    async def go() -> tuple[bool, bool, str, int]:
        store = RedisStore(redis.address)
        keys = bucket_keys("t/p", "tok", "20261202")
        try:
            first = await store.admit(keys, 0, 10)
            await store.charge(keys, 10, 15, 100)
            await store.charge(keys, 10, 0, 250)
            second = await store.admit(keys, 0, 10)
            return first.allowed, second.allowed, second.limit, second.spent_nano
        finally:
            await store.aclose()

    assert run(go()) == (True, False, "tokens", 350)


def test_a_flushed_script_cache_is_loaded_again(redis: RedisServer) -> None:
    async def go() -> bool:
        store = RedisStore(redis.address)
        try:
            await store.admit(bucket_keys("t/p", "flush", "d"), 5, 0)
            redis.command("SCRIPT", "FLUSH")
            return (await store.admit(bucket_keys("t/p", "flush", "d"), 5, 0)).allowed
        finally:
            await store.aclose()

    assert run(go())


def test_unreachable_store_falls_back_to_per_replica_limits_or_fails_closed(tmp_path: Path) -> None:
    down = RedisServer(tmp_path)
    down.kill()

    async def go() -> tuple[list[bool], bool]:
        keys = bucket_keys("t/p", "x", "d")
        fallback = Limiter(down.address, replicas=2, fail_closed=False)
        closed = Limiter(down.address, replicas=2, fail_closed=True)
        try:
            allowed = [(await fallback.admit(keys, 4, 0)).allowed for _ in range(3)]
            try:
                await closed.admit(keys, 4, 0)
                refused = False
            except StoreUnavailable:
                refused = True
            return allowed, refused and not fallback.store_up
        finally:
            await fallback.aclose()
            await closed.aclose()

    allowed, closed_refused = run(go())
    assert allowed == [True, True, False]  # 4 a minute over 2 replicas: 2 here
    assert closed_refused


# --- two router processes --------------------------------------------------------------------------------------

RPM = 120
KEY = "sk-shared-tenant-key"


@pytest.fixture(scope="module")
def tier() -> Iterator[dict[str, FakeProcess]]:
    yield from fake_tiers({"only": FakeProcess("only-model", name="only")})


def _policy(url: str, redis_address: str) -> dict[str, Any]:
    return {
        "apiVersion": "tiergate.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "shared", "namespace": "test"},
        "spec": {
            "tiers": [
                {
                    "name": "only",
                    "model": "only-model",
                    "servedModelName": "only-model",
                    "endpoint": {"url": url},
                    "price": {"inputPerMillion": 1, "outputPerMillion": 2},
                }
            ],
            "router": {"replicas": 2},
            "tenants": [
                {
                    "name": "team-a",
                    "apiKeySecretRef": {"name": "team-a-key", "key": "apiKey"},
                    "limits": {"requestsPerMinute": RPM},
                }
            ],
            "limitStore": {"redisAddress": redis_address},
        },
    }


@pytest.fixture
def routers(tier: dict[str, FakeProcess], redis: RedisServer, tmp_path: Path) -> Iterator[list[Serve]]:
    redis.command("FLUSHALL")
    pol = tmp_path / "policy.yaml"
    pol.write_text(yaml.safe_dump(_policy(tier["only"].base_url, redis.address)))
    env = {"TIERGATE_TENANT_KEY_TEAM_A": KEY}
    started: list[Serve] = []
    try:
        for _ in range(2):
            started.append(Serve("-f", str(pol), env=env))
        yield started
    finally:
        for s in started:
            s.stop()


def _hammer(routers: list[Serve], total: int, threads: int = 8) -> tuple[int, int, list[str]]:
    """`total` requests spread over both routers from `threads` threads: (admitted, refused with 429, anything
    else that happened, which must stay empty: no request may be lost)."""
    counts = {"ok": 0, "429": 0}
    other: list[str] = []
    lock = threading.Lock()
    clients = [
        openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key=KEY, max_retries=0, timeout=30) for s in routers
    ]

    def worker(i: int) -> None:
        for n in range(i, total, threads):
            c = clients[n % len(clients)]
            try:
                c.chat.completions.create(model="tiergate", messages=[{"role": "user", "content": "x"}], max_tokens=1)
                kind = "ok"
            except openai.RateLimitError as e:
                kind = "429" if int(e.response.headers.get("Retry-After", "0")) >= 1 else "429 without Retry-After"
            except Exception as e:
                with lock:
                    other.append(repr(e))
                continue
            with lock:
                if kind in counts:
                    counts[kind] += 1
                else:
                    other.append(kind)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return counts["ok"], counts["429"], other


def _refill(seconds: float) -> float:
    """Requests the bucket regains in `seconds` (it refills continuously at RPM per minute)."""
    return RPM * seconds / 60


@pytest.mark.slow
def test_two_routers_sharing_redis_hold_the_limit_under_concurrent_load(routers: list[Serve]) -> None:
    t0 = time.monotonic()
    admitted, refused, other = _hammer(routers, 3 * RPM)
    elapsed = time.monotonic() - t0
    assert other == []
    assert admitted + refused == 3 * RPM
    # A full bucket (one minute's worth) plus what refilled while the load ran; within 5 % of the limit.
    assert RPM <= admitted <= RPM + _refill(elapsed) + 0.05 * RPM
    for s in routers:
        assert "tiergate_router_limit_store_up 1.0" in s.metrics()


@pytest.mark.slow
def test_redis_killed_mid_run_falls_back_per_replica_then_recovers(routers: list[Serve], redis: RedisServer) -> None:
    t0 = time.monotonic()
    admitted, _, other = _hammer(routers, RPM // 2)
    assert other == []
    assert admitted == RPM // 2  # half the bucket: all admitted, through Redis
    redis.kill()
    # Redis down: each router admits at most its share (RPM / 2 replicas) plus its refill; nothing is lost.
    admitted_down, refused_down, other = _hammer(routers, 2 * RPM)
    assert other == []
    down_elapsed = time.monotonic() - t0
    assert admitted_down + refused_down == 2 * RPM
    # The documented bound: during an outage at most one more minute's worth (each replica's full share).
    # Each replica starts the outage with a full bucket of its share and gets more requests than that.
    assert RPM <= admitted_down <= RPM + _refill(down_elapsed) + 0.05 * RPM
    for s in routers:
        assert "tiergate_router_limit_store_up 0.0" in s.metrics()
    redis.start()
    # Recovery: the next admission reaches Redis again (a down store is retried at most once a second).
    for s in routers:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key=KEY, max_retries=0)

        def back(c: openai.OpenAI = c, s: Serve = s) -> bool:
            with contextlib.suppress(openai.RateLimitError):
                c.chat.completions.create(model="tiergate", messages=[{"role": "user", "content": "x"}], max_tokens=1)
            return "tiergate_router_limit_store_up 1.0" in s.metrics()

        wait_for("the router to use Redis again", back, interval=0.3)
    # Redis restarted empty (no persistence): a full bucket again, shared by both routers.
    t1 = time.monotonic()
    admitted_after, _, other = _hammer(routers, 2 * RPM)
    assert other == []
    # Less the (at most two) recovery probes that reached it; plus what refilled meanwhile.
    assert RPM - 2 <= admitted_after <= RPM + _refill(time.monotonic() - t1) + 0.05 * RPM


def test_a_late_answer_on_a_dropped_connection_never_answers_the_next_one() -> None:
    """The RESP client drops a connection whose answer does not come in time; an answer that comes afterwards must
    not be matched to a command of the new connection."""
    from tiergate.resp import RedisConnection, RedisUnavailable

    async def go() -> tuple[bool, Any, Any]:
        release = asyncio.Event()
        connections = 0

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            first = connections == 1
            while header := await reader.readline():  # *N, then a length line and a value line per argument
                args = []
                for _ in range(int(header[1:])):
                    await reader.readline()
                    args.append((await reader.readline()).strip())
                if args == [b"PING"]:
                    if first:
                        await release.wait()
                        writer.write(b"+LATE\r\n")
                    else:
                        writer.write(b"+PONG\r\n")
                    await writer.drain()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = RedisConnection(f"127.0.0.1:{port}", timeout_s=0.2, retry_s=0.0)
        try:
            try:
                await conn.execute("PING")
                timed_out = False
            except RedisUnavailable:
                timed_out = True
            second = await conn.execute("PING")
            release.set()
            third = await conn.execute("PING")
            return timed_out, second, third
        finally:
            await conn.aclose()
            server.close()

    assert run(go()) == (True, "PONG", "PONG")


def test_an_outage_continues_the_days_spend_from_what_redis_said(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)

    async def go() -> tuple[int, int, int]:
        keys = bucket_keys("t/p", "spender", "d")
        lim = Limiter(server.address, replicas=2, fail_closed=False)
        try:
            await lim.charge(keys, 0, 0, 1000)
            seen = (await lim.admit(keys, 0, 0)).spent_nano
            server.kill()
            during = (await lim.admit(keys, 0, 0)).spent_nano
            await lim.charge(keys, 0, 0, 10)  # counted here, times the 2 replicas
            after = (await lim.admit(keys, 0, 0)).spent_nano
            return seen, during, after
        finally:
            await lim.aclose()
            server.kill()

    assert run(go()) == (1000, 1000, 1020)


@pytest.mark.slow
def test_serve_policy_reload_refuses_a_removed_tenant_at_once(tier: dict[str, FakeProcess], tmp_path: Path) -> None:
    """The real reload path of `tiergate serve -f` (the policy file the operator mounts): a tenant taken out of the
    policy is refused from the reload on, the others keep their keys (TIERGATE_TENANT_KEY_<NAME>, local mode)."""
    from tests.support.router_serve import RELOADED_ONCE
    from tests.support.waiting import write_atomically

    doc = _policy(tier["only"].base_url, "127.0.0.1:1")
    del doc["spec"]["limitStore"]
    doc["spec"]["tenants"].append({"name": "team-b", "apiKeySecretRef": {"name": "b", "key": "apiKey"}})
    pol = tmp_path / "policy.yaml"
    pol.write_text(yaml.safe_dump(doc))
    s = Serve("-f", str(pol), env={"TIERGATE_TENANT_KEY_TEAM_A": KEY, "TIERGATE_TENANT_KEY_TEAM_B": "sk-b"})
    try:
        b = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="sk-b", max_retries=0)
        a = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key=KEY, max_retries=0)
        msg: list[Any] = [{"role": "user", "content": "x"}]
        assert b.chat.completions.create(model="tiergate", messages=msg).choices
        doc["spec"]["tenants"].pop()
        write_atomically(pol, yaml.safe_dump(doc))
        wait_for("the policy reloaded", lambda: RELOADED_ONCE in s.metrics(), interval=0.2)
        with pytest.raises(openai.AuthenticationError):
            b.chat.completions.create(model="tiergate", messages=msg)
        assert a.chat.completions.create(model="tiergate", messages=msg).choices
    finally:
        s.stop()


def test_operator_writes_todays_spend_per_tenant_into_the_status(redis: RedisServer) -> None:
    """What the routers counted (the same keys), read by the operator's reporter and written as status.tenants."""
    import datetime as dt

    from tiergate.api.policy import parse_policy
    from tiergate_operator.tenant_spend import SpendReporter, spend_entries

    doc = _policy("http://only:8000/v1", redis.address)
    doc["metadata"]["uid"] = "u"
    doc["spec"]["tenants"][0]["budget"] = {"dailyUsd": "0.000002", "lowRemainingBasisPoints": 5000}
    doc["spec"]["tenants"].append(
        {"name": "idle", "apiKeySecretRef": {"name": "i", "key": "k"}, "budget": {"dailyUsd": "3"}}
    )
    doc["spec"]["tenants"].append({"name": "no-budget", "apiKeySecretRef": {"name": "n", "key": "k"}})
    day = dt.date(2026, 12, 2)

    async def charge() -> None:
        lim = Limiter(redis.address, replicas=2, fail_closed=False)
        try:  # what a router charges for team-a today: 1.5 micro-dollars of 2
            await lim.charge(bucket_keys("test/shared", "team-a", "20261202"), 0, 0, 1500)
        finally:
            await lim.aclose()

    class FakeKube:
        def __init__(self) -> None:
            self.patches: list[tuple[str, str, str, dict[str, Any]]] = []

        def patch_status(self, kind: str, ns: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
            self.patches.append((kind, ns, name, status))
            return {}

    redis.command("FLUSHALL")
    run(charge())
    kube = FakeKube()
    reporter = SpendReporter(kube, lambda: [doc], today=lambda: day)  # type: ignore[arg-type]

    async def twice() -> tuple[int, int]:
        try:
            return await reporter.report_all(), await reporter.report_all()
        finally:
            for conn in reporter._conns.values():
                await conn.aclose()

    assert run(twice()) == (1, 0)  # the second pass finds nothing new to write
    expected = [
        {"name": "team-a", "day": "2026-12-02", "spentUsd": "0.0000015", "dailyUsd": "0.000002", "state": "Low"},
        {"name": "idle", "day": "2026-12-02", "spentUsd": "0", "dailyUsd": "3", "state": "Ok"},
    ]
    assert kube.patches == [("RoutingPolicy", "test", "shared", {"tenants": expected})]
    policy = parse_policy(doc)
    assert spend_entries(policy, {"team-a": 2000}, day)[0]["state"] == "Spent"
    status = parse_policy({**doc, "status": {"tenants": expected}}).status
    assert status is not None
    assert [t.name for t in status.tenants] == ["team-a", "idle"]
