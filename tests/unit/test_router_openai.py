"""The official `openai` client (sync, async, streaming) against the router, with fake vLLM tiers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from tests.support.harness import Harness
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness().start()
    yield h
    h.stop()


def client(h: Harness) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0)


def test_sync_chat_routes_easy_prompt_to_small_and_hard_to_large(harness: Harness) -> None:
    c = client(harness)
    raw = c.chat.completions.with_raw_response.create(
        model="tiergate", messages=[{"role": "user", "content": "What is 2+2?"}]
    )
    easy = raw.parse()
    assert raw.headers["x-tiergate-tier"] == "small"
    assert float(raw.headers["x-tiergate-score"]) == pytest.approx(0.1)
    assert easy.choices[0].message.content is not None
    assert easy.choices[0].message.content.startswith("small")
    assert easy.model == "small-model"
    extra = easy.model_extra or {}
    assert extra["tiergate"]["tier"] == "small"
    assert extra["tiergate"]["fallback"] is False

    raw = c.chat.completions.with_raw_response.create(
        model="tiergate",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "HARD: prove the Riemann hypothesis"},
        ],
    )
    hard = raw.parse()
    assert raw.headers["x-tiergate-tier"] == "large"
    assert raw.headers["x-tiergate-decision"] == "large"
    assert hard.choices[0].message.content is not None
    assert hard.choices[0].message.content.startswith("large")
    assert hard.usage is not None
    assert hard.usage.completion_tokens == 8


def test_sync_completions_and_models(harness: Harness) -> None:
    c = client(harness)
    raw = c.completions.with_raw_response.create(model="tiergate", prompt="HARD question", max_tokens=3)
    comp = raw.parse()
    assert raw.headers["x-tiergate-tier"] == "large"
    assert comp.choices[0].text.count("tok") == 3
    ids = [m.id for m in c.models.list().data]
    assert ids == ["tiergate", "auto", "small", "large"]


def test_auto_is_the_routed_model_for_semantic_router_clients(harness: Harness) -> None:
    # Clients written for vLLM's semantic-router send `model: "auto"`: routed exactly as `tiergate` is.
    c = client(harness)
    for prompt, tier in (("What is 2+2?", "small"), ("HARD: prove it", "large")):
        raw = c.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": prompt}])
        assert raw.headers["x-tiergate-tier"] == tier
        assert raw.headers["x-tiergate-decision"] == tier  # classified, not forced
        assert "x-tiergate-score" in raw.headers
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert "'tiergate' or 'auto'" in str(err.value)


def test_a_tier_named_auto_is_not_shadowed_by_the_alias() -> None:
    h = Harness(tiers=(("auto", 1), ("large", 1)), grpc=False).start()
    try:
        c = client(h)
        raw = c.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": "HARD"}])
        assert raw.headers["x-tiergate-tier"] == "auto"
        assert raw.headers["x-tiergate-decision"] == "forced"
        assert [m.id for m in c.models.list().data] == ["tiergate", "auto", "large"]  # `auto` once: the tier
    finally:
        h.stop()


def test_model_naming_a_tier_forces_it(harness: Harness) -> None:
    c = client(harness)
    raw = c.chat.completions.with_raw_response.create(model="large", messages=[{"role": "user", "content": "easy"}])
    assert raw.headers["x-tiergate-tier"] == "large"
    assert raw.headers["x-tiergate-decision"] == "forced"
    assert "x-tiergate-score" not in raw.headers


def test_sync_streaming_chat_passes_every_token(harness: Harness) -> None:
    c = client(harness)
    large_completion = {"tier": "large", "kind": "completion"}
    before = harness.metric("tiergate_router_tokens_total", large_completion)
    with c.chat.completions.with_streaming_response.create(
        model="tiergate",
        messages=[{"role": "user", "content": "HARD stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as resp:
        assert resp.headers["x-tiergate-tier"] == "large"
        chunks = list(resp.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.split() == [w for w in text.split() if w.startswith("large")]
    assert len(text.split()) == 8
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    # Streamed usage is accounted like non-streamed usage: once the stream has ended, so the client may see the end
    # first; wait for this stream's 8 tokens (earlier tests' tokens are in `before`).
    wait_for(
        "the streamed tokens accounted",
        lambda: harness.metric("tiergate_router_tokens_total", large_completion) == before + 8,
        interval=0.02,
    )


def test_async_client_concurrent_and_streaming(harness: Harness) -> None:
    async def main() -> tuple[list[str], str]:
        ac = openai.AsyncOpenAI(base_url=f"{harness.url}/v1", api_key="unused", max_retries=0)

        async def one(i: int) -> str:
            r = await ac.chat.completions.with_raw_response.create(
                model="tiergate", messages=[{"role": "user", "content": f"{'HARD' if i % 2 else 'easy'} {i}"}]
            )
            return r.headers["x-tiergate-tier"]

        tiers = await asyncio.gather(*(one(i) for i in range(20)))
        stream = await ac.completions.create(model="tiergate", prompt="easy stream", stream=True)
        text = "".join([ch.choices[0].text async for ch in stream])
        await ac.close()
        return list(tiers), text

    tiers, text = asyncio.run(main())
    assert tiers == ["small" if i % 2 == 0 else "large" for i in range(20)]
    assert text.startswith("small")
    assert len(text.split()) == 8


def test_metrics_endpoint_reports_requests_scores_and_cost(harness: Harness) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{harness.url}/metrics") as r:
        body = r.read().decode()
        assert r.headers["x-tiergate-tier"] == "none"
    for name in (
        "tiergate_router_requests_total",
        "tiergate_router_score_bucket",
        "tiergate_router_classification_seconds_bucket",
        "tiergate_router_upstream_seconds_bucket",
        "tiergate_router_time_to_first_token_seconds_bucket",
        "tiergate_router_request_duration_seconds",
        "tiergate_router_tokens_total",
        "tiergate_router_estimated_cost_dollars_total",
        "tiergate_router_circuit_breaker_state",
    ):
        assert name in body, name
    assert (
        harness.metric("tiergate_router_requests_total", {"tier": "large", "decision": "large", "outcome": "success"})
        >= 1
    )
    assert harness.metric("tiergate_router_estimated_cost_dollars_total", {"tier": "large"}) > 0
