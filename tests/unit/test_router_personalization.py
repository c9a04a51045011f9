"""Per-user routing profiles wired end to end (issue 16): the policy field and flags, the N-tier decision adjusted by
the requesting user's own feedback (POST /v1/feedback and the re-query signal), through the official `openai`
client against fake vLLM tiers on loopback; bounded state whatever the number of users.

The head is constant (`constant_multi_tier_artifact`: every prompt's predicted quality is QUALITY), and the cost
weight 0, so the policy's choice is `c` (0.72) with `b` (0.70) second: a margin of 0.02. A rating of -1 on an answer
of `c` is a residual of (-1 + 1) / 2 - 0.72 = -0.72; with the prior k = 50 and n such ratings (none on other tiers)
the adjustment of `c` is -0.72 * n * k / (n + k)^2: -0.0138 after one (still `c`), -0.0266 after two (now `b`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import yaml

from tests.support.artifacts import constant_multi_tier_artifact
from tests.support.harness import Harness
from tests.support.procs import FakeProcess
from tests.support.router_serve import ROOT, Serve, serve_refusal
from tiergate.api import PolicyValidationError
from tiergate.api.policy import RoutingPolicy, parse_policy
from tiergate.routing.artifact import load_artifact
from tiergate_router._proto import router_pb2, router_pb2_grpc
from tiergate_router.artifact_classifier import LoadedClassifier
from tiergate_router.classifier import MicroBatcher
from tiergate_router.config import ConfigError, LocalOverrides, MultiTier, PersonalizationConfig, from_policy
from tiergate_router.config.personalization import PersonalizationFlags
from tiergate_router.config.serve import serve_config
from tiergate_router.metrics import RouterMetrics
from tiergate_router.personalize import MAX_USER_CHARS, Personalizer, ProfileRef, user_key

TIERS = [("a", 0.1), ("b", 1.0), ("c", 2.0)]
QUALITY = (0.5, 0.70, 0.72)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return constant_multi_tier_artifact(tmp_path_factory.mktemp("art") / "m.json", TIERS, list(QUALITY))


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dlog") / "decisions.jsonl"


@pytest.fixture(scope="module")
def harness(artifact: Path, log_path: Path) -> Iterator[Harness]:
    multi = MultiTier(load_artifact(artifact), (0, 1, 2), 0, tuple(p for _, p in TIERS))
    h = Harness(
        tiers=[(name, 1) for name, _ in TIERS],
        classifier_factory=lambda: MicroBatcher(lambda prompts: [QUALITY] * len(prompts)),
        config_overrides={
            "multi_tier": multi,
            "personalization": PersonalizationConfig(max_users=64, prior_strength=50),
            "decision_log": str(log_path),
        },
    ).start()
    yield h
    h.stop()


def client(h: Harness) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0)


def ask(h: Harness, prompt: str, user: str | None = None) -> tuple[str, str]:
    """(answering tier, request id) of one routed chat request, with the OpenAI `user` field when given."""
    kw: dict[str, Any] = {"user": user} if user is not None else {}
    raw = client(h).chat.completions.with_raw_response.create(
        model="tiergate", messages=[{"role": "user", "content": prompt}], **kw
    )
    assert raw.headers["x-tiergate-decision"] == raw.headers["x-tiergate-tier"]
    return raw.headers["x-tiergate-tier"], raw.headers["x-request-id"]


def rate(h: Harness, rid: str, rating: float) -> None:
    got = client(h).post("/feedback", body={"request_id": rid, "rating": rating}, cast_to=object)
    assert got == {"object": "feedback", "request_id": rid, "rating": rating}


def record(h: Harness, path: Path, rid: str) -> dict[str, Any]:
    assert h.server is not None
    log = h.server.router.decision_log
    assert log is not None
    assert log.flush()
    recs = map(json.loads, path.read_text().splitlines())
    (rec,) = [r for r in recs if r["request_id"] == rid and r["kind"] == "decision"]
    return dict(rec)


def test_a_user_who_rates_a_tier_badly_is_routed_away_from_it(harness: Harness, log_path: Path) -> None:
    changed = harness.metric("tiergate_router_personalized_decisions_total", {"changed": "true"})
    unchanged = harness.metric("tiergate_router_personalized_decisions_total", {"changed": "false"})
    # Different prompts, so that no re-query signal adds ratings of its own (the head ignores the prompt).
    tier, first = ask(harness, "alice's first question", "alice")
    assert tier == "c"  # a first-time user: the policy's decision
    rate(harness, first, -1)
    tier, second = ask(harness, "alice's second question", "alice")
    assert tier == "c"  # one rating: shrunk to 0.0138, less than the 0.02 margin
    rate(harness, second, -1)
    tier, third = ask(harness, "alice's third question", "alice")
    assert tier == "b"  # two: 0.0266, more than the margin; the next best tier by predicted quality

    # The same prompt from a first-time user, from no user, and over gRPC (which carries no user): the policy's.
    assert ask(harness, "alice's third question", "bob")[0] == "c"
    assert ask(harness, "alice's third question")[0] == "c"
    with grpc.insecure_channel(harness.grpc_target) as ch:
        reply = router_pb2_grpc.RouterServiceStub(ch).Generate(router_pb2.GenerateRequest(prompt="grpc", max_tokens=2))
    assert reply.tier == "c"

    # The log keeps the artifact's own predictions (what calibration reads) and says the profile adjusted them.
    rec = record(harness, log_path, third)
    assert (rec["tier"], rec["user"], rec["personalized"]) == ("b", "alice", True)
    assert rec["score"] == pytest.approx(0.70)
    assert rec["scores"] == pytest.approx(list(QUALITY))
    assert "personalized" not in record(harness, log_path, first)
    assert harness.metric("tiergate_router_personalized_decisions_total", {"changed": "true"}) == changed + 1
    assert harness.metric("tiergate_router_personalized_decisions_total", {"changed": "false"}) == unchanged + 1


def test_re_asking_counts_against_the_tier_that_answered(harness: Harness) -> None:
    """The re-query signal (the same user, the same prompt within minutes) is a -1 for the earlier answer."""
    prompt = "How do I parse dates in Go?"
    assert ask(harness, prompt, "carol")[0] == "c"
    assert ask(harness, prompt, "carol")[0] == "c"  # re-asks the first: one rating when this one is recorded
    assert ask(harness, prompt, "carol")[0] == "c"  # decided on one rating; re-asks the second: two
    assert ask(harness, prompt, "carol")[0] == "b"


def test_feedback_without_a_user_teaches_nothing(harness: Harness) -> None:
    assert harness.server is not None
    table = harness.server.router.personalizer.table
    assert table is not None
    held = len(table)
    for i in range(3):
        _, rid = ask(harness, f"anonymous question {i}")
        rate(harness, rid, -1)
    assert len(table) == held
    assert harness.metric("tiergate_router_user_profiles") == held
    assert ask(harness, "anonymous question 3")[0] == "c"


def test_a_profile_is_per_tenant_and_a_long_user_id_is_bounded() -> None:
    assert user_key(None, "alice") == "-/alice"
    assert user_key("acme", "alice") == "acme/alice" != user_key("globex", "alice")
    assert user_key("acme", "") is None
    assert user_key("acme", 7) is None
    assert user_key(None, None) is None
    long = user_key(None, "x" * 10_000)
    assert long is not None
    assert len(long) < MAX_USER_CHARS
    assert long == user_key(None, "x" * 10_000) != user_key(None, "x" * 10_001)


def _personalizer(artifact: Path, max_users: int) -> tuple[Personalizer, Any]:
    from tiergate_router.config import RouterConfig, TierConfig

    cfg = RouterConfig(
        tiers=tuple(TierConfig(n, base_urls=(f"http://{n}:1/v1",)) for n, _ in TIERS),
        thresholds_bp=(3333, 6667),
        multi_tier=MultiTier(load_artifact(artifact), (0, 1, 2), 0, tuple(p for _, p in TIERS)),
        personalization=PersonalizationConfig(max_users=max_users),
    )
    p = Personalizer(RouterMetrics())
    p.apply(cfg)
    return p, cfg


def test_state_stays_bounded_under_many_users(artifact: Path) -> None:
    p, cfg = _personalizer(artifact, 16)
    assert p.table is not None
    size = p.table.nbytes
    for i in range(5000):
        draft = p.draft(f"-/user{i}", cfg)
        ref = p.ref(draft, QUALITY, "c")
        assert ref is not None
        p.observe(ref, -1.0)
    assert len(p.table) == 16
    assert p.table.nbytes == size
    reg = p.metrics.registry
    assert reg.get_sample_value("tiergate_router_user_profiles") == 16
    assert reg.get_sample_value("tiergate_router_user_profile_evictions_total") == 5000 - 16


def test_a_rebuilt_table_drops_ratings_of_earlier_decisions(artifact: Path) -> None:
    p, cfg = _personalizer(artifact, 64)
    draft = p.draft("-/dave", cfg)
    assert draft is not None
    ref = p.ref(draft, QUALITY, "c")
    assert ref == ProfileRef("-/dave", 2, pytest.approx(0.72), p.generation)
    assert p.ref(draft, QUALITY, "none") is None  # no tier answered: nothing to learn
    p.apply(cfg)  # the same config: the same table
    p.observe(ref, -1.0)
    assert cfg.multi_tier is not None
    # A reload that changes the cost weight, with the same loaded artifact: the profiles stay.
    p.apply(replace(cfg, multi_tier=replace(cfg.multi_tier, cost_weight_bp=100)))
    assert p.table is not None
    assert len(p.table) == 1
    p.apply(replace(cfg, personalization=PersonalizationConfig(max_users=128)))
    assert p.table is not None
    assert len(p.table) == 0
    p.observe(ref, -1.0)  # decided against the old table's predictions
    assert len(p.table) == 0
    p.apply(replace(cfg, personalization=None))
    assert p.table is None
    assert p.draft("-/dave", cfg) is None


# --- the policy field, the flags, the operator ------------------------------------------------------------------


def policy_doc(router: dict[str, Any], tiers: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "tiergate.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {
            "tiers": [
                {
                    "name": name,
                    "model": f"org/{name}",
                    "endpoint": {"url": f"http://{name}.example/v1"},
                    "price": {"inputPerMillion": f"{price / 2}", "outputPerMillion": f"{price / 2}"},
                }
                for name, price in TIERS[:tiers]
            ],
            "router": router,
        },
    }


def source(path: Path) -> LoadedClassifier:
    """A loaded artifact without its encoder: all the config reads."""
    return LoadedClassifier(MicroBatcher(lambda prompts: []), path, load_artifact(path), scorer=None)


def test_the_policy_field_is_bounded_and_needs_an_n_tier_classifier(artifact: Path) -> None:
    on = {"enabled": True, "maxUsers": 1000, "priorStrength": 20}
    pol = parse_policy(policy_doc({"classifier": {"path": str(artifact)}, "personalization": on}))
    cfg = from_policy(pol, multi=source(artifact), cost_weight_bp=0)
    assert cfg.personalization == PersonalizationConfig(max_users=1000, prior_strength=20)
    off = parse_policy(policy_doc({"classifier": {"path": str(artifact)}, "personalization": {"maxUsers": 1000}}))
    assert from_policy(off, multi=source(artifact), cost_weight_bp=0).personalization is None
    # Defaults: 100,000 users, k = 50 (the simulation's choice).
    dflt = parse_policy(policy_doc({"classifier": {"path": str(artifact)}, "personalization": {"enabled": True}}))
    assert from_policy(dflt, multi=source(artifact), cost_weight_bp=0).personalization == PersonalizationConfig()

    for router, path in (
        ({"personalization": {"enabled": True}}, "spec.router.personalization.enabled"),  # the shipped two-tier
        ({"personalization": {"maxUsers": 15}}, "spec.router.personalization.maxUsers"),
        ({"personalization": {"maxUsers": 1_000_001}}, "spec.router.personalization.maxUsers"),
        ({"personalization": {"priorStrength": 0}}, "spec.router.personalization.priorStrength"),
        ({"personalization": {"priorStrength": 0.5}}, "spec.router.personalization.priorStrength"),
        ({"personalization": {"enabled": True, "ways": 8}}, "spec.router.personalization.ways"),
    ):
        with pytest.raises(PolicyValidationError) as err:
            parse_policy(policy_doc(router))
        assert path in err.value.paths, (router, err.value.paths)
    with pytest.raises(PolicyValidationError) as err:  # one tier: nothing to choose
        parse_policy(policy_doc({"classifier": {"path": str(artifact)}, "personalization": {"enabled": True}}, 1))
    assert "spec.router.personalization.enabled" in err.value.paths

    # A classifier the API cannot see into (a path) that turns out two-tier: the router refuses, naming the field.
    two = {"classifier": {"path": "/x.json"}, "thresholdBasisPoints": 5000, "personalization": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"policy p: spec.router.personalization.enabled: needs an N-tier"):
        from_policy(parse_policy(policy_doc(two)))


def test_the_crd_carries_the_field_and_its_rule() -> None:
    crd = yaml.safe_load((ROOT / "tiergate" / "api" / "crd.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    props = spec["properties"]["router"]["properties"]["personalization"]["properties"]
    assert (props["maxUsers"]["minimum"], props["maxUsers"]["maximum"]) == (16, 1_000_000)
    assert (props["priorStrength"]["minimum"], props["priorStrength"]["maximum"]) == (1, 10_000)
    assert props["maxUsers"]["type"] == props["priorStrength"]["type"] == "integer"
    (rule,) = [r for r in spec["x-kubernetes-validations"] if "personalization" in r["rule"]]
    assert rule["fieldPath"] == ".router.personalization.enabled"
    assert "has(self.router.classifier)" in rule["rule"]


def test_the_operator_hands_the_field_to_the_router_and_refuses_a_two_tier_artifact(artifact: Path) -> None:
    from tiergate_operator.builders import router_policy_document
    from tiergate_operator.classifier import artifact_misfit

    pol = parse_policy(policy_doc({"classifier": {"path": str(artifact)}, "personalization": {"enabled": True}}))
    doc = yaml.safe_load(router_policy_document(pol))
    assert doc["spec"]["router"]["personalization"] == {"enabled": True, "maxUsers": 100_000, "priorStrength": 50}
    cfg = serve_config(RoutingPolicy.model_validate(doc), LocalOverrides(cost_weight_bp=0), source(artifact))
    assert cfg.personalization == PersonalizationConfig()

    art = json.loads(artifact.read_text())
    assert artifact_misfit(pol, art, "the artifact") is None
    why = artifact_misfit(pol, {**art, "kind": "two_tier"}, "the artifact")
    assert why is not None
    assert why.startswith("spec.router.personalization.enabled: needs an N-tier artifact")


def test_the_serve_flags(artifact: Path) -> None:
    tiers = tuple((name, f"http://{name}.example/v1") for name, _ in TIERS)

    def cfg(flags: PersonalizationFlags) -> PersonalizationConfig | None:
        return serve_config(
            None, LocalOverrides(tiers=tiers, cost_weight_bp=0, personalization=flags), source(artifact)
        ).personalization

    assert cfg(PersonalizationFlags()) is None
    assert cfg(PersonalizationFlags(enabled=True)) == PersonalizationConfig()
    assert cfg(PersonalizationFlags(enabled=True, max_users=20, prior_strength=3)) == PersonalizationConfig(20, 3)
    for flags, needle in (
        (PersonalizationFlags(max_users=20), "--personalization-max-users: personalization is off"),
        (PersonalizationFlags(prior_strength=3), "--personalization-prior: personalization is off"),
        (PersonalizationFlags(enabled=True, max_users=15), "--personalization-max-users: 15 is outside 16..1000000"),
        (PersonalizationFlags(enabled=True, prior_strength=0), "--personalization-prior: 0 is outside 1..10000"),
    ):
        with pytest.raises(ConfigError, match=needle):
            cfg(flags)
    # Without an N-tier artifact (here one tier, so no classifier at all): refused, naming the flag.
    with pytest.raises(ConfigError, match="--personalization: needs an N-tier"):
        serve_config(None, LocalOverrides(tiers=tiers[:1], personalization=PersonalizationFlags(enabled=True)), None)


def test_serve_refuses_the_flag_where_it_cannot_act() -> None:
    stderr = serve_refusal("--tier", "a=http://127.0.0.1:1/v1", "--personalization")
    assert "--personalization: needs an N-tier (multi_tier) classifier artifact" in stderr


@pytest.mark.slow
def test_serve_with_a_policy_file_learns_from_feedback(artifact: Path, tmp_path: Path) -> None:
    """`tiergate serve -f POLICY` (the real encoder, the constant head) with spec.router.personalization at k = 1:
    one -1 on `c` moves it by 0.72 / 4 = 0.18, past the 0.02 margin."""
    fakes = {n: FakeProcess(n, name=n) for n, _ in TIERS}
    try:
        doc = policy_doc(
            {
                "classifier": {"path": str(artifact)},
                "costWeightBasisPoints": 0,
                "personalization": {"enabled": True, "priorStrength": 1},
            },
            tiers=3,
        )
        for t in doc["spec"]["tiers"]:
            t["endpoint"]["url"] = fakes[t["name"]].base_url
        pol = tmp_path / "policy.yaml"
        pol.write_text(yaml.safe_dump(doc))
        s = Serve("-f", str(pol))
        try:
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="unused", max_retries=0)

            def routed(prompt: str, user: str) -> tuple[str, str]:
                raw = c.chat.completions.with_raw_response.create(
                    model="tiergate", messages=[{"role": "user", "content": prompt}], user=user
                )
                return raw.headers["x-tiergate-tier"], raw.headers["x-request-id"]

            tier, rid = routed("first", "erin")
            assert tier == "c"
            c.post("/feedback", body={"request_id": rid, "rating": -1}, cast_to=object)
            assert routed("second", "erin")[0] == "b"
            assert routed("second", "frank")[0] == "c"
            metrics = s.metrics()
            assert "tiergate_router_user_profiles 1.0" in metrics
            assert 'tiergate_router_personalized_decisions_total{changed="true"} 1.0' in metrics
        finally:
            out = s.stop()
        assert "per-user profiles for up to 100000 users" in out
    finally:
        for f in fakes.values():
            f.kill()


def test_canary_decisions_neither_use_nor_teach_profiles(artifact: Path) -> None:
    """Profiles are residuals against the primary artifact's head: requests the canary (spec.router.canary) decides
    are not adjusted, and ratings of them are not learnt."""
    from tiergate_router.config import CanaryConfig

    multi = MultiTier(load_artifact(artifact), (0, 1, 2), 0, tuple(p for _, p in TIERS))
    head = lambda prompts: [QUALITY] * len(prompts)  # noqa: E731
    h = Harness(
        tiers=[(name, 1) for name, _ in TIERS],
        grpc=False,
        classifier_factory=lambda: MicroBatcher(head),
        canary_factory=lambda: MicroBatcher(head),
        config_overrides={
            "multi_tier": multi,
            "personalization": PersonalizationConfig(max_users=64, prior_strength=50),
            "decision_log": "-",
            "canary": CanaryConfig("canary.json", 10000, thresholds_bp=(3333, 6667), multi_tier=multi),
        },
    ).start()
    try:
        for i in range(3):
            tier, rid = ask(h, f"dave's question {i}", "dave")
            assert tier == "c"  # two -1 ratings would have moved a primary decision to b (the test above)
            rate(h, rid, -1)
        assert h.server is not None
        assert h.server.router.personalizer.table is not None
        assert len(h.server.router.personalizer.table) == 0  # nothing learnt
        assert h.metric("tiergate_router_artifact_decisions_total", {"artifact": "canary", "tier": "c"}) == 3
    finally:
        h.stop()
