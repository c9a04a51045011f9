"""Shadow routing (spec.shadow: Baseline and Mirror) and the router canary (spec.router.canary): the pure parts, and
the request path through the official openai client against a router and fake tiers on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import openai
import pytest

from tests.support.fake_vllm import Behaviour
from tests.support.harness import Harness
from tests.support.reward import FakeRewardServer
from tests.support.waiting import wait_for
from tiergate.api.policy import RoutingPolicy, parse_policy
from tiergate.training.decision_logs import join_logs
from tiergate_router._proto import router_pb2, router_pb2_grpc
from tiergate_router.classifier import MicroBatcher
from tiergate_router.config import CanaryConfig, RouterConfig, ShadowConfig, from_policy
from tiergate_router.config.shadow import ShadowFlags, apply_shadow
from tiergate_router.errors import ConfigError
from tiergate_router.shadow import (
    CANARY,
    PRIMARY,
    ShadowStats,
    StreamText,
    answer_text,
    bucket_of,
    in_canary,
    judge,
    plan,
    shadow_sampled,
)

TIERS = ("small", "large")
PRICE = {"inputPerMillion": 1, "outputPerMillion": 2}
HARD = "HARD question"  # the KeywordScorer sends it to `large`
EASY = "easy question"


# --- pure parts -------------------------------------------------------------------------------------------------


def test_assignment_is_a_pure_function_of_the_request_id() -> None:
    assert bucket_of("req-1", "canary") == bucket_of("req-1", "canary")
    assert in_canary("req-1", 10000)
    assert not in_canary("req-1", 0)
    # The canary and the shadow sample are drawn independently (salted), each at its share.
    ids = [f"r{i}" for i in range(20000)]
    canary = sum(in_canary(i, 2000) for i in ids) / len(ids)
    sampled = sum(shadow_sampled(i, 500) for i in ids) / len(ids)
    both = sum(in_canary(i, 2000) and shadow_sampled(i, 500) for i in ids) / len(ids)
    assert abs(canary - 0.20) < 0.01
    assert abs(sampled - 0.05) < 0.005
    assert abs(both - 0.01) < 0.003


def _sh(mode: str, rate: int = 10000) -> ShadowConfig:
    return ShadowConfig(mode=mode, baseline_tier="large", sample_rate_bp=rate, reward_url="http://r:1")


def test_the_plan_pairs_the_decision_with_the_baseline() -> None:
    # Mirror, routed cheaper: the routed tier answers, the baseline is fetched in the background.
    p = plan(_sh("Mirror"), TIERS, "small", "id")
    assert (p.answered, p.other, p.pair) == ("small", "large", ("small", "large"))
    # Baseline, routed cheaper: the baseline answers, the router's would-be tier is fetched.
    p = plan(_sh("Baseline"), TIERS, "small", "id")
    assert (p.answered, p.other, p.pair) == ("large", "small", ("small", "large"))
    # Routed to the baseline itself: paired with the cheapest tier (the PGR's denominator).
    p = plan(_sh("Mirror"), TIERS, "large", "id")
    assert (p.answered, p.other, p.pair) == ("large", "small", ("small", "large"))
    # Not sampled: nothing fetched.
    assert plan(_sh("Mirror", rate=0), TIERS, "small", "id").other is None
    # The baseline is the cheapest tier: nothing cheaper to compare with.
    one = ShadowConfig(mode="Mirror", baseline_tier="small", sample_rate_bp=10000, reward_url="http://r:1")
    assert plan(one, TIERS, "small", "id").other is None


def test_judgement_and_the_pgr_estimate() -> None:
    assert judge(1.0, 1.0) == judge(2.0, 1.0)
    assert judge(1.0, 1.0).agree
    assert judge(1.0, 1.0).quality_loss == 0.0
    j = judge(0.5, 2.0)
    assert not j.agree
    assert j.quality_loss == 1.5
    st = ShadowStats()
    assert st.pgr is None
    st.add(2.0, routed_to_baseline=True)  # the router kept a gap of 2 by choosing the baseline
    st.add(1.0, routed_to_baseline=False)  # and lost a gap of 1 by routing cheap
    st.add(-1.0, routed_to_baseline=False)  # the cheap answer was better: negative gap
    assert st.pgr == pytest.approx(2.0 / 2.0)
    st.add(2.0, routed_to_baseline=False)
    assert st.pgr == pytest.approx(2.0 / 4.0)


def test_answer_text_of_bodies_and_streams() -> None:
    chat = {"choices": [{"message": {"role": "assistant", "content": "hi"}}]}
    assert answer_text(json.dumps(chat).encode()) == "hi"
    assert answer_text(json.dumps({"choices": [{"text": "yo"}]}).encode()) == "yo"
    assert answer_text(b"not json") is None
    assert answer_text(b'{"choices": []}') is None
    st = StreamText()
    events = [{"choices": [{"delta": {"content": w}}]} for w in ("a", "b", "c")]
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    for i in range(0, len(raw), 7):  # chunks split lines anywhere
        st.feed(raw[i : i + 7])
    assert st.text == "abc"


def test_config_refuses_what_cannot_act() -> None:
    from tiergate_router.config import TierConfig

    tiers = (TierConfig("small", ("http://a/v1",)), TierConfig("large", ("http://b/v1",)))
    with pytest.raises(ConfigError, match="baseline_tier"):
        RouterConfig(tiers=tiers, shadow=dataclasses.replace(_sh("Mirror"), baseline_tier="huge"))
    with pytest.raises(ConfigError, match="reward model"):
        RouterConfig(tiers=tiers, shadow=dataclasses.replace(_sh("Mirror"), reward_url=None))
    # Baseline mode without judging needs no reward model.
    RouterConfig(tiers=tiers, shadow=ShadowConfig(mode="Baseline", baseline_tier="large"))
    with pytest.raises(ConfigError, match="share_bp"):
        RouterConfig(tiers=tiers, canary=CanaryConfig("c", 10001, (5000,)))


# --- the request path -------------------------------------------------------------------------------------------


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness((("small", 1), ("large", 1))).start()
    yield harness
    harness.stop()


@pytest.fixture
def reward(h: Harness) -> Iterator[FakeRewardServer]:
    # Scores a rendered pair by its length: a tier made to answer fewer tokens scores lower.
    r = FakeRewardServer(score=lambda text: float(len(text)))
    h.call(r.start())
    yield r
    h.call(r.stop())


def _apply(h: Harness, **changes: object) -> None:
    server = h.server
    assert server is not None
    cfg = dataclasses.replace(server.router.config, **changes)  # type: ignore[arg-type]

    async def apply() -> None:
        server.router.apply_config(cfg)

    h.call(apply())


def _judged(h: Harness, total: int) -> None:
    """Wait until `total` pairs are judged. A judged answer is sent before its judgement is submitted, so the last
    submission may trail the client's answer: the count, not the answers, says when the judgements are done."""
    pairs = ("routed_vs_baseline", "baseline_vs_cheapest")

    def judged() -> float:
        return sum(h.metric("tiergate_router_shadow_judged_total", {"artifact": PRIMARY, "pair": p}) for p in pairs)

    wait_for(f"{total} judged pairs", lambda: judged() == total)


