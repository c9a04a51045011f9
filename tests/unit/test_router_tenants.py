"""Tenants at the router's front door, through the official `openai` client and the gRPC client: API keys (401),
allowed tiers (403), request and token limits (429 with Retry-After), the daily budget routing cheaper and then
refusing or serving the cheapest tier, key rotation and tenant removal without a restart.

Counters here are the router's own (no limit store): the Redis-backed ones are in test_router_tenants_redis.py.
Harness tier prices (USD per million tokens): small 1 in / 2 out, large 4 / 8; the fake tiers answer
max_tokens (at most 8) completion tokens for a prompt of one token per word.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import openai
import pytest

from tests.support.harness import Harness
from tests.support.router_serve import free_port
from tests.support.waiting import wait_for, write_atomically
from tiergate_router._proto import router_pb2, router_pb2_grpc
from tiergate_router.tenants import BudgetConfig, Tenancy, TenantConfig

KEYS = {
    "alpha": "sk-alpha-0123456789",
    "rated": "sk-rated-0123456789",
    "tokens": "sk-tokens-0123456789",
    "thrifty": "sk-thrifty-0123456789",
    "frugal": "sk-frugal-0123456789",
    "grpc-rated": "sk-grpc-0123456789",
    "rotating": "sk-rotating-old",
    "leaving": "sk-leaving-0123456789",
    "streamer": "sk-streamer-0123456789",
    "grpc-tokens": "sk-grpc-tokens-0123456789",
}
# 200 micro-dollars a day; low below half of it.
BUDGET = BudgetConfig(daily_nano_usd=200_000, low_remaining_bp=5000)


def tenancy(keys_dir: Path, *, without: str | None = None) -> Tenancy:
    tenants = (
        TenantConfig("alpha", tiers=frozenset({"small"})),
        TenantConfig("rated", requests_per_minute=3),
        TenantConfig("tokens", tokens_per_minute=10),
        TenantConfig("thrifty", budget=BUDGET),
        TenantConfig("frugal", budget=dataclasses.replace(BUDGET, refuse_when_spent=False)),
        TenantConfig("grpc-rated", tiers=frozenset({"small"}), requests_per_minute=1),
        TenantConfig("rotating"),
        TenantConfig("leaving"),
        TenantConfig("streamer", tokens_per_minute=10),
        TenantConfig("grpc-tokens", tokens_per_minute=10),
    )
    return Tenancy(
        tenants=tuple(t for t in tenants if t.name != without), allow_unauthenticated=False, keys_dir=keys_dir
    )


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tenant-keys")
    for name, key in KEYS.items():
        (d / name).write_text(key + "\n")
    return d


@pytest.fixture(scope="module")
def harness(keys_dir: Path) -> Iterator[Harness]:
    h = Harness(config_overrides={"tenancy": tenancy(keys_dir)}).start()
    yield h
    h.stop()


def client(h: Harness, key: str) -> openai.OpenAI:
    # max_retries=0: the client would otherwise wait out Retry-After and try again by itself.
    return openai.OpenAI(base_url=f"{h.url}/v1", api_key=key, max_retries=0)


def ask(h: Harness, tenant: str, content: str = "HARD", model: str = "tiergate") -> str:
    raw = client(h, KEYS[tenant]).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=8
    )
    return str(raw.headers["x-tiergate-tier"])


def post_without_key(h: Harness, content: str = "hi") -> tuple[int, Mapping[str, str]]:
    body = {"model": "tiergate", "messages": [{"role": "user", "content": content}]}
    req = urllib.request.Request(
        f"{h.url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


def test_no_key_and_a_wrong_key_are_401(harness: Harness) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        client(harness, "sk-not-a-tenant").chat.completions.create(
            model="tiergate", messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"
    assert "sk-not-a-tenant" not in str(e.value)
    # The openai client always sends a key; a raw request without one:
    status, headers = post_without_key(harness)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert harness.metric("tiergate_router_tenant_refusals_total", {"tenant": "none", "reason": "invalid_key"}) >= 1


def test_a_tier_the_tenant_may_not_use_is_403_naming_tier_and_tenant(harness: Harness) -> None:
    with pytest.raises(openai.PermissionDeniedError) as e:
        ask(harness, "alpha", model="large")
    assert e.value.status_code == 403
    assert "'large'" in e.value.message
    assert "'alpha'" in e.value.message
    # Routed requests stay on its tiers, however hard the prompt; a tier it may use can be named.
    assert ask(harness, "alpha", "HARD") == "small"
    assert ask(harness, "alpha", model="small") == "small"
    # Another tenant gets the strong tier for the same prompt.
    assert ask(harness, "rotating", "HARD") == "large"


def test_over_the_request_limit_is_429_with_retry_after(harness: Harness) -> None:
    for _ in range(3):
        ask(harness, "rated", "easy")
    with pytest.raises(openai.RateLimitError) as e:
        ask(harness, "rated", "easy")
    assert e.value.status_code == 429
    retry = int(e.value.response.headers["Retry-After"])
    assert 1 <= retry <= 20  # 3 a minute: one back every 20 s
    assert e.value.response.headers["x-tiergate-limit"] == "requests_per_minute"
    assert "3 requests per minute" in e.value.message
    labels = {"tenant": "rated", "reason": "requests_per_minute"}
    assert harness.metric("tiergate_router_tenant_refusals_total", labels) == 1
    assert harness.metric("tiergate_router_tenant_requests_total", {"tenant": "rated"}) == 3


def test_over_the_token_limit_is_429_after_the_tokens_are_counted(harness: Harness) -> None:
    ask(harness, "tokens", "one")  # 1 + 8 tokens of 10
    ask(harness, "tokens", "two")  # one left, so admitted; now 8 in debt
    with pytest.raises(openai.RateLimitError) as e:
        ask(harness, "tokens", "three")
    assert e.value.response.headers["x-tiergate-limit"] == "tokens_per_minute"
    assert int(e.value.response.headers["Retry-After"]) == 54  # 9 tokens at 10 a minute
    assert harness.metric("tiergate_router_tenant_tokens_total", {"tenant": "tokens", "kind": "completion"}) == 16


def test_streamed_tokens_count_too(harness: Harness) -> None:
    c = client(harness, KEYS["streamer"])
    for _ in range(2):  # 9 tokens each, reported in the stream's last chunk
        stream = c.chat.completions.create(
            model="tiergate",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        assert [chunk.usage.total_tokens for chunk in stream if chunk.usage is not None] == [9]
    # A stream is charged after its last byte went out: wait until it was, rather than race the next request.
    labels = {"tenant": "streamer", "kind": "completion"}
    wait_for("both streams charged", lambda: harness.metric("tiergate_router_tenant_tokens_total", labels) == 16)
    with pytest.raises(openai.RateLimitError) as e:
        ask(harness, "streamer", "x")
    assert e.value.response.headers["x-tiergate-limit"] == "tokens_per_minute"


def _spend_until(harness: Harness, tenant: str) -> list[str]:
    """Tiers answering HARD prompts for `tenant` until its budget is spent (the 7th request is past it)."""
    return [ask(harness, tenant, "HARD") for _ in range(6)]


def test_budget_low_routes_cheaper_then_refuses_when_spent(harness: Harness) -> None:
    # large costs 68 micro-dollars here, small 17: 68, 136 (low from here: < 100 left), then small up to 204.
    assert _spend_until(harness, "thrifty") == ["large", "large", "small", "small", "small", "small"]
    assert harness.metric("tiergate_router_tenant_budget_state", {"tenant": "thrifty"}) == 1
    with pytest.raises(openai.RateLimitError) as e:
        ask(harness, "thrifty", "HARD")
    assert e.value.code == "budget_exceeded"
    assert e.value.response.headers["x-tiergate-limit"] == "daily_budget"
    assert 1 <= int(e.value.response.headers["Retry-After"]) <= 86_400
    spend = harness.metric("tiergate_router_tenant_spend_dollars_total", {"tenant": "thrifty"})
    assert spend == pytest.approx(204 / 1e6)


def test_budget_spent_with_cheapest_tier_keeps_serving_the_cheapest(harness: Harness) -> None:
    assert _spend_until(harness, "frugal") == ["large", "large", "small", "small", "small", "small"]
    client_ = client(harness, KEYS["frugal"])
    raw = client_.chat.completions.with_raw_response.create(
        model="large", messages=[{"role": "user", "content": "HARD"}], max_tokens=8
    )
    assert raw.headers["x-tiergate-tier"] == "small"
    assert raw.headers["x-tiergate-decision"] == "budget_spent"
    assert harness.metric("tiergate_router_tenant_budget_state", {"tenant": "frugal"}) == 2


def test_grpc_refusals(harness: Harness) -> None:
    with grpc.insecure_channel(harness.grpc_target) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        req = router_pb2.GenerateRequest(prompt="HARD", max_tokens=2)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req, metadata=(("authorization", "Bearer sk-wrong"),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        auth = (("authorization", f"Bearer {KEYS['grpc-rated']}"),)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(router_pb2.GenerateRequest(prompt="HARD", tier="large"), metadata=auth)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'large'" in (e.value.details() or "")
        assert "'grpc-rated'" in (e.value.details() or "")
        assert stub.Generate(req, metadata=auth).tier == "small"  # the one request a minute
        with pytest.raises(grpc.RpcError) as e:
            list(stub.GenerateStream(req, metadata=auth))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(e.value.trailing_metadata() or ())
        assert 1 <= int(trailers["retry-after"]) <= 60
        assert trailers["x-tiergate-limit"] == "requests_per_minute"


def test_grpc_token_limit(harness: Harness) -> None:
    with grpc.insecure_channel(harness.grpc_target) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        auth = (("authorization", f"Bearer {KEYS['grpc-tokens']}"),)
        req = router_pb2.GenerateRequest(prompt="x", max_tokens=8)
        assert stub.Generate(req, metadata=auth).usage.completion_tokens == 8  # 9 of 10 tokens
        stub.Generate(req, metadata=auth)  # one token left: admitted, then 8 in debt
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req, metadata=auth)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(e.value.trailing_metadata() or ())
        assert trailers["x-tiergate-limit"] == "tokens_per_minute"
        assert int(trailers["retry-after"]) == 54


def test_a_rotated_key_takes_effect_without_a_restart(harness: Harness, keys_dir: Path) -> None:
    assert ask(harness, "rotating", "easy") == "small"
    write_atomically(keys_dir / "rotating", "sk-rotating-new\n")
    old = client(harness, "sk-rotating-old")

    def old_refused() -> bool:
        try:
            old.chat.completions.create(model="tiergate", messages=[{"role": "user", "content": "x"}])
        except openai.AuthenticationError:
            return True
        return False

    wait_for("the old key refused", old_refused, interval=0.1)
    new = client(harness, "sk-rotating-new")
    assert new.chat.completions.create(model="tiergate", messages=[{"role": "user", "content": "x"}]).choices


def test_a_tenant_removed_from_the_policy_is_refused_at_once(harness: Harness, keys_dir: Path) -> None:
    assert ask(harness, "leaving", "easy") == "small"
    assert harness.server is not None
    server = harness.server
    cfg = dataclasses.replace(server.router.config, tenancy=tenancy(keys_dir, without="leaving"))

    async def apply() -> None:
        server._apply(cfg)

    harness.call(apply())
    with pytest.raises(openai.AuthenticationError):
        ask(harness, "leaving", "easy")
    assert ask(harness, "alpha", "easy") == "small"


def test_allowed_unauthenticated_access_and_a_store_that_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "closed").write_text("sk-closed-key")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    t = Tenancy(
        tenants=(TenantConfig("closed", requests_per_minute=10),),
        allow_unauthenticated=True,
        redis_address=dead,
        fail_closed=True,
        keys_dir=tmp_path,
    )
    h = Harness(config_overrides={"tenancy": t}, grpc=False).start()
    try:
        # No key: served (the policy says Allow), on every tier; a key that is sent must be valid.
        status, headers = post_without_key(h, "HARD")
        assert (status, headers["x-tiergate-tier"]) == (200, "large")
        with pytest.raises(openai.AuthenticationError):
            client(h, "sk-wrong").chat.completions.create(model="tiergate", messages=[{"role": "user", "content": "x"}])
        # The tenant's limits cannot be checked and the policy fails closed: 503 with Retry-After.
        with pytest.raises(openai.InternalServerError) as e:
            client(h, "sk-closed-key").chat.completions.create(
                model="tiergate", messages=[{"role": "user", "content": "x"}]
            )
        assert e.value.status_code == 503
        assert e.value.response.headers["Retry-After"] == "1"
        assert h.metric("tiergate_router_limit_store_up") == 0
    finally:
        h.stop()


def test_n_tier_choice_keeps_to_the_tenants_tiers_and_cost_weight(tmp_path: Path) -> None:
    from tests.support.artifacts import constant_multi_tier_artifact
    from tiergate.routing.artifact import load_artifact
    from tiergate_router.config import MultiTier, RouterConfig, TierConfig
    from tiergate_router.router import Router
    from tiergate_router.tenants import Access

    path = constant_multi_tier_artifact(tmp_path / "m.json", [("a", 0.1), ("b", 1.0), ("c", 2.0)], [0.5, 0.7, 0.9])
    tiers = tuple(TierConfig(n, base_urls=(f"http://{n}:1/v1",)) for n in "abc")
    cfg = RouterConfig(
        tiers=tiers,
        thresholds_bp=(3333, 6667),
        multi_tier=MultiTier(load_artifact(path), (0, 1, 2), 0, (0.1, 1.0, 2.0)),
    )
    verdict = (0.5, 0.7, 0.9)
    assert Router._decide(verdict, cfg)[0] == "c"  # quality alone
    assert Router._decide(verdict, cfg, Access(tiers=frozenset({"a", "b"})))[0] == "b"
    # A tighter cost weight (the tenant's, or its budget's while low): 0.9 - 0.5 * 2 < 0.5 - 0.5 * 0.1
    assert Router._decide(verdict, cfg, Access(cost_weight_bp=5000))[0] == "a"


def test_budget_states() -> None:
    from tiergate_router.tenants import budget_access

    low_weight = TenantConfig("t", budget=dataclasses.replace(BUDGET, low_cost_weight_bp=4000))
    assert budget_access(low_weight, 99_999) == ("ok", None)  # 100_001 of 200_000 left: not below half
    state, access = budget_access(low_weight, 100_001)
    assert state == "low"
    assert access is not None
    assert access.cost_weight_bp == 4000
    assert not access.cheaper
    state, access = budget_access(TenantConfig("t", budget=BUDGET), 100_001)
    assert access is not None
    assert access.cheaper
    assert budget_access(TenantConfig("t", budget=BUDGET), 200_000)[0] == "spent"
    assert budget_access(TenantConfig("t"), 10**12) == ("ok", None)
