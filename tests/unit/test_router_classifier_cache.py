"""The classifier's result cache stays within its bounds whatever the prompts: keyed by a digest of the cut prompt,
counted in bytes (checked against the memory Python really allocates), sized by the policy and the command line."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Sequence
from typing import Any

import pytest

from tiergate.api.policy import RoutingPolicy
from tiergate_router.classifier import ENTRY_OVERHEAD_BYTES, MicroBatcher, ScoreCache, prompt_chars, prompt_key
from tiergate_router.cmd_serve import overrides
from tiergate_router.config import ConfigError, LocalOverrides, RouterConfig, apply_overrides, from_policy, tier_at
from tiergate_router.router import Router


def _retained(build: Any) -> tuple[Any, int]:
    """What `build()` returns and the bytes still allocated for it once it returned (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        obj = build()
        gc.collect()
        return obj, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("width", [0, 9], ids=["two-tier score", "9-tier qualities"])
def test_cache_real_memory_stays_within_its_byte_budget(width: int) -> None:
    budget = 64 * 1024

    def fill() -> ScoreCache[Any]:
        cache: ScoreCache[Any] = ScoreCache(max_entries=10**9, max_bytes=budget)
        for i in range(20_000):
            value = float(i) if width == 0 else tuple(float(i + j) for j in range(width))
            cache.put(prompt_key(f"prompt {i}"), value)
            if i % 3 == 0:  # hits reorder the LRU, as real traffic does
                cache.get(prompt_key(f"prompt {i // 2}"))
        return cache

    cache, real = _retained(fill)
    assert cache.bytes <= budget
    assert real <= budget, f"the cache holds {real} bytes of memory, its budget is {budget}"
    # The budget binds, and not far below it: the accounting is not wildly pessimistic either.
    assert cache.bytes > budget - 2 * (ENTRY_OVERHEAD_BYTES + 400)
    assert len(cache) < 20_000


def test_cache_entry_bound_and_lru_order() -> None:
    cache: ScoreCache[float] = ScoreCache(max_entries=3, max_bytes=10**9)
    for i in range(3):
        cache.put(prompt_key(str(i)), float(i))
    assert cache.get(prompt_key("0")) == 0.0  # 0 is now the most recent: 1 goes first
    cache.put(prompt_key("3"), 3.0)
    assert len(cache) == 3
    assert cache.get(prompt_key("1")) is None
    assert cache.get(prompt_key("0")) == 0.0
    cache.resize(1, 10**9)
    assert len(cache) == 1
    assert cache.get(prompt_key("0")) == 0.0
    cache.resize(0, 10**9)
    cache.put(prompt_key("4"), 4.0)
    assert len(cache) == 0
    assert cache.bytes == 0


class Recording:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, prompts: Sequence[str]) -> list[float]:
        self.seen.extend(prompts)
        return [0.25] * len(prompts)


def test_large_prompts_are_cut_before_scoring_and_never_kept() -> None:
    """Megabyte prompts: the scorer sees only their first `max_chars` characters, prompts that differ only after
    that share one verdict, and what the batcher keeps after scoring 100 distinct 1 MB prompts is the cache alone."""
    cut = prompt_chars(256)
    scorer = Recording()
    budget = 32 * 1024
    batcher: MicroBatcher[float] = MicroBatcher(scorer, max_chars=cut, cache_entries=10**6, cache_bytes=budget)

    async def run() -> None:
        head = "x" * cut
        assert await batcher.score([head + "tail one", head + "tail two"]) == [0.25, 0.25]
        assert scorer.seen == [head]  # one scoring: both prompts are the same to the encoder
        for i in range(100):
            await batcher.score([f"{i:08d}" + "y" * 1_000_000])
        await batcher.aclose()

    def go() -> MicroBatcher[float]:
        asyncio.run(run())
        scorer.seen.clear()
        return batcher

    _, real = _retained(go)
    assert batcher.cache.bytes <= budget
    # 100 MB of prompts went through; well under one of them stays.
    assert real < budget + 256 * 1024, f"{real} bytes retained"


def test_router_sizes_the_cache_from_its_config_and_on_reload() -> None:
    batcher: MicroBatcher[float] = MicroBatcher(Recording())
    cfg = RouterConfig(tiers=(tier_at("a", "http://a/v1"), tier_at("b", "http://b/v1")), classifier_cache_entries=7)
    router = Router(cfg, batcher)
    assert (batcher.cache.max_entries, batcher.cache.max_bytes) == (7, cfg.classifier_cache_bytes)
    router.apply_config(RouterConfig(tiers=cfg.tiers, classifier_cache_entries=5, classifier_cache_bytes=999))
    assert (batcher.cache.max_entries, batcher.cache.max_bytes) == (5, 999)
    with pytest.raises(ConfigError, match="classifier_cache"):
        RouterConfig(tiers=cfg.tiers, classifier_cache_bytes=-1)


PRICE = {"inputPerMillion": 1, "outputPerMillion": 2}


def _policy(cache: dict[str, Any] | None) -> RoutingPolicy:
    router: dict[str, Any] = {"thresholdBasisPoints": 5000}
    if cache is not None:
        router["classifierCache"] = cache
    return RoutingPolicy.model_validate(
        {
            "apiVersion": "tiergate.io/v1alpha1",
            "kind": "RoutingPolicy",
            "metadata": {"name": "p"},
            "spec": {
                "tiers": [
                    {"name": n, "model": n, "endpoint": {"url": f"http://{n}/v1"}, "price": PRICE}
                    for n in ("small", "large")
                ],
                "router": router,
            },
        }
    )


def test_policy_and_flags_set_the_cache_bounds() -> None:
    default = from_policy(_policy(None))
    assert default.classifier_cache_entries == RouterConfig(tiers=default.tiers).classifier_cache_entries
    cfg = from_policy(_policy({"maxEntries": 100, "maxBytes": 65536}))
    assert (cfg.classifier_cache_entries, cfg.classifier_cache_bytes) == (100, 65536)
    half = from_policy(_policy({"maxBytes": 0}))
    assert (half.classifier_cache_entries, half.classifier_cache_bytes) == (default.classifier_cache_entries, 0)
    with pytest.raises(ValueError, match="maxEntries"):
        _policy({"maxEntries": -1})
    with pytest.raises(ValueError, match="maxBytes"):
        _policy({"maxBytes": 1.5})  # no floats in a spec
    flagged = apply_overrides(cfg, LocalOverrides(cache_bytes=12345))
    assert (flagged.classifier_cache_entries, flagged.classifier_cache_bytes) == (100, 12345)


def test_serve_flags_reach_the_overrides() -> None:
    import argparse

    from tiergate_router.cmd_serve import configure

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--classifier-cache-entries", "10", "--classifier-cache-bytes", "2048"])
    o = overrides(args)
    assert (o.cache_entries, o.cache_bytes) == (10, 2048)
