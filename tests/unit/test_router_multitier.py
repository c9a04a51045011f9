"""N-tier artifacts route: policy tiers map to the artifact's tiers, the artifact's rule
(tiergate.routing.operating_points) chooses among the served ones by cost weight, bad mappings are refused at
load and on reload."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import yaml

from tests.support.artifacts import constant_multi_tier_artifact
from tests.support.procs import FakeProcess, fake_tiers
from tests.support.router_serve import REFUSED_ONCE, RELOADED_ONCE, Serve, serve_refusal
from tests.support.waiting import wait_for, write_atomically
from tiergate.api.policy import RoutingPolicy
from tiergate.routing.artifact import DEFAULT_MULTI_TIER, load_artifact
from tiergate.routing.operating_points import choose_tiers
from tiergate_router.artifact_classifier import LoadedClassifier
from tiergate_router.classifier import MicroBatcher
from tiergate_router.config import ConfigError, from_policy
from tiergate_router.decision import choose_multi_tier
from tiergate_router.router import Router

SHIPPED = DEFAULT_MULTI_TIER
SHIPPED_PRICES = {t["name"]: t["price"] for t in json.loads(SHIPPED.read_text())["tiers"]}
# Three of the shipped artifact's nine tiers (prices 0.2, 0.4 and 1.8 $/Mtok there).
SERVED = {"gemma": "gemma-2-9b-it", "llama8b": "llama-3.1-8b-instruct", "nemo51b": "llama-3.1-nemotron-51b-instruct"}
PROMPTS = [
    "What is 2+2?",
    "Write a haiku about autumn.",
    "Prove that there are infinitely many primes.",
    "Translate 'good morning' into French.",
    "Explain the difference between TCP and UDP in detail, with examples of when to use each.",
    "Which of these is a prime number? A) 21 B) 27 C) 29 D) 33",
]


def Source(path: Path, artifact: Any) -> LoadedClassifier:
    """A loaded N-tier artifact without its encoder: all config.multi_tier_for reads."""
    return LoadedClassifier(MicroBatcher(lambda prompts: []), path, artifact, scorer=None)


def policy_doc(tiers: list[dict[str, Any]], router: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "tiergate.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "multi"},
        "spec": {"tiers": tiers, "router": router or {}},
    }


def tier_doc(
    name: str, url: str, *, served: str | None = None, model: str | None = None, price: str | None = None
) -> dict[str, Any]:
    """A tier priced at `price` (input and output $/Mtok each), else at what the shipped artifact charges for the
    tier it maps to (its calibration's prices), else at 0.1 + 0.1."""
    if price is None:
        total = SHIPPED_PRICES.get(served or model or name, 0.2)
        price = f"{total / 2:.9f}"
    doc: dict[str, Any] = {
        "name": name,
        "model": model or f"org/{name}",
        "endpoint": {"url": url},
        "price": {"inputPerMillion": price, "outputPerMillion": price},
    }
    if served is not None:
        doc["servedModelName"] = served
    return doc


def test_policy_tiers_map_by_name_served_model_name_or_model() -> None:
    src = Source(SHIPPED, load_artifact(SHIPPED))
    doc = policy_doc(
        [
            tier_doc("gemma", "http://a/v1", served="gemma-2-9b-it"),  # by servedModelName
            tier_doc("llama8b", "http://b/v1", model="llama-3.1-8b-instruct"),  # by model
            tier_doc("codegemma-7b", "http://c/v1"),  # by name
        ]
    )
    cfg = from_policy(RoutingPolicy.model_validate(doc), multi=src)
    assert cfg.multi_tier is not None
    names = src.tier_names
    assert [names[c] for c in cfg.multi_tier.columns] == ["gemma-2-9b-it", "llama-3.1-8b-instruct", "codegemma-7b"]
    assert cfg.multi_tier.cost_weight_bp == src.artifact.default_cost_weight_bp


@pytest.mark.parametrize(
    ("tiers", "router", "needle"),
    [
        (
            [tier_doc("gemma", "http://a/v1", served="gemma-2-9b-it"), tier_doc("gpt9", "http://b/v1")],
            None,
            r"tiers\[1\] \(gpt9\): matches no tier of the N-tier artifact .*multi-tier.json",
        ),
        (
            [
                tier_doc("a", "http://a/v1", served="gemma-2-9b-it"),
                tier_doc("b", "http://b/v1", model="gemma-2-9b-it"),
            ],
            None,
            r"tiers\[1\] \(b\): maps to artifact tier 'gemma-2-9b-it', as 'a' does",
        ),
        (
            [tier_doc("gemma", "http://a/v1", served="gemma-2-9b-it"), tier_doc("codegemma-7b", "http://b/v1")],
            {"thresholdBasisPoints": 5000},
            r"spec.router.thresholdBasisPoints is a two-tier knob",
        ),
        (
            [tier_doc("gemma", "http://a/v1", served="gemma-2-9b-it"), tier_doc("codegemma-7b", "http://b/v1")],
            {"targetStrongShareBasisPoints": 2000},
            r"spec.router.targetStrongShareBasisPoints is a two-tier knob",
        ),
    ],
)
def test_bad_mappings_and_two_tier_knobs_are_refused(
    tiers: list[dict[str, Any]], router: dict[str, Any] | None, needle: str
) -> None:
    src = Source(SHIPPED, load_artifact(SHIPPED))
    with pytest.raises(ConfigError, match=needle):
        from_policy(RoutingPolicy.model_validate(policy_doc(tiers, router)), multi=src)


def test_policy_cost_weight_and_budget_knobs_set_the_cost_weight() -> None:
    from tiergate.routing.scorer import Scorer

    art = load_artifact(SHIPPED)
    src = LoadedClassifier(MicroBatcher(lambda prompts: []), SHIPPED, art, scorer=Scorer(art, None))
    tiers = [tier_doc("gemma", "http://a/v1", served="gemma-2-9b-it"), tier_doc("codegemma-7b", "http://b/v1")]

    def weight(router: dict[str, Any]) -> int:
        cfg = from_policy(RoutingPolicy.model_validate(policy_doc(tiers, router)), multi=src)
        assert cfg.multi_tier is not None
        return cfg.multi_tier.cost_weight_bp

    assert weight({}) == art.default_cost_weight_bp
    assert weight({"costWeightBasisPoints": 1234}) == 1234
    # A budget picks the best-quality calibrated point whose mean price fits it (the smaller weight on ties), as
    # `tiergate calibrate --budget` does (test_budget_agreement.py checks every budget of a range).
    rows = art.calibration.cost_weights
    costs = sorted({round(p.cost, 6) for p in rows})
    assert len(costs) >= 3  # the calibration spans real trade-offs
    for budget in (costs[0], costs[len(costs) // 2], costs[-1] + 1):
        fits = [p for p in rows if p.cost <= budget + 1e-9]
        want = max(fits, key=lambda p: (p.quality, -p.cost_weight_bp)).cost_weight_bp
        assert weight({"budgetPerMillion": f"{budget:.6f}"}) == want
    # Tighter budgets never buy a smaller weight (more spending).
    assert weight({"budgetPerMillion": f"{costs[0]:.6f}"}) >= weight({"budgetPerMillion": f"{costs[-1]:.6f}"})
    # A budget below every calibrated point is a clear config error (a reload keeps the last good policy).
    below = costs[0] / 2
    with pytest.raises(ConfigError, match=r"budgetPerMillion .*no calibrated operating point costs at most"):
        weight({"budgetPerMillion": f"{below:.6f}"})


def test_n_tier_knobs_are_refused_with_a_two_tier_artifact() -> None:
    doc = policy_doc([tier_doc("small", "http://a/v1"), tier_doc("large", "http://b/v1")], {"budgetPerMillion": 1})
    with pytest.raises(ConfigError, match=r"spec.router.budgetPerMillion is an N-tier knob, but the shipped default"):
        from_policy(RoutingPolicy.model_validate(doc), thresholds=None)
    doc["spec"]["router"] = {"costWeightBasisPoints": 500, "classifier": {"path": "/models/two.json"}}
    with pytest.raises(ConfigError, match=r"costWeightBasisPoints is an N-tier knob, but its classifier artifact"):
        from_policy(RoutingPolicy.model_validate(doc), thresholds=None)


def test_choice_is_the_artifacts_rule_restricted_to_the_served_tiers() -> None:
    art = load_artifact(SHIPPED)
    rng = np.random.default_rng(0)
    quality = rng.uniform(0.2, 0.9, size=(200, len(art.tiers)))
    prices = [t.price for t in art.tiers]
    seen: set[int] = set()
    for columns in ([2, 3, 7], [0, 8], list(range(len(art.tiers)))):
        for bp in (0, 650, 5000):
            for q in quality:
                i, qual = choose_multi_tier(tuple(q), prices, columns, bp)
                # brute force over the served tiers: max of quality - lambda * price, ties to the cheaper tier
                util = [(q[c] - bp / 10000 * art.tiers[c].price, -art.tiers[c].price, -c) for c in columns]
                assert columns[i] == columns[max(range(len(columns)), key=lambda k: util[k])]
                assert qual == pytest.approx(q[columns[i]])
                seen.add(columns[i])
    assert len(seen) >= 3  # the data exercised real choices, not one tier
    # served = all tiers: exactly tiergate.routing's own choice
    full = list(range(len(art.tiers)))
    expected = choose_tiers(quality, prices, 650)
    assert [full[choose_multi_tier(tuple(q), prices, full, 650)[0]] for q in quality] == list(expected)


def test_mapping_follows_the_config_tiers_after_tier_flags(tmp_path: Path) -> None:
    art = constant_multi_tier_artifact(tmp_path / "m.json", [("a", 0.1), ("b", 1.0), ("c", 2.0)], [0.5, 0.6, 0.9])
    src = Source(art, load_artifact(art))
    doc = policy_doc([tier_doc("c", "http://c/v1", price="1"), tier_doc("a", "http://a/v1", price="0.05")])
    cfg = from_policy(RoutingPolicy.model_validate(doc), multi=src)
    assert cfg.multi_tier is not None
    assert cfg.multi_tier.columns == (2, 0)
    # A --tier flag adding a tier: the mapping covers it, in the merged order.
    cfg2 = from_policy(RoutingPolicy.model_validate(doc), multi=src, tier_flags=[("b", "http://b/v1")])
    assert cfg2.multi_tier is not None
    assert cfg2.tier_names == ("c", "a", "b")
    assert cfg2.multi_tier.columns == (2, 0, 1)


def test_the_policys_prices_are_the_prices_the_choice_weighs(tmp_path: Path) -> None:
    """The same predicted qualities and cost weight, two price lists: the artifact's (0.1, 1, 2 $/Mtok) choose
    `mid`; a policy that buys `top` for 0.2 $/Mtok chooses `top`. Through the router's own decision."""
    tiers = [("cheap", 0.1), ("mid", 1.0), ("top", 2.0)]
    art = constant_multi_tier_artifact(tmp_path / "m.json", tiers, [0.5, 0.7, 0.75])
    src = Source(art, load_artifact(art))
    verdict = (0.5, 0.7, 0.75)

    def chosen(top_price: str) -> tuple[str, tuple[float, ...]]:
        tiers = [
            tier_doc("cheap", "http://a/v1", price="0.05"),
            tier_doc("mid", "http://b/v1", price="0.5"),
            tier_doc("top", "http://c/v1", price=top_price),
        ]
        cfg = from_policy(RoutingPolicy.model_validate(policy_doc(tiers, {"costWeightBasisPoints": 1000})), multi=src)
        assert cfg.multi_tier is not None
        return Router._decide(verdict, cfg)[0], cfg.multi_tier.prices

    # lambda 0.1: 0.5 - 0.01, 0.7 - 0.1, 0.75 - 0.2 -> mid; with top at 0.2: 0.75 - 0.02 -> top
    assert chosen("1") == ("mid", (0.1, 1.0, 2.0))
    assert chosen("0.1") == ("top", (0.1, 1.0, 0.2))


def test_prices_the_calibration_does_not_describe_need_a_cost_weight(tmp_path: Path) -> None:
    """The calibrated default weight and budgetPerMillion were measured at the artifact's prices: prices in other
    ratios are refused, naming the tier and the way out; a cost weight (policy or --cost-weight-bp) is taken as
    given against them."""
    art = constant_multi_tier_artifact(tmp_path / "m.json", [("cheap", 0.1), ("top", 2.0)], [0.5, 0.8])
    src = Source(art, load_artifact(art))
    tiers = [tier_doc("cheap", "http://a/v1", price="0.05"), tier_doc("top", "http://c/v1", price="0.1")]
    for router, what in (({}, "the artifact's default cost weight"), ({"budgetPerMillion": 1}, "budgetPerMillion")):
        with pytest.raises(
            ConfigError,
            match=rf"policy multi: tiers\[1\] \(top\).price: 0.2 \$/Mtok \(input \+ output\) is not 1 x the "
            rf"artifact's 2 for top, as the tiers before; .*{what} comes from it. Set a cost weight",
        ):
            from_policy(RoutingPolicy.model_validate(policy_doc(tiers, router)), multi=src)
    cfg = from_policy(RoutingPolicy.model_validate(policy_doc(tiers, {"costWeightBasisPoints": 10})), multi=src)
    assert cfg.multi_tier is not None
    assert (cfg.multi_tier.prices, cfg.multi_tier.cost_weight_bp) == ((0.1, 0.2), 10)
    cfg = from_policy(RoutingPolicy.model_validate(policy_doc(tiers)), multi=src, cost_weight_bp=20)
    assert cfg.multi_tier is not None
    assert (cfg.multi_tier.prices, cfg.multi_tier.cost_weight_bp) == ((0.1, 0.2), 20)


def test_prices_in_the_artifacts_ratios_keep_its_calibration_exactly(tmp_path: Path) -> None:
    """Prices k times the artifact's choose at weight w exactly as the artifact's prices do at w * k: the router
    keeps the calibrated weight on the artifact's prices, and compares a budget as budget / k with the table."""
    from tiergate.routing.artifact import Tier as ArtTier
    from tiergate.routing.artifact import save_artifact
    from tiergate.routing.operating_points import CalibrationTable, CostWeightPoint

    path = constant_multi_tier_artifact(tmp_path / "m.json", [("cheap", 0.1), ("top", 2.0)], [0.5, 0.8])
    base = load_artifact(path)
    table = CalibrationTable(
        cost_weights=(CostWeightPoint(0, 2.0, 0.8, (0.0, 1.0)), CostWeightPoint(2000, 0.1, 0.5, (1.0, 0.0)))
    )
    save_artifact(base.with_updates(calibration=table, tiers=[ArtTier("cheap", 0.1), ArtTier("top", 2.0)]), path)
    src = Source(path, load_artifact(path))
    doubled = [tier_doc("cheap", "http://a/v1", price="0.1"), tier_doc("top", "http://c/v1", price="2")]

    def weight(router: dict[str, Any]) -> tuple[int, tuple[float, ...]]:
        cfg = from_policy(RoutingPolicy.model_validate(policy_doc(doubled, router)), multi=src)
        assert cfg.multi_tier is not None
        return cfg.multi_tier.cost_weight_bp, cfg.multi_tier.prices

    assert weight({}) == (src.default_cost_weight_bp, (0.1, 2.0))
    # 3 $/Mtok at these prices is 1.5 at the artifact's: only the cheap point (0.1) fits; 4 buys the top (2.0 x 2).
    assert weight({"budgetPerMillion": 3}) == (2000, (0.1, 2.0))
    assert weight({"budgetPerMillion": 4}) == (0, (0.1, 2.0))
    with pytest.raises(ConfigError, match=r"the tiers' prices are 2 x the artifact's, so that is 0.1 here"):
        weight({"budgetPerMillion": "0.1"})


def test_tiers_from_flags_are_priced_at_the_artifacts_prices(tmp_path: Path) -> None:
    art = constant_multi_tier_artifact(tmp_path / "m.json", [("a", 0.1), ("b", 1.0), ("c", 2.0)], [0.5, 0.6, 0.9])
    src = Source(art, load_artifact(art))
    doc = policy_doc([tier_doc("a", "http://a/v1", price="0.05")])
    cfg = from_policy(RoutingPolicy.model_validate(doc), multi=src, tier_flags=[("c", "http://c/v1")])
    assert cfg.multi_tier is not None
    assert [cfg.multi_tier.prices[c] for c in cfg.multi_tier.columns] == [0.1, 2.0]
    assert cfg.tiers[1].price_per_mtok is None  # unpriced: the cost metric counts nothing for it either


# -- end to end: `tiergate serve` with real artifacts, the real encoder, fake vLLM tiers over HTTP ---------------


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, FakeProcess]]:
    yield from fake_tiers({name: FakeProcess(model, name=name) for name, model in SERVED.items()})


def shipped_policy(backends: dict[str, FakeProcess], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    tiers = [tier_doc(name, backends[name].base_url, served=model) for name, model in SERVED.items()]
    return policy_doc(tiers, {"classifier": {"path": str(SHIPPED)}, **(extra or {})})


@pytest.mark.slow
def test_serve_policy_with_n_tiers_routes_by_the_artifact(backends: dict[str, FakeProcess], tmp_path: Path) -> None:
    from tiergate_router.artifact_classifier import load_classifier

    # The decisions the artifact makes with the router's own encoder (int8 ONNX, one prompt at a time, as the
    # router scores sequential requests), among the three served tiers.
    loaded = load_classifier(SHIPPED, encoder="onnx-int8")
    names = loaded.tier_names
    columns = [names.index(m) for m in SERVED.values()]
    bp = loaded.default_cost_weight_bp
    prices = [t.price for t in loaded.artifact.tiers]
    expected = [
        list(SERVED)[choose_multi_tier(tuple(loaded.scorer.quality([p])[0]), prices, columns, bp)[0]] for p in PROMPTS
    ]
    assert len(set(expected)) >= 2, expected  # the prompts exercise a real choice

    pol = tmp_path / "policy.yaml"
    pol.write_text(yaml.safe_dump(shipped_policy(backends)))
    s = Serve("-f", str(pol))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="unused", max_retries=0)
        got = []
        for p in PROMPTS:
            raw = client.chat.completions.with_raw_response.create(
                model="tiergate", messages=[{"role": "user", "content": p}], max_tokens=4
            )
            tier = raw.headers["x-tiergate-tier"]
            assert raw.headers["x-tiergate-decision"] == tier
            completion = raw.parse()
            assert completion.model == SERVED[tier]  # the tier's served model name reached its backend
            assert completion.model_extra is not None
            assert 0.0 <= completion.model_extra["tiergate"]["score"] <= 1.0  # the chosen tier's predicted quality
            got.append(tier)
        assert got == expected
        metrics = s.metrics()
        for tier in set(expected):
            line = f'tiergate_router_requests_total{{decision="{tier}",outcome="success",tier="{tier}"}} '
            assert f"{line}{float(expected.count(tier))}" in metrics

        # A reload whose tier the artifact does not know is refused; the last good mapping keeps serving.
        bad = shipped_policy(backends)
        bad["spec"]["tiers"][0]["servedModelName"] = "gpt-unknown"
        write_atomically(pol, yaml.safe_dump(bad))
        wait_for("bad policy noticed", lambda: REFUSED_ONCE in s.metrics(), interval=0.2)
        assert s.chat(PROMPTS[0])[0] == expected[0]
    finally:
        out = s.stop()
    assert "N-tier artifact" in out
    assert "cost weight" in out
    assert "matches no tier of the N-tier artifact" in out


@pytest.mark.slow
def test_serve_policy_cost_weight_knob_chooses_and_reloads(backends: dict[str, FakeProcess], tmp_path: Path) -> None:
    # Weight 0: the best predicted quality whatever the price; 10000 (1 quality unit per $/Mtok): the cheapest
    # served tier, since the predicted qualities differ by far less than the price gaps (0.2 vs 1.8 $/Mtok).
    pol = tmp_path / "policy.yaml"
    pol.write_text(yaml.safe_dump(shipped_policy(backends, {"costWeightBasisPoints": 10000})))
    s = Serve("-f", str(pol))
    try:
        assert {s.chat(p)[0] for p in PROMPTS} == {"gemma"}
        write_atomically(pol, yaml.safe_dump(shipped_policy(backends, {"costWeightBasisPoints": 0})))
        wait_for("policy change picked up", lambda: RELOADED_ONCE in s.metrics(), interval=0.2)
        assert {s.chat(p)[0] for p in PROMPTS} != {"gemma"}
        # An impossible budget is refused on reload; the last good weight keeps serving.
        write_atomically(pol, yaml.safe_dump(shipped_policy(backends, {"budgetPerMillion": "0.0001"})))
        wait_for("bad budget noticed", lambda: REFUSED_ONCE in s.metrics(), interval=0.2)
        assert {s.chat(p)[0] for p in PROMPTS} != {"gemma"}
    finally:
        out = s.stop()
    assert "cost weight 10000 bp" in out
    assert "budgetPerMillion 0.0001" in out


@pytest.mark.slow
def test_serve_tier_flags_with_an_n_tier_artifact_and_a_cost_weight(tmp_path: Path) -> None:
    art = constant_multi_tier_artifact(
        tmp_path / "m.json", [("cheap", 0.1), ("mid", 1.0), ("top", 2.0)], [0.5, 0.7, 0.8]
    )
    fakes = {n: FakeProcess(f"{n}-model", name=n) for n in ("cheap", "mid", "top")}
    try:
        flags = [a for n, f in fakes.items() for a in ("--tier", f"{n}={f.base_url}")]
        # lambda = 0: best quality (top); 0.1: 0.5-0.01, 0.7-0.1, 0.8-0.2 -> mid; 1.0: cheap
        for bp, want in ((0, "top"), (1000, "mid"), (10000, "cheap")):
            s = Serve(*flags, "--router", str(art), "--cost-weight-bp", str(bp))
            try:
                tier, body = s.chat("anything")
                assert tier == want, (bp, tier)
                assert body["tiergate"]["score"] == pytest.approx(
                    {"top": 0.8, "mid": 0.7, "cheap": 0.5}[want], abs=1e-3
                )  # type: ignore[index]
            finally:
                s.stop()
    finally:
        for f in fakes.values():
            f.kill()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--threshold-bp", "5000"], "an N-tier artifact chooses by cost weight"),
        (["--tier", "gpt9=http://127.0.0.1:1/v1"], "(gpt9): matches no tier of the N-tier artifact"),
    ],
)
def test_serve_refuses_two_tier_knobs_and_unknown_tiers_at_start(extra: list[str], needle: str) -> None:
    args = ["--tier", "gemma-2-9b-it=http://127.0.0.1:1/v1", "--tier", "codegemma-7b=http://127.0.0.1:2/v1"]
    args += ["--router", str(SHIPPED), *extra]
    assert needle in serve_refusal(*args, timeout=120)


def test_shipped_multi_tier_artifact_is_n_tier() -> None:
    doc = json.loads(SHIPPED.read_text())
    assert doc["kind"] == "multi_tier"
    assert len(doc["tiers"]) >= 3
