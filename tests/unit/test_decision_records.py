"""`decision_records`: request ids, records, feedback parsing, the re-query window and the state's bounds (pure, with
an injected clock), and how `tiergate serve` and a policy turn the decision log on."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import FakeProcess, fake_tiers, small_and_large
from tests.support.router_serve import Serve, serve_refusal
from tiergate.api.policy import RoutingPolicy
from tiergate_router.config import LocalOverrides, serve_config
from tiergate_router.decision_records import (
    FeedbackResult,
    Recorder,
    RecorderSettings,
    RouteFacts,
    Served,
    normalised_digest,
    parse_feedback,
    request_id,
)
from tiergate_router.errors import BadRequestError, ConfigError


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def route(tenant: str | None = None) -> RouteFacts:
    return RouteFacts(score=0.3, decision="small", chain=("small", "large"), artifact="a1", tenant=tenant)


def served(rid: str, prompt: str = "p", user: str | None = None, tier: str = "small") -> Served:
    return Served(request_id=rid, prompt_text=prompt, user=user, tier=tier, outcome="success", latency_s=0.01)


def read(path: Path, rec: Recorder) -> list[dict[str, Any]]:
    assert rec.log is not None
    assert rec.log.flush()
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_request_ids() -> None:
    assert request_id("abc-123_x:y.z") == "abc-123_x:y.z"
    assert request_id("x" * 128) == "x" * 128
    for bad in (None, "", "x" * 129, "a b", "a\nb", "é"):
        got = request_id(bad)
        assert got != bad
        assert len(got) == 32
    assert request_id(None) != request_id(None)


def test_normalised_digest_matches_case_punctuation_and_spacing_only() -> None:
    assert normalised_digest("What is 2+2?") == normalised_digest("  what IS 2 + 2 ")
    assert normalised_digest("What is 2+2?") != normalised_digest("What is 3+3?")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], "body"),
        ({"rating": 1}, "request_id"),
        ({"request_id": "", "rating": 1}, "request_id"),
        ({"request_id": "r"}, "rating"),
        ({"request_id": "r", "rating": None}, "rating"),
        ({"request_id": "r", "rating": False}, "rating"),
        ({"request_id": "r", "rating": 1.0001}, "rating"),
        ({"request_id": "r", "rating": 1, "extra": 0}, "extra"),
    ],
)
def test_parse_feedback_names_the_field(body: object, param: str) -> None:
    with pytest.raises(BadRequestError) as err:
        parse_feedback(body)
    assert err.value.status == 400
    assert err.value.param == param


def test_parse_feedback_accepts_the_range() -> None:
    assert parse_feedback({"request_id": "r", "rating": -1}) == ("r", -1.0)
    assert parse_feedback({"request_id": "r", "rating": 0.25}) == ("r", 0.25)


def test_requery_within_the_window_only_and_once(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "log.jsonl"
    rec = Recorder(RecorderSettings(target=str(path), requery_window_s=300), clock=clock, now=lambda: "T")
    rec.decision(route(), served("r1", "Sort a list?", user="u"))
    clock.t += 299
    rec.decision(route(), served("r2", "sort a list", user="u"))  # re-asks r1
    clock.t += 10
    rec.decision(route(), served("r3", "sort a list", user="u"))  # re-asks r2 (r1's signal is not written twice)
    clock.t += 301
    rec.decision(route(), served("r4", "sort a list", user="u"))  # too late: a new session
    fb = [(r["request_id"], r["rating"], r["source"]) for r in read(path, rec) if r["kind"] == "feedback"]
    assert fb == [("r1", -1.0, "requery"), ("r2", -1.0, "requery")]
    rec.close()


def test_the_tenant_stands_for_the_user_and_may_rate_only_its_own(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    rec = Recorder(RecorderSettings(target=str(path)), clock=Clock())
    rec.decision(route("acme"), served("r1", "q"))
    rec.decision(route("acme"), served("r2", "q"))
    assert rec.feedback("r1", 1.0, tenant="other") is FeedbackResult.UNKNOWN
    assert rec.feedback("r1", 1.0, tenant=None) is FeedbackResult.UNKNOWN
    assert rec.feedback("r1", 1.0, tenant="acme") is FeedbackResult.RECORDED
    assert rec.feedback("r1", 0.0, tenant="acme") is FeedbackResult.DUPLICATE
    fb = [(r["request_id"], r["source"]) for r in read(path, rec) if r["kind"] == "feedback"]
    assert fb == [("r1", "requery"), ("r1", "explicit")]
    rec.close()


def test_state_is_bounded_oldest_first() -> None:
    seen: list[tuple[str, float]] = []
    rec = Recorder(
        RecorderSettings(recent_requests=3, requery_keys=2),
        clock=Clock(),
        on_feedback=lambda s, r: seen.append((s, r)),
    )
    for i in range(1000):
        rec.decision(route(), served(f"r{i}", f"prompt {i}", user=f"u{i}"))
    assert rec.remembered() == (3, 2)
    assert rec.feedback("r0", 1.0) is FeedbackResult.UNKNOWN
    assert rec.feedback("r999", 1.0) is FeedbackResult.RECORDED
    assert seen == [("explicit", 1.0)]  # counted even without a log
    assert rec.log is None


def test_apply_switches_the_target_and_the_prompt_setting(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rec = Recorder(RecorderSettings(target=str(a)), clock=Clock())
    rec.decision(route(), served("r1", "text one"))
    first = rec.log
    rec.apply(RecorderSettings(target=str(a), include_prompts=True))
    assert rec.log is first  # same target: the writer stays
    rec.decision(route(), served("r2", "text two"))
    assert [r.get("prompt") for r in read(a, rec)] == [None, "text two"]
    rec.apply(RecorderSettings(target=str(b)))
    rec.decision(route(), served("r3", "text three"))
    assert [r["request_id"] for r in read(b, rec)] == ["r3"]
    rec.apply(RecorderSettings())
    assert rec.log is None


# --- configuration ---------------------------------------------------------------------------------------------


def policy(router: dict[str, Any]) -> RoutingPolicy:
    return RoutingPolicy.model_validate(
        {
            "apiVersion": "tiergate.io/v1alpha1",
            "kind": "RoutingPolicy",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {
                "tiers": [
                    {
                        "name": "only",
                        "model": "m",
                        "endpoint": {"url": "http://only.example/v1"},
                        "price": {"inputPerMillion": 1, "outputPerMillion": 1},
                    }
                ],
                "router": router,
            },
        }
    )


def test_the_policy_field_and_the_flags() -> None:
    on = policy({"decisionLog": {"enabled": True, "includePrompts": True}})
    cfg = serve_config(on, LocalOverrides(), None)
    assert (cfg.decision_log, cfg.decision_log_prompts) == ("-", True)
    off = policy({"decisionLog": {"enabled": False}})
    assert serve_config(off, LocalOverrides(), None).decision_log is None
    assert serve_config(policy({}), LocalOverrides(), None).decision_log is None
    cfg = serve_config(off, LocalOverrides(decision_log="d.jsonl"), None)
    assert (cfg.decision_log, cfg.decision_log_prompts) == ("d.jsonl", False)
    with pytest.raises(ValueError, match="includePrompts needs enabled"):
        policy({"decisionLog": {"includePrompts": True}})
    cfg = serve_config(policy({}), LocalOverrides(decision_log="-", decision_log_prompts=True), None)
    assert (cfg.decision_log, cfg.decision_log_prompts) == ("-", True)
    with pytest.raises(ConfigError, match="--decision-log-prompts"):
        serve_config(policy({}), LocalOverrides(decision_log_prompts=True), None)
    with pytest.raises(ValueError, match="decisionLog"):
        policy({"decisionLog": {"enabled": True, "prompts": True}})


@pytest.fixture(scope="module")
def tiers() -> Iterator[dict[str, FakeProcess]]:
    yield from fake_tiers(small_and_large())


def test_serve_decision_log_file_exact_form(tiers: dict[str, FakeProcess], tmp_path: Path) -> None:
    path = tmp_path / "logs" / "decisions.jsonl"
    s = Serve("--tier", f"only={tiers['small'].base_url}", "--decision-log", str(path))
    try:
        s.chat("hello")
        s.chat("hello again")
    finally:
        s.stop()
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["decision", "decision"]
    assert all(r["tier"] == "only" and "score" in r and len(r["request_id"]) == 32 for r in recs)
    assert "prompt" not in recs[0]


def test_serve_decision_log_to_stdout(tiers: dict[str, FakeProcess]) -> None:
    s = Serve("--tier", f"only={tiers['small'].base_url}", "--decision-log", "-", "--decision-log-prompts")
    try:
        s.chat("to stdout")
    finally:
        out = s.stop()
    recs = [json.loads(line) for line in out.splitlines() if line.startswith('{"kind":"decision"')]
    assert len(recs) == 1
    assert recs[0]["prompt"] == "to stdout"


def test_serve_refuses_prompts_without_a_log() -> None:
    stderr = serve_refusal("--tier", "a=http://127.0.0.1:1/v1", "--decision-log-prompts")
    assert "--decision-log-prompts" in stderr


def test_the_operator_hands_the_field_to_the_router_in_its_policy_document() -> None:
    import yaml

    from tiergate_operator.builders import router_policy_document

    doc = yaml.safe_load(router_policy_document(policy({"decisionLog": {"enabled": True}})))
    assert doc["spec"]["router"]["decisionLog"] == {"enabled": True, "includePrompts": False}
    # What the router builds from that document: the log on stdout, prompts as digests.
    cfg = serve_config(RoutingPolicy.model_validate(doc), LocalOverrides(), None)
    assert (cfg.decision_log, cfg.decision_log_prompts) == ("-", False)


def test_the_record_keeps_per_tier_scores_and_what_was_tried() -> None:
    from tiergate_router.decision_records import decision_record

    facts = RouteFacts(0.8, "mid", ("mid", "big", "tiny"), "a1", "acme", scores=(0.2, 0.8, 0.9))
    rec = decision_record(facts, served("r", tier="tiny"), include_prompt=False, ts="T")
    assert rec["scores"] == [0.2, 0.8, 0.9]
    assert rec["fallbacks"] == ["mid", "big"]
    assert rec["tenant"] == "acme"
    assert "user" not in rec
    assert json.loads(json.dumps(rec, default=str))["prompt_sha256"] == hashlib.sha256(b"p").hexdigest()
    none = decision_record(route(), served("r", tier="none"), include_prompt=True, ts="T")
    assert none["fallbacks"] == []
    assert none["prompt"] == "p"
    assert "scores" not in none
