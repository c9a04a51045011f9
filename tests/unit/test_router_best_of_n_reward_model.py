"""Best-of-N with a real reward model: the tiny random reward model (tests/support/reward.py) behind
`tiergate reward-server --model`, a fake tier answering n known samples, the official `openai` client. The router
must return the sample that model scores highest, computed here by scoring the same rendered pairs with
transformers directly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.bon_harness import SAMPLES, BestOfNHarness, N
from tests.support.reward import RewardServerProcess, direct_scores, reward_server, tiny_reward_model
from tiergate_router.reward import render_pair

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_reward_model(tmp_path_factory.mktemp("reward"))


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[RewardServerProcess]:
    with reward_server("--model", str(model_dir)) as s:
        yield s


@pytest.fixture(scope="module")
def bon() -> Iterator[BestOfNHarness]:
    b = BestOfNHarness()
    yield b
    b.stop()


@pytest.mark.slow
def test_the_router_returns_the_sample_the_reward_model_scores_highest(
    bon: BestOfNHarness, server: RewardServerProcess, model_dir: Path
) -> None:
    expected = direct_scores(model_dir, [render_pair(PROMPT, s) for s in SAMPLES])
    best = max(range(len(SAMPLES)), key=lambda i: expected[i])
    # The expectation must not hang on a rounding difference between the server's batch and one text at a time.
    assert sorted(expected)[-1] - sorted(expected)[-2] > 1e-3
    bon.configure(reward_url=server.url)
    c = openai.OpenAI(base_url=f"{bon.h.url}/v1", api_key="unused", max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model="tiergate", messages=[{"role": "user", "content": PROMPT}])
    assert raw.headers["x-tiergate-tier"] == "small"
    assert raw.headers["x-tiergate-samples"] == str(N)
    assert "x-tiergate-escalation" not in raw.headers
    assert [ch.message.content for ch in raw.parse().choices] == [SAMPLES[best]]
    assert bon.metric("tiergate_router_reward_score_count") == N
    # The histogram's buckets hold the model's scores (no _sum: its buckets go below 0, as reward logits do).
    below_zero = sum(1 for x in expected if x <= 0.0)
    assert bon.metric("tiergate_router_reward_score_bucket", {"le": "0.0"}) == below_zero
