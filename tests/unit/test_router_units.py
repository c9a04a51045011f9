"""Pure parts of the router: breaker, decisions, endpoint selection, micro-batching, config and policy
conversion, EndpointSlice parsing, validation helpers, the policy watcher."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tiergate.api.policy import load_policy
from tiergate_router.breaker import BreakerState, CircuitBreaker
from tiergate_router.classifier import MicroBatcher
from tiergate_router.config import (
    RouterConfig,
    ServiceRef,
    TierConfig,
    from_policy,
    local_config,
    parse_tier_flag,
)
from tiergate_router.decision import choose_tier, fallback_chain
from tiergate_router.discovery import slice_urls
from tiergate_router.dispatch import parse_waiting
from tiergate_router.errors import ClassifierError, ConfigError
from tiergate_router.policy_watch import PolicyWatcher
from tiergate_router.pool import TierPool
from tiergate_router.router import SSEUsageScanner

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=3, open_s=5.0, clock=clock)
    for _ in range(2):
        assert b.acquire()
        b.record_failure()
    b.record_success()  # a success resets the count
    for _ in range(3):
        assert b.acquire()
        b.record_failure()
    assert b.state is BreakerState.OPEN
    assert not b.acquire()
    clock.t = 5.0
    assert b.state is BreakerState.HALF_OPEN
    assert b.acquire()  # the one probe
    assert not b.acquire()  # nobody else while it is in flight
    b.record_failure()  # failed probe: open again for another period
    assert b.state is BreakerState.OPEN
    clock.t = 10.0
    assert b.acquire()
    b.record_success()
    assert b.state is BreakerState.CLOSED


def test_breaker_release_frees_the_probe_without_judging() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=1, open_s=1.0, clock=clock)
    b.record_failure()
    clock.t = 1.0
    assert b.acquire()
    b.release()
    assert b.acquire()


@pytest.mark.parametrize(
    ("score", "thresholds", "expected"),
    [
        (0.0, (5000,), "a"),
        (0.4999, (5000,), "a"),
        (0.5, (5000,), "b"),
        (1.0, (5000,), "b"),
        (0.3, (3000, 7000), "b"),
        (0.2999, (3000, 7000), "a"),
        (0.7, (3000, 7000), "c"),
        (1.5, (3000, 7000), "c"),
        (-1.0, (0,), "b"),
        # Exact comparison, as the artifact was calibrated (operating_points.reaches): no rounding to basis points,
        # so a score a fraction of a basis point under the threshold stays under it.
        (0.99995, (10000,), "a"),
        (0.9999, (10000,), "a"),
        (1.0, (10000,), "b"),
        (0.57, (5700,), "b"),
        (0.56995, (5700,), "a"),
    ],
)
def test_choose_tier(score: float, thresholds: tuple[int, ...], expected: str) -> None:
    names = ["a", "b", "c"][: len(thresholds) + 1]
    assert choose_tier(score, names, thresholds) == expected


def test_fallback_chain_default_and_explicit() -> None:
    tiers = ["s", "m", "l"]
    assert fallback_chain("s", tiers) == ["s", "m", "l"]
    assert fallback_chain("m", tiers) == ["m", "l", "s"]
    assert fallback_chain("l", tiers) == ["l", "m", "s"]
    assert fallback_chain("s", tiers, ["l", "s", "m"]) == ["s", "l", "m"]


def test_pool_least_outstanding_and_breaker_skip() -> None:
    pool = TierPool("t", breaker_failures=1, breaker_open_s=10.0, clock=Clock())
    pool.set_static(["http://a/v1", "http://b/v1", "http://c/v1"])
    a = pool.pick()
    assert a is not None
    a.outstanding = 5
    b = pool.pick()
    assert b is not None
    assert b.base_url != a.base_url
    b.outstanding = 1
    c = pool.pick()
    assert c is not None
    assert c.base_url not in (a.base_url, b.base_url)
    c.breaker.record_failure()  # open
    nxt = pool.pick()
    assert nxt is b  # least outstanding among admitted
    assert pool.pick(exclude={b.base_url, a.base_url}) is None
    # removal keeps the object for requests in flight, marks it
    pool.set_static(["http://a/v1"])
    assert b.removed
    assert [ep.base_url for ep in pool.endpoints] == ["http://a/v1"]
    assert pool.endpoints[0] is a


def test_pool_saturation() -> None:
    pool = TierPool("t", breaker_failures=1, breaker_open_s=10.0)
    pool.set_static(["http://a/v1", "http://b/v1"])
    eps = pool.endpoints
    assert not pool.saturated(2, 0)
    eps[0].outstanding = 2
    assert not pool.saturated(2, 0)
    eps[1].outstanding = 2
    assert pool.saturated(2, 0)
    assert not pool.saturated(0, 0)
    eps[0].outstanding = eps[1].outstanding = 0
    eps[0].waiting = eps[1].waiting = 7
    assert pool.saturated(0, 5)


def test_microbatcher_batches_concurrent_prompts_and_caches() -> None:
    calls: list[list[str]] = []

    def scorer(prompts: Any) -> list[float]:
        calls.append(list(prompts))
        return [len(p) / 100 for p in prompts]

    async def main() -> tuple[list[list[float]], list[float]]:
        mb = MicroBatcher(scorer, max_batch=64, max_wait_s=0.01)
        first = await asyncio.gather(*(mb.score([f"p{i}"]) for i in range(20)), mb.score(["p1"]))
        cached = await mb.score(["p3", "p3"])
        await mb.aclose()
        return list(first), cached

    first, cached = asyncio.run(main())
    assert first[5] == [0.02]
    assert len(calls) == 1  # one batch for 21 concurrent requests
    assert sorted(calls[0]) == sorted(f"p{i}" for i in range(20))  # duplicates scored once
    assert cached == [0.02, 0.02]
    assert len(calls) == 1  # served from the cache


def test_microbatcher_failure_fails_the_batch_not_the_worker() -> None:
    n = {"calls": 0}

    def scorer(prompts: Any) -> list[float]:
        n["calls"] += 1
        if n["calls"] == 1:
            raise RuntimeError("boom")
        return [0.5] * len(prompts)

    async def main() -> list[float]:
        mb = MicroBatcher(scorer, max_wait_s=0)
        with pytest.raises(ClassifierError, match="boom"):
            await mb.score(["x"])
        out = await mb.score(["y"])
        await mb.aclose()
        return out

    assert asyncio.run(main()) == [0.5]


def test_config_validation_names_the_field() -> None:
    t = TierConfig(name="a", base_urls=("http://x/v1",))
    with pytest.raises(ConfigError, match="tiers: at least one"):
        RouterConfig(tiers=())
    with pytest.raises(ConfigError, match=r"tiers\[1\].name: duplicate"):
        RouterConfig(tiers=(t, t))
    with pytest.raises(ConfigError, match="ending in /v1"):
        RouterConfig(tiers=(TierConfig(name="a", base_urls=("http://x/v2",)),), thresholds_bp=())
    with pytest.raises(ConfigError, match=r"thresholds_bp\[0\]: 12000"):
        RouterConfig(tiers=(t, TierConfig(name="b", base_urls=("http://y/v1",))), thresholds_bp=(12000,))
    with pytest.raises(ConfigError, match="needs an endpoint URL or a service"):
        RouterConfig(tiers=(TierConfig(name="a"),), thresholds_bp=())
    with pytest.raises(ConfigError, match=r"fallback_order\[0\]: unknown tier 'z'"):
        RouterConfig(tiers=(t,), thresholds_bp=(), fallback_order=("z",))
    with pytest.raises(ConfigError, match="reserved"):
        RouterConfig(tiers=(TierConfig(name="tiergate", base_urls=("http://x/v1",)),), thresholds_bp=())


def test_tier_flags() -> None:
    assert parse_tier_flag("small=http://127.0.0.1:8001/v1/") == ("small", "http://127.0.0.1:8001/v1")
    for bad in ("small", "=http://x/v1", "small=", "small=ftp://x/v1", "small=http://x/"):
        with pytest.raises(ConfigError):
            parse_tier_flag(bad)
    assert local_config([("s", "http://a/v1"), ("l", "http://c/v1")], threshold_bp=4100).thresholds_bp == (4100,)
    # Three tiers under a two-tier artifact: nothing calibrates the middle one (test_router_config has the rest).
    with pytest.raises(ConfigError, match=r"--tier: 3 tiers, .* so m would never be chosen"):
        local_config([("s", "http://a/v1"), ("m", "http://b/v1"), ("l", "http://c/v1")])


class _Thresholds:
    default_threshold_bp = 4200

    def threshold_for_share_bp(self, share_bp: int) -> int:
        return 10000 - share_bp


def test_from_policy_on_the_committed_sample() -> None:
    policy = load_policy(ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml")
    cfg = from_policy(policy, namespace="prod", thresholds=_Thresholds())
    assert cfg.tier_names == tuple(t.name for t in policy.spec.tiers)
    first = cfg.tiers[0]
    assert first.served_model == policy.spec.tiers[0].model_name
    assert first.base_urls == (f"http://{policy.metadata.name}-tier-{first.name}.prod.svc:8000/v1",)
    assert first.input_price_per_mtok == float(policy.spec.tiers[0].price.input_per_million)
    share = policy.spec.router.target_strong_share_basis_points
    assert share is not None
    assert cfg.thresholds_bp == (10000 - share,) * (len(cfg.tiers) - 1)
    assert cfg.fallback_order == tuple(policy.spec.effective_fallback_order())
    assert cfg.connect_timeout_s == policy.spec.router.timeouts.connect_seconds
    assert cfg.classifier_artifact is not None
    disc = from_policy(policy, namespace="prod", discovery=True, thresholds=_Thresholds())
    assert disc.tiers[0].service == ServiceRef(
        namespace="prod", name=f"{policy.metadata.name}-tier-{first.name}", port=8000
    )
    assert disc.tiers[0].base_urls == ()
    with pytest.raises(ConfigError, match="calibration"):
        from_policy(policy)


def _slice(ports: list[int], endpoints: list[tuple[list[str], bool | None, bool | None]]) -> Any:
    ns = SimpleNamespace
    return ns(
        ports=[ns(port=p, name="http") for p in ports],
        endpoints=[ns(addresses=a, conditions=ns(ready=r, terminating=t)) for a, r, t in endpoints],
    )


def test_slice_urls_uses_ready_non_terminating_endpoints() -> None:
    ref = ServiceRef(namespace="n", name="s", port=8000)
    slices = [
        _slice(
            [8000],
            [
                (["198.18.0.1"], True, None),
                (["198.18.0.2"], False, None),
                (["198.18.0.3"], None, None),
                (["198.18.0.4"], True, True),
            ],
        ),
        _slice([9000, 9001], [(["198.18.0.9"], True, None)]),  # no matching port: skipped
        _slice([8000], [(["fd00::1"], True, False)]),
    ]
    assert slice_urls(slices, ref) == [
        "http://198.18.0.1:8000/v1",
        "http://198.18.0.3:8000/v1",
        "http://[fd00::1]:8000/v1",
    ]


def test_sse_usage_scanner_across_split_chunks() -> None:
    s = SSEUsageScanner()
    stream = (
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":3,'
        b'"completion_tokens":2}}\n\ndata: [DONE]\n\n'
    )
    for i in range(0, len(stream), 7):
        s.feed(stream[i : i + 7])
    assert s.usage == {"prompt_tokens": 3, "completion_tokens": 2}
    assert s.events == 3


def test_parse_waiting() -> None:
    text = (
        '# HELP vllm:num_requests_waiting x\nvllm:num_requests_waiting{model_name="m"} 3.0\n'
        'vllm:num_requests_running{model_name="m"} 9.0\nvllm:num_requests_waiting{model_name="n"} 2\n'
    )
    assert parse_waiting(text) == 5
    assert parse_waiting("") == 0


def test_policy_watcher_applies_changes_and_keeps_last_good(tmp_path: Path) -> None:
    p = tmp_path / "policy"
    p.write_text("a")
    applied: list[str] = []
    results: list[str] = []

    def load(path: Path) -> RouterConfig:
        text = path.read_text()
        if text == "bad":
            raise ConfigError("spec.tiers[0].name: bad")
        return RouterConfig(tiers=(TierConfig(name=text, base_urls=("http://x/v1",)),), thresholds_bp=())

    w = PolicyWatcher(p, load, lambda c: applied.append(c.tiers[0].name), on_result=results.append)
    w.prime()
    assert not w.check_once()
    p.write_text("b")
    assert w.check_once()
    p.write_text("bad")
    assert not w.check_once()
    assert w.last_error is not None
    assert "spec.tiers[0].name" in w.last_error
    p.write_text("c")
    assert w.check_once()
    assert applied == ["b", "c"]
    assert results == ["success", "error", "success"]
