"""`tiergate serve … --best-of-n TIER=N --reward-url URL` end to end: the real command in a subprocess, fake vLLM
tiers in their own processes, a scripted reward server (FakeRewardServer)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.artifacts import constant_artifact
from tests.support.harness import LoopThread
from tests.support.procs import FakeProcess, fake_tiers, small_and_large
from tests.support.reward import FakeRewardServer
from tests.support.router_serve import Serve


@pytest.fixture(scope="module")
def tiers() -> Iterator[dict[str, FakeProcess]]:
    yield from fake_tiers(small_and_large())


@pytest.fixture
def reward() -> Iterator[FakeRewardServer]:
    thread = LoopThread()
    # The fake tier tags choice i > 0 of an answer `-s<i>-`: the reward model likes the third sample best.
    r = FakeRewardServer(score=lambda text: 1.0 if "small-s2-" in text else 0.0)
    thread.call(r.start())
    try:
        yield r
    finally:
        thread.call(r.stop())
        thread.close()


@pytest.mark.slow
def test_serve_best_of_n_flags(tiers: dict[str, FakeProcess], reward: FakeRewardServer, tmp_path: Path) -> None:
    art = constant_artifact(tmp_path / "router.json", bias=-3.0)  # score 0.05 -> small
    s = Serve(
        "--tier",
        f"small={tiers['small'].base_url}",
        "--tier",
        f"large={tiers['large'].base_url}",
        "--router",
        str(art),
        "--best-of-n",
        "small=4",
        "--reward-url",
        reward.url,
    )
    try:
        tier, body = s.chat("anything")
        assert tier == "small"
        assert body["tiergate"]["samples"] == 4  # type: ignore[index]
        assert body["choices"][0]["message"]["content"].startswith("small-s2-")  # type: ignore[index]
        [scored] = reward.requests
        assert len(scored["input"]) == 4
        tier, body = s.chat("anything", model="large")
        assert body["tiergate"]["samples"] == 1  # type: ignore[index]
    finally:
        out = s.stop()
    assert f"best-of-4 on small, reward model at {reward.url}, reference large" in out
