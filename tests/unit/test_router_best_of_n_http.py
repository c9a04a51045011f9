"""Best-of-N through the official `openai` client: the router samples n answers from the best-of-N tier in one
request, scores them with one reward call and returns the best; when the reward model cannot be used the
reference tier answers. The reward server here is scripted (tests/support/reward.py's FakeRewardServer) so that it
can fail on cue; its score is the rendered text's length, so the best sample is known (SAMPLES[1]). The same with
the tiny real reward model behind `tiergate reward-server` is in test_router_best_of_n_reward_model.py."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.support.bon_harness import BEST, SAMPLES, BestOfNHarness, N, closed_port_url, words

EASY = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def bon() -> Iterator[BestOfNHarness]:
    b = BestOfNHarness()
    yield b
    b.stop()


def client(b: BestOfNHarness) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{b.h.url}/v1", api_key="unused", max_retries=0)


def test_the_best_sample_is_returned_with_the_samples_header(bon: BestOfNHarness) -> None:
    bon.configure()
    before = bon.metric("tiergate_router_best_of_n_samples_count", {"tier": "small"})
    raw = client(bon).chat.completions.with_raw_response.create(model="tiergate", messages=EASY)
    out = raw.parse()
    assert raw.headers["x-tiergate-tier"] == "small"
    assert raw.headers["x-tiergate-samples"] == str(N)
    assert "x-tiergate-escalation" not in raw.headers
    assert [c.message.content for c in out.choices] == [BEST]
    assert out.choices[0].index == 0
    # The usage is the tier's for all n samples: what the request cost.
    assert out.usage is not None
    assert out.usage.completion_tokens == words(SAMPLES)
    assert (out.model_extra or {})["tiergate"]["samples"] == N
    # One upstream request with n, not streamed; one batched reward call with every sample.
    [sent] = bon.small.stats.requests
    assert sent["n"] == N
    assert sent["stream"] is False
    [scored] = bon.reward.requests
    assert len(scored["input"]) == N
    assert all(s in text for s, text in zip(SAMPLES, scored["input"], strict=True))
    assert scored["model"] == "fake-reward"  # asked from the server's /v1/models (no model configured)
    assert bon.metric("tiergate_router_best_of_n_samples_count", {"tier": "small"}) == before + 1
    assert bon.metric("tiergate_router_best_of_n_samples_sum", {"tier": "small"}) >= N
    assert bon.metric("tiergate_router_reward_score_count") >= N
    assert bon.metric("tiergate_router_reward_seconds_count") >= 1
    assert bon.metric("tiergate_router_tokens_total", {"tier": "small", "kind": "completion"}) >= words(SAMPLES)


def test_the_reward_models_choice_wins_whatever_the_order(bon: BestOfNHarness) -> None:
    # Score the shortest text highest: the router follows the reward model, not the length or the position.
    bon.configure(score=lambda text: -float(len(text)))
    out = client(bon).chat.completions.create(model="tiergate", messages=EASY)
    assert out.choices[0].message.content == "small tiny"


def test_completions_are_reranked_too(bon: BestOfNHarness) -> None:
    bon.configure()
    raw = client(bon).completions.with_raw_response.create(model="tiergate", prompt="easy one", max_tokens=5)
    assert raw.headers["x-tiergate-samples"] == str(N)
    assert [c.text for c in raw.parse().choices] == [BEST]


def test_other_tiers_and_forced_tiers_draw_one_sample(bon: BestOfNHarness) -> None:
    bon.configure()
    c = client(bon)
    hard = c.chat.completions.with_raw_response.create(model="tiergate", messages=[{"role": "user", "content": "HARD"}])
    assert hard.headers["x-tiergate-tier"] == "large"
    assert hard.headers["x-tiergate-samples"] == "1"
    forced = c.chat.completions.with_raw_response.create(model="small", messages=EASY)
    assert forced.headers["x-tiergate-tier"] == "small"
    assert forced.headers["x-tiergate-samples"] == "1"
    assert "n" not in bon.small.stats.requests[-1]
    assert bon.reward.requests == []


def test_streaming_sends_the_chosen_answer_as_chunks(bon: BestOfNHarness) -> None:
    bon.configure()
    with client(bon).chat.completions.with_streaming_response.create(
        model="tiergate", messages=EASY, stream=True, stream_options={"include_usage": True}
    ) as resp:
        assert resp.headers["x-tiergate-samples"] == str(N)
        assert resp.headers["x-tiergate-tier"] == "small"
        chunks = list(resp.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == BEST
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
    usage = [ch.usage for ch in chunks if ch.usage is not None]
    assert [u.completion_tokens for u in usage] == [words(SAMPLES)]
    [sent] = bon.small.stats.requests
    assert sent["stream"] is False
    assert "stream_options" not in sent
    assert sent["n"] == N


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("http_500", "bad_response"),
        ("not_json", "bad_response"),
        ("wrong_count", "bad_response"),
        ("nan", "bad_response"),
        ("hold", "timeout"),
        ("drop", "unavailable"),
    ],
)
def test_a_failing_reward_model_hands_the_request_to_the_reference_tier(
    bon: BestOfNHarness, mode: str, reason: str
) -> None:
    bon.configure(mode=mode, timeout_s=0.3)
    _escalated(bon, reason)


def test_a_reward_model_that_is_down_hands_the_request_to_the_reference_tier(bon: BestOfNHarness) -> None:
    bon.configure(reward_url=closed_port_url())
    _escalated(bon, "unavailable")


def test_a_best_score_below_the_floor_hands_the_request_to_the_reference_tier(bon: BestOfNHarness) -> None:
    bon.configure(min_reward=1e6)
    before = bon.metric("tiergate_router_reward_errors_total", {"reason": "bad_response"})
    _escalated(bon, "below_min_reward", reward_error=False)
    # Not a reward error: the model answered, the answer was not good enough.
    assert bon.metric("tiergate_router_reward_errors_total", {"reason": "bad_response"}) == before


def _escalated(bon: BestOfNHarness, reason: str, *, reward_error: bool = True) -> None:
    escalations = bon.metric("tiergate_router_best_of_n_escalations_total", {"reason": reason})
    errors = bon.metric("tiergate_router_reward_errors_total", {"reason": reason})
    raw = client(bon).chat.completions.with_raw_response.create(model="tiergate", messages=EASY)
    out = raw.parse()
    assert raw.headers["x-tiergate-tier"] == "large"
    assert raw.headers["x-tiergate-escalation"] == reason
    assert raw.headers["x-tiergate-samples"] == "1"
    assert out.choices[0].message.content is not None
    assert out.choices[0].message.content.startswith("large")
    # The reference tier answered the original request, one sample.
    [ref] = bon.large.stats.requests
    assert "n" not in ref
    # The usage counts the samples drawn too: they were paid for.
    assert out.usage is not None
    assert out.usage.completion_tokens == words(SAMPLES) + 8
    assert (out.model_extra or {})["tiergate"]["escalation"] == reason
    assert bon.metric("tiergate_router_best_of_n_escalations_total", {"reason": reason}) == escalations + 1
    if reward_error:
        assert bon.metric("tiergate_router_reward_errors_total", {"reason": reason}) == errors + 1


def test_escalation_stays_within_the_clients_deadline(bon: BestOfNHarness) -> None:
    # The reward model hangs and its own timeout is long: the router gives it at most half of what is left of the
    # request's deadline (~3 s of the client's 6 s), so the reference tier still has ~3 s to answer in.
    bon.configure(mode="hold", timeout_s=60.0)
    raw = client(bon).chat.completions.with_raw_response.create(
        model="tiergate", messages=EASY, extra_headers={"x-tiergate-timeout-ms": "6000"}
    )
    assert raw.headers["x-tiergate-tier"] == "large"
    assert raw.headers["x-tiergate-escalation"] == "timeout"
    assert raw.parse().choices[0].message.content is not None


def test_a_tier_that_ignores_n_is_answered_as_is(bon: BestOfNHarness) -> None:
    bon.configure()
    bon.small.behaviour.ignore_n = True
    before = bon.metric("tiergate_router_best_of_n_skipped_total", {"tier": "small", "reason": "tier_ignored_n"})
    raw = client(bon).chat.completions.with_raw_response.create(model="tiergate", messages=EASY)
    assert raw.headers["x-tiergate-tier"] == "small"
    assert raw.headers["x-tiergate-samples"] == "1"
    assert [c.message.content for c in raw.parse().choices] == [SAMPLES[0]]
    assert bon.reward.requests == []  # nothing to choose from: no reward call
    labels = {"tier": "small", "reason": "tier_ignored_n"}
    assert bon.metric("tiergate_router_best_of_n_skipped_total", labels) == before + 1


def test_a_clients_own_n_is_passed_through(bon: BestOfNHarness) -> None:
    bon.configure()
    raw = client(bon).chat.completions.with_raw_response.create(model="tiergate", messages=EASY, n=2)
    assert raw.headers["x-tiergate-samples"] == "1"
    assert [c.message.content for c in raw.parse().choices] == list(SAMPLES[:2])
    assert bon.small.stats.requests[-1]["n"] == 2
    assert bon.reward.requests == []


def test_when_the_best_of_n_tier_is_down_the_fallback_draws_one_sample(bon: BestOfNHarness) -> None:
    bon.configure()
    bon.small.behaviour.fail_status = 503
    raw = client(bon).chat.completions.with_raw_response.create(model="tiergate", messages=EASY)
    assert raw.headers["x-tiergate-tier"] == "large"
    assert raw.headers["x-tiergate-fallback"] == "true"
    assert raw.headers["x-tiergate-samples"] == "1"
    [ref] = bon.large.stats.requests
    assert "n" not in ref
    assert bon.reward.requests == []


def test_errors_carry_the_samples_header(bon: BestOfNHarness) -> None:
    bon.configure()
    c = client(bon)
    with pytest.raises(openai.NotFoundError) as missing:
        c.chat.completions.create(model="nope", messages=EASY)
    assert missing.value.response.headers["x-tiergate-samples"] == "0"
    bon.small.behaviour.fail_status = 400  # the tier refuses the request itself: passed through, one answer
    with pytest.raises(openai.BadRequestError) as refused:
        c.chat.completions.create(model="tiergate", messages=EASY)
    assert refused.value.response.headers["x-tiergate-tier"] == "small"
    assert refused.value.response.headers["x-tiergate-samples"] == "1"
    assert bon.reward.requests == []
    bon.small.behaviour.fail_status = 503
    bon.large.behaviour.fail_status = 503  # no tier answers: 503 from the router itself
    try:
        with pytest.raises(openai.InternalServerError) as down:
            c.chat.completions.create(model="tiergate", messages=EASY)
    finally:
        bon.large.behaviour.fail_status = None
    assert down.value.response.headers["x-tiergate-tier"] == "none"
    assert down.value.response.headers["x-tiergate-samples"] == "0"