def _drain(h: Harness) -> None:
    assert h.server is not None
    h.call(h.server.router.shadow.drain())


def _client(h: Harness) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{h.url}/v1", api_key="x", max_retries=0)


def _ask(client: openai.OpenAI, prompt: str, rid: str | None = None) -> tuple[str, str]:
    """(answering tier, decision) of one routed chat request."""
    headers = {"x-request-id": rid} if rid else {}
    raw = client.chat.completions.with_raw_response.create(
        model="tiergate", messages=[{"role": "user", "content": prompt}], extra_headers=headers
    )
    raw.parse()
    if rid:
        assert raw.headers["x-request-id"] == rid  # also on an answer sent before the handler returned (judged)
    return raw.headers["x-tiergate-tier"], raw.headers["x-tiergate-decision"]


def test_baseline_mode_answers_from_the_baseline_and_logs_the_would_be_decision(h: Harness, tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    _apply(h, shadow=ShadowConfig(mode="Baseline", baseline_tier="large"), decision_log=str(log))
    client = _client(h)
    assert _ask(client, EASY, "easy-1") == ("large", "small")
    assert _ask(client, HARD, "hard-1") == ("large", "large")
    with client.chat.completions.with_streaming_response.create(
        model="tiergate", messages=[{"role": "user", "content": EASY}], stream=True
    ) as resp:
        assert resp.headers["x-tiergate-tier"] == "large"
        assert resp.headers["x-tiergate-decision"] == "small"
    assert h.fakes["small"][0].stats.completed == 0  # nothing sampled: the small tier never saw a request
    assert h.server is not None
    h.server.router.decision_log.flush()  # type: ignore[union-attr]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    by_id = {r["request_id"]: r for r in records if r["kind"] == "decision"}
    assert (by_id["easy-1"]["decision"], by_id["easy-1"]["tier"]) == ("small", "large")
    assert (by_id["hard-1"]["decision"], by_id["hard-1"]["tier"]) == ("large", "large")


def _agreement(h: Harness, agree: str) -> float:
    return h.metric("tiergate_router_shadow_agreement_total", {"artifact": PRIMARY, "agree": agree})


def test_mirror_judges_both_answers_and_agreement_moves_when_a_tier_gets_worse(
    h: Harness, reward: FakeRewardServer, tmp_path: Path
) -> None:
    log = tmp_path / "decisions.jsonl"
    shadow = ShadowConfig(mode="Mirror", baseline_tier="large", sample_rate_bp=10000, reward_url=reward.url)
    _apply(h, shadow=shadow, decision_log=str(log))
    client = _client(h)
    # Both tiers answer 8 tokens of the same length: the routed answers agree with the baseline's.
    for i in range(10):
        assert _ask(client, EASY, f"good-{i}") == ("small", "small")
    _judged(h, 10)
    assert (_agreement(h, "true"), _agreement(h, "false")) == (10, 0)
    assert h.fakes["large"][0].stats.completed == 10  # each mirrored once, in the background
    # What the mirrored calls used is counted (the policy pays for it; no client asked the large tier).
    assert h.metric("tiergate_router_tokens_total", {"tier": "large", "kind": "completion"}) == 10 * 8
    # The small tier gets worse (2 tokens: shorter answers, lower rewards): agreement falls.
    small = h.fakes["small"][0]
    small.behaviour = dataclasses.replace(small.behaviour, tokens=2)
    for i in range(10):
        assert _ask(client, EASY, f"bad-{i}") == ("small", "small")
    _judged(h, 20)
    assert (_agreement(h, "true"), _agreement(h, "false")) == (10, 10)
    assert h.metric("tiergate_router_shadow_quality_loss_count", {"artifact": PRIMARY}) == 20
    assert h.metric("tiergate_router_shadow_quality_loss_sum", {"artifact": PRIMARY}) > 0
    # Requests the router sends to the baseline are paired with the cheapest tier: the PGR gets a denominator.
    for i in range(5):
        assert _ask(client, HARD, f"hard-{i}") == ("large", "large")
    _judged(h, 25)
    pgr = h.metric("tiergate_router_shadow_pgr_estimate", {"artifact": PRIMARY})
    assert 0 < pgr < 1
    assert h.server is not None
    stats = h.server.router.shadow.stats[PRIMARY]
    assert pgr == pytest.approx(stats.recovered / stats.gap)
    # The same estimate from the counters the operator sums over replicas and windows (status.shadow).

    def gap_sum(pair: str) -> float:
        def series(sign: str) -> float:
            labels = {"artifact": PRIMARY, "pair": pair, "sign": sign}
            return h.metric("tiergate_router_shadow_reward_gap_total", labels)

        return series("positive") - series("negative")

    recovered, not_recovered = gap_sum("baseline_vs_cheapest"), gap_sum("routed_vs_baseline")
    assert recovered > 0
    assert not_recovered > 0
    assert recovered == pytest.approx(stats.recovered)
    assert recovered / (recovered + not_recovered) == pytest.approx(pgr)
    h.server.router.decision_log.flush()  # type: ignore[union-attr]
    shadows = {r["request_id"]: r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "shadow"}
    assert shadows["good-0"]["agree"] is True
    assert shadows["bad-0"]["agree"] is False
    assert shadows["bad-0"]["quality_loss"] == pytest.approx(
        shadows["bad-0"]["reward_baseline"] - shadows["bad-0"]["reward_routed"]
    )
    assert {shadows["hard-0"]["routed_tier"], shadows["hard-0"]["weak_tier"]} == {"large", "small"}
    # `tiergate calibrate --data LOG` reads every judged request with both tiers' rewards, whichever side was routed.
    joined = join_logs([log])
    assert all(set(joined[rid].judged) == {"small", "large"} for rid in ("good-0", "bad-0", "hard-0"))
    assert joined["bad-0"].judged["small"] < joined["bad-0"].judged["large"]
    assert set(shadows["good-0"]) >= {
        "kind",
        "ts",
        "request_id",
        "mode",
        "routed_tier",
        "baseline_tier",
        "reward_routed",
        "reward_baseline",
        "agree",
        "quality_loss",
    }


def test_mirrored_calls_are_bounded_and_dropped_under_overload(h: Harness, reward: FakeRewardServer) -> None:
    shadow = ShadowConfig(
        mode="Mirror", baseline_tier="large", sample_rate_bp=10000, max_concurrent=2, reward_url=reward.url
    )
    _apply(h, shadow=shadow)
    large = h.fakes["large"][0]
    hold = h.call(_event())
    large.behaviour = Behaviour(hold=hold)
    client = _client(h)
    # The baseline holds every mirrored call; the clients' own answers (from small) still come back at once.
    for i in range(6):
        assert _ask(client, EASY, f"r{i}") == ("small", "small")
    # A judged answer is sent before its judgement is submitted: the last submission may trail the client's answer.
    wait_for(
        "all six sampled requests submitted or dropped",
        lambda: (
            h.metric("tiergate_router_shadow_in_flight")
            + h.metric("tiergate_router_shadow_dropped_total", {"reason": "overload"})
            == 6
        ),
    )
    assert h.metric("tiergate_router_shadow_in_flight") == 2
    assert h.metric("tiergate_router_shadow_dropped_total", {"reason": "overload"}) == 4
    assert h.server is not None
    h.call(_set(hold))
    _drain(h)
    assert h.metric("tiergate_router_shadow_in_flight") == 0
    assert h.metric("tiergate_router_shadow_judged_total", {"artifact": PRIMARY, "pair": "routed_vs_baseline"}) == 2


async def _event() -> asyncio.Event:
    return asyncio.Event()


async def _set(event: asyncio.Event) -> None:
    event.set()


def test_a_canary_at_20_percent_decides_20_percent_by_request_id() -> None:
    # The primary artifact sends easy prompts to small, the canary sends everything to large: the decision says who
    # decided.
    h = Harness(
        (("small", 1), ("large", 1)), canary_factory=lambda: MicroBatcher(lambda prompts: [1.0] * len(prompts))
    ).start()
    try:
        _apply(h, canary=CanaryConfig(artifact="canary.json", share_bp=2000, thresholds_bp=(5000,)))
        client = _client(h)
        n = 500
        ids = [f"canary-test-{i}" for i in range(n)]
        decided_large = sum(_ask(client, EASY, rid)[1] == "large" for rid in ids)
        expected = sum(in_canary(rid, 2000) for rid in ids)
        assert decided_large == expected  # exactly the ids the hash assigns
        assert abs(decided_large / n - 0.20) <= 0.03
        assert h.metric("tiergate_router_artifact_decisions_total", {"artifact": CANARY, "tier": "large"}) == expected
        primary = h.metric("tiergate_router_artifact_decisions_total", {"artifact": PRIMARY, "tier": "small"})
        assert primary == n - expected
        # The same id is always decided by the same artifact.
        assert _ask(client, EASY, ids[0])[1] == ("large" if in_canary(ids[0], 2000) else "small")
    finally:
        h.stop()


# --- the policy's side ------------------------------------------------------------------------------------------


def _policy(shadow: dict[str, object], *, best_of_n: bool) -> RoutingPolicy:
    spec: dict[str, object] = {
        "tiers": [
            {"name": n, "model": f"{n}-model", "endpoint": {"url": f"http://{n}:8000/v1"}, "price": PRICE}
            for n in TIERS
        ],
        "router": {"thresholdBasisPoints": 5000},
        "shadow": shadow,
    }
    if best_of_n:
        spec["bestOfN"] = {"tier": "small", "maxSamples": 2, "rewardModel": {"model": "org/reward"}}
    return parse_policy(
        {"apiVersion": "tiergate.io/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "p"}, "spec": spec}
    )


def test_spec_shadow_becomes_the_routers_shadow_config() -> None:
    mirror = {"mode": "Mirror", "baselineTier": "large", "sampleRateBasisPoints": 250, "maxConcurrent": 4}
    # Judged by the best-of-N reward model the operator deploys, when no rewardUrl is given.
    assert from_policy(_policy(mirror, best_of_n=True), namespace="ns").shadow == ShadowConfig(
        mode="Mirror",
        baseline_tier="large",
        sample_rate_bp=250,
        max_concurrent=4,
        reward_url="http://p-reward.ns.svc:8000",
        reward_model="org/reward",
    )
    own = from_policy(_policy({**mirror, "rewardUrl": "http://judge:9000/"}, best_of_n=True)).shadow
    assert own is not None
    assert (own.reward_url, own.reward_model) == ("http://judge:9000", None)
    # Flags replace the policy's fields.
    flags = ShadowFlags(mode_tier=("Baseline", "large"), sample_bp=0)
    cfg = apply_shadow(from_policy(_policy(mirror, best_of_n=True)), flags)
    assert cfg.shadow is not None
    assert (cfg.shadow.mode, cfg.shadow.sample_rate_bp, cfg.shadow.max_concurrent) == ("Baseline", 0, 4)


def test_baseline_mode_answers_from_the_baseline_when_the_classifier_fails() -> None:
    def broken(prompts: Sequence[str]) -> list[float]:
        raise RuntimeError("the encoder fell over")

    h = Harness((("small", 1), ("large", 1), ("xl", 1)), classifier_factory=lambda: MicroBatcher(broken)).start()
    try:
        _apply(h, shadow=ShadowConfig(mode="Baseline", baseline_tier="large"))
        # Without shadow routing a classifier error goes to the strongest tier (xl); Baseline mode keeps to large.
        assert _ask(_client(h), EASY) == ("large", "classifier_error")
    finally:
        h.stop()


def test_mirror_judges_grpc_generate_too(h: Harness, reward: FakeRewardServer) -> None:
    _apply(h, shadow=ShadowConfig(mode="Mirror", baseline_tier="large", sample_rate_bp=10000, reward_url=reward.url))
    with grpc.insecure_channel(h.grpc_target) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        for i in range(3):
            r = stub.Generate(
                router_pb2.GenerateRequest(prompt=EASY, max_tokens=4), metadata=(("x-request-id", f"g{i}"),)
            )
            assert r.tier == "small"
    _judged(h, 3)
    assert _agreement(h, "true") == 3
