"""Best-of-N configuration and decision without a server: spec.bestOfN's fields (model and CRD), the router's
BestOfNConfig from a policy and from `tiergate serve --best-of-n TIER=N --reward-url URL`, and the (tier, n)
decision: the documented rule without candidate heads, and `choose_candidate` over the allowed candidates."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

import tiergate.routing.candidates as candidates_module
from tiergate.api import PolicyValidationError, parse_policy
from tiergate.api.policy import RoutingPolicy
from tiergate.routing.candidates import Candidate
from tiergate_router import cmd_serve
from tiergate_router.classifier import MicroBatcher
from tiergate_router.config import (
    BestOfNConfig,
    CandidateRouting,
    ConfigError,
    RouterConfig,
    allowed_candidates,
    from_policy,
    serve_config,
    tier_at,
)
from tiergate_router.router import Router

CRD = Path(__file__).resolve().parents[2] / "tiergate" / "api" / "crd.yaml"


PRICE = {"inputPerMillion": 1, "outputPerMillion": 2}


def policy_doc(best_of_n: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "tiers": [
            {"name": "small", "model": "org/small", "endpoint": {"url": "http://small.example/v1"}, "price": PRICE},
            {"name": "large", "model": "org/large", "endpoint": {"url": "http://large.example/v1"}, "price": PRICE},
        ],
        "router": {"thresholdBasisPoints": 5000},
    }
    if best_of_n is not None:
        spec["bestOfN"] = {"tier": "small", "maxSamples": 4, "rewardModel": {"model": "org/reward"}, **best_of_n}
    return {
        "apiVersion": "tiergate.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": spec,
    }


def policy(best_of_n: dict[str, Any] | None = None) -> RoutingPolicy:
    return RoutingPolicy.model_validate(policy_doc(best_of_n))


# -- the policy ------------------------------------------------------------------------------------------------


def test_policy_best_of_n_defaults_and_fields() -> None:
    b = policy({}).spec.best_of_n
    assert b is not None
    assert (b.reference_tier, b.reward_timeout_milliseconds, b.min_reward) == (None, 3000, None)
    b = policy({"referenceTier": "small", "rewardTimeoutMilliseconds": 250, "minReward": "-1.5"}).spec.best_of_n
    assert b is not None
    assert (b.reference_tier, b.reward_timeout_milliseconds, b.min_reward) == ("small", 250, "-1.5")


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("referenceTier", "huge", "spec.bestOfN.referenceTier"),
        ("minReward", 1.5, "spec.bestOfN.minReward"),  # no floats in spec: a quoted decimal
        ("minReward", "1e3", "spec.bestOfN.minReward"),
        ("rewardTimeoutMilliseconds", 0, "spec.bestOfN.rewardTimeoutMilliseconds"),
        ("rewardTimeoutMilliseconds", "3000", "spec.bestOfN.rewardTimeoutMilliseconds"),
    ],
)
def test_policy_refuses_bad_best_of_n_fields(field: str, value: object, path: str) -> None:
    with pytest.raises(PolicyValidationError) as err:
        parse_policy(policy_doc({field: value}))
    assert path in err.value.paths


def test_crd_checks_the_reference_tier_and_the_new_fields() -> None:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in schema["x-kubernetes-validations"]]
    assert any("self.bestOfN.referenceTier" in r for r in rules)
    props = schema["properties"]["bestOfN"]["properties"]
    assert props["rewardTimeoutMilliseconds"]["default"] == 3000
    assert props["minReward"]["type"] == "string"
    assert props["minReward"]["pattern"].startswith("^-?")


# -- the router's config ----------------------------------------------------------------------------------------


def test_from_policy_reaches_the_reward_service_the_operator_deploys() -> None:
    cfg = from_policy(policy({}))
    assert cfg.best_of_n == BestOfNConfig(
        tier="small",
        max_samples=4,
        reward_url="http://p-reward.ns.svc:8000",
        reward_model="org/reward",
        reference_tier="large",  # the strongest tier by default
        timeout_s=3.0,
        min_reward=None,
    )
    cfg = from_policy(
        policy({"referenceTier": "small", "rewardTimeoutMilliseconds": 250, "minReward": "-0.25"}),
        reward_url="http://reward.example:9000/",
    )
    b = cfg.best_of_n
    assert b is not None
    assert (b.reward_url, b.reference_tier, b.timeout_s, b.min_reward) == (
        "http://reward.example:9000",
        "small",
        0.25,
        -0.25,
    )
    assert from_policy(policy()).best_of_n is None


def parse_serve(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cmd_serve.configure(p)
    return p.parse_args(list(argv))


def local(*argv: str, pol: RoutingPolicy | None = None) -> RouterConfig:
    args = parse_serve(*argv)
    return serve_config(pol, cmd_serve.overrides(args), None)


TIERS = ("--tier", "small=http://127.0.0.1:1/v1", "--tier", "large=http://127.0.0.1:2/v1", "--threshold-bp", "5000")


def test_serve_flags_turn_best_of_n_on() -> None:
    cfg = local(*TIERS, "--best-of-n", "small=4", "--reward-url", "http://127.0.0.1:9/")
    assert cfg.best_of_n == BestOfNConfig("small", 4, "http://127.0.0.1:9", None, "large")
    cfg = local(
        *TIERS,
        "--best-of-n",
        "large=16",
        "--reward-url",
        "http://127.0.0.1:9",
        "--reward-model",
        "rm",
        "--reward-timeout-ms",
        "250",
        "--min-reward",
        "-2.5",
        "--reference-tier",
        "small",
    )
    assert cfg.best_of_n == BestOfNConfig("large", 16, "http://127.0.0.1:9", "rm", "small", 0.25, -2.5)


def test_serve_flags_refine_the_policys_best_of_n() -> None:
    cfg = local("--best-of-n", "large=2", "--reward-url", "http://127.0.0.1:9", pol=policy({"minReward": "1"}))
    assert cfg.best_of_n == BestOfNConfig("large", 2, "http://127.0.0.1:9", "org/reward", "large", 3.0, 1.0)
    cfg = local("--reward-timeout-ms", "100", pol=policy({}))
    b = cfg.best_of_n
    assert b is not None
    assert (b.tier, b.timeout_s, b.reward_url) == ("small", 0.1, "http://p-reward.ns.svc:8000")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("--best-of-n", "small=4"), "give both --best-of-n TIER=N and --reward-url URL"),
        (("--reward-url", "http://127.0.0.1:9"), "give both --best-of-n TIER=N and --reward-url URL"),
        (("--best-of-n", "small=17", "--reward-url", "http://x:1"), "expected TIER=N with N in 1..16"),
        (("--best-of-n", "small=0", "--reward-url", "http://x:1"), "expected TIER=N"),
        (("--best-of-n", "small", "--reward-url", "http://x:1"), "expected TIER=N"),
        (("--best-of-n", "=4", "--reward-url", "http://x:1"), "expected TIER=N"),
        (("--best-of-n", "huge=4", "--reward-url", "http://x:1"), "best_of_n.tier: unknown tier 'huge'"),
        (("--best-of-n", "small=4", "--reward-url", "ftp://x:1"), "best_of_n.reward_url"),
        (("--best-of-n", "small=4", "--reward-url", "http://x:1/v1"), "give the server's root"),
        (("--best-of-n", "small=4", "--reward-url", "http://x:1", "--min-reward", "high"), "--min-reward"),
        (("--best-of-n", "small=4", "--reward-url", "http://x:1", "--min-reward", "nan"), "must be finite"),
        (("--best-of-n", "small=4", "--reward-url", "http://x:1", "--reward-timeout-ms", "0"), "at least 1"),
        (("--best-of-n", "small=4", "--reward-url", "http://x:1", "--reference-tier", "x"), "reference_tier"),
    ],
)
def test_serve_refuses_bad_best_of_n_flags(argv: tuple[str, ...], needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        local(*TIERS, *argv)
    assert needle in str(err.value)


def test_the_config_checks_its_best_of_n() -> None:
    tiers = (tier_at("small", "http://s/v1"), tier_at("large", "http://l/v1"))
    ok = BestOfNConfig("small", 4, "http://r:1", None, "large")
    RouterConfig(tiers=tiers, best_of_n=ok)
    for bad, needle in (
        (dataclasses.replace(ok, max_samples=0), "max_samples"),
        (dataclasses.replace(ok, max_samples=17), "max_samples"),
        (dataclasses.replace(ok, reference_tier="mid"), "reference_tier"),
        (dataclasses.replace(ok, timeout_s=0.0), "timeout_s"),
        (dataclasses.replace(ok, min_reward=float("inf")), "min_reward"),
    ):
        with pytest.raises(ConfigError, match=needle):
            RouterConfig(tiers=tiers, best_of_n=bad)


# -- the decision ------------------------------------------------------------------------------------------------


class Fixed:
    """A classifier answering one verdict for every prompt."""

    def __init__(self, verdict: object) -> None:
        self.verdict = verdict

    def __call__(self, prompts: Sequence[str]) -> list[Any]:
        return [self.verdict for _ in prompts]


def route(cfg: RouterConfig, verdict: object, model: str = "tiergate") -> tuple[str, int]:
    async def go() -> tuple[str, int]:
        router = Router(cfg, MicroBatcher(Fixed(verdict)))
        try:
            r = await router.route(model, "a prompt of forty characters, give or ta")
            return r.chain[0], r.samples
        finally:
            await router.aclose()

    return asyncio.run(go())


TWO = (tier_at("small", "http://s/v1", model="org/small"), tier_at("large", "http://l/v1", model="org/large"))


def test_without_candidate_heads_what_goes_to_the_best_of_n_tier_gets_max_samples() -> None:
    cfg = RouterConfig(tiers=TWO, best_of_n=BestOfNConfig("small", 4, "http://r:1", None, "large"))
    assert route(cfg, 0.1) == ("small", 4)
    assert route(cfg, 0.9) == ("large", 1)
    assert route(cfg, 0.1, model="small") == ("small", 1)  # a forced tier: one sample
    on_large = dataclasses.replace(cfg, best_of_n=BestOfNConfig("large", 8, "http://r:1", None, "large"))
    assert route(on_large, 0.9) == ("large", 8)
    assert route(dataclasses.replace(cfg, best_of_n=None), 0.1) == ("small", 1)


def cand(name: str, n: int = 1) -> Candidate:
    model = name.split("@")[0]
    return Candidate(name, model, n, 0.1, 0.2, 100.0)


# Candidates of the served models (org/small at 1, 4 and 16 samples, org/large at 1) and of one not served.
CANDS = (cand("org/small@1"), cand("org/small@4", 4), cand("org/small@16", 16), cand("org/large@1"), cand("x@1"))
TIER_OF = (0, 0, 0, 1, None)


def with_candidates(best_of_n: BestOfNConfig | None) -> RouterConfig:
    return RouterConfig(tiers=TWO, best_of_n=best_of_n, candidates=CandidateRouting(CANDS, TIER_OF, 0))


def test_with_candidate_heads_n_never_exceeds_max_samples_and_only_on_the_best_of_n_tier() -> None:
    on_small = with_candidates(BestOfNConfig("small", 4, "http://r:1", None, "large"))
    assert allowed_candidates(on_small) == (True, True, False, True, False)
    # small@16 and x@1 predict the most, but n = 16 > N and x is served by no tier: small@4 it is.
    assert route(on_small, (0.5, 0.8, 0.95, 0.7, 0.99)) == ("small", 4)
    assert route(on_small, (0.5, 0.6, 0.95, 0.7, 0.99)) == ("large", 1)
    # Without best-of-N on its tier, n > 1 is never chosen.
    assert allowed_candidates(with_candidates(None)) == (True, False, False, True, False)
    assert route(with_candidates(None), (0.5, 0.8, 0.95, 0.7, 0.99)) == ("large", 1)
    on_large = with_candidates(BestOfNConfig("large", 16, "http://r:1", None, "large"))
    assert route(on_large, (0.5, 0.8, 0.95, 0.7, 0.99)) == ("large", 1)


def test_the_candidates_are_mapped_to_tiers_by_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from tiergate_router.config import candidate_routing_for

    monkeypatch.setattr(candidates_module, "candidates_of", lambda art: CANDS)

    class Source:
        source = Path("candidates.json")
        artifact: Any = None
        default_cost_weight_bp = 123

    routing = candidate_routing_for(TWO, Source(), None)  # type: ignore[arg-type]
    assert routing == CandidateRouting(CANDS, TIER_OF, 123)
    with pytest.raises(ConfigError, match="no tier serves a model"):
        candidate_routing_for((tier_at("other", "http://o/v1"),), Source(), 5)  # type: ignore[arg-type]


def test_a_candidates_artifact_chooses_tier_and_n_within_the_best_of_n_bound(tmp_path: Path) -> None:
    # The real path: a `candidates` artifact saved, loaded by the router's classifier loader, mapped onto the
    # served tiers by `tiergate serve`'s config; its head is random, so what is checked is the bound on n.
    from tests.support.routing import FakeEncoder, tiny_candidates_artifact
    from tiergate.routing.artifact import save_artifact
    from tiergate_router.artifact_classifier import load_classifier

    path = tmp_path / "candidates.json"
    save_artifact(tiny_candidates_artifact(seed=3), path)  # small@1, small@4, big@1
    loaded = load_classifier(path, encoder_factory=lambda art: FakeEncoder())
    assert loaded.kind == "candidates"
    flags = ("--tier", "small=http://127.0.0.1:1/v1", "--tier", "big=http://127.0.0.1:2/v1", "--cost-weight-bp", "0")

    def config(*argv: str) -> RouterConfig:
        return serve_config(None, cmd_serve.overrides(parse_serve(*flags, *argv)), loaded)

    cfg = config("--best-of-n", "small=4", "--reward-url", "http://127.0.0.1:9")
    assert cfg.candidates is not None
    assert cfg.candidates.tier_of == (0, 0, 1)
    assert cfg.candidates.cost_weight_bp == 0
    assert allowed_candidates(cfg) == (True, True, True)
    # N = 2 < 4: small@4 may never be chosen; without best-of-N neither.
    assert allowed_candidates(config("--best-of-n", "small=2", "--reward-url", "http://127.0.0.1:9")) == (
        True,
        False,
        True,
    )
    assert allowed_candidates(config()) == (True, False, True)

    async def routes(c: RouterConfig) -> set[tuple[str, int]]:
        router = Router(c, loaded.classifier)
        out = set()
        for i in range(40):
            r = await router.route("tiergate", f"prompt number {i} " * (i % 7 + 1))
            out.add((r.chain[0], r.samples))
        return out

    # With N = 4 the head picks small@4 for some prompts (so the bound below has something to remove) ...
    assert ("small", 4) in asyncio.run(routes(cfg))
    # ... and with N = 2 never.
    seen = asyncio.run(routes(config("--best-of-n", "small=2", "--reward-url", "http://127.0.0.1:9")))
    assert seen <= {("small", 1), ("big", 1)}
    with pytest.raises(ConfigError, match="--threshold-bp"):
        config("--threshold-bp", "5000")


def test_the_policys_prices_price_the_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Priced tiers' prices are what their candidates cost with a given weight; the calibrated default holds only
    for prices one factor times the artifact's (input and output alike), and other ratios are refused."""
    from tiergate_router.config import candidate_routing_for

    monkeypatch.setattr(candidates_module, "candidates_of", lambda art: CANDS)

    class Source:
        source = Path("candidates.json")
        artifact: Any = None
        default_cost_weight_bp = 123

    def priced(small: tuple[float, float], large: tuple[float, float]) -> tuple[Any, ...]:
        return (
            tier_at("small", "http://s/v1", model="org/small", price_per_mtok=small),
            tier_at("large", "http://l/v1", model="org/large", price_per_mtok=large),
        )

    art_in = {c.model: (c.input_usd_per_mtok, c.output_usd_per_mtok) for c in CANDS}
    own = priced(art_in["org/small"], art_in["org/large"])
    assert candidate_routing_for(own, Source(), None) == CandidateRouting(CANDS, TIER_OF, 123)
    doubled = priced(
        (2 * art_in["org/small"][0], 2 * art_in["org/small"][1]),
        (2 * art_in["org/large"][0], 2 * art_in["org/large"][1]),
    )
    # The same choice at the calibrated weight: the artifact's prices are kept.
    assert candidate_routing_for(doubled, Source(), None) == CandidateRouting(CANDS, TIER_OF, 123)
    other = priced((0.5, 0.5), (1.0, 9.0))
    with pytest.raises(ConfigError, match=r"tier \w+: its (input|output) price .* is not the candidates artifact's"):
        candidate_routing_for(other, Source(), None)
    # A given weight is against the policy's prices: those price the candidates of the tiers' models.
    routing = candidate_routing_for(other, Source(), 40)
    by_name = {c.name: c for c in routing.candidates}
    assert (by_name["org/small@4"].input_usd_per_mtok, by_name["org/small@4"].output_usd_per_mtok) == (0.5, 0.5)
    assert (by_name["org/large@1"].input_usd_per_mtok, by_name["org/large@1"].output_usd_per_mtok) == (1.0, 9.0)
    assert by_name["x@1"] == CANDS[4]  # no tier serves it: untouched (and never chosen)
    assert routing.cost_weight_bp == 40
