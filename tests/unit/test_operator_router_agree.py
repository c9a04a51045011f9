"""The operator refuses exactly the policy-and-artifact pairs the router would refuse: the operator's check
(`tiergate_operator.classifier.artifact_misfit`, `references.unservable_tiers`) and the router's config builder
(`tiergate_router.config.from_policy`) give one verdict per case, so a policy is never applied only to crash-loop
its router, and never refused when the router would serve it. (Affordability of a budget is the router's alone.)"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.artifacts import fit_to_shipped_n_tier as fit
from tiergate.api import parse_policy
from tiergate.routing.artifact import load_artifact
from tiergate_operator import classifier as oc
from tiergate_operator.references import unservable_tiers
from tiergate_router.artifact_classifier import LoadedClassifier, default_artifact_path
from tiergate_router.classifier import MicroBatcher
from tiergate_router.config import ConfigError, from_policy
from tiergate_router.config.knobs import TWO_TIER_KNOBS

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"
TWO = default_artifact_path()
MULTI = TWO.with_name("multi-tier.json")
Mutation = Callable[[dict[str, Any]], None]


def three(d: dict[str, Any]) -> None:
    mid = copy.deepcopy(d["spec"]["tiers"][0])
    mid["name"] = "mid"
    d["spec"]["tiers"].insert(1, mid)


def router(**knobs: Any) -> Mutation:
    def go(d: dict[str, Any]) -> None:
        d["spec"]["router"].pop("targetStrongShareBasisPoints", None)
        d["spec"]["router"].update(knobs)

    return go


def large(**changes: Any) -> Mutation:
    return lambda d: d["spec"]["tiers"][-1].update(changes)


def large_price(**changes: str) -> Mutation:
    return lambda d: d["spec"]["tiers"][-1]["price"].update(changes)


def doubled(d: dict[str, Any]) -> None:
    for t in d["spec"]["tiers"]:
        t["price"]["outputPerMillion"] = f"{3 * float(t['price']['inputPerMillion']):.6f}"


def no_classifier(d: dict[str, Any]) -> None:
    del d["spec"]["router"]["classifier"]


# (id, refused, artifact the ConfigMap holds (None: no classifier, the shipped two-tier default), mutations)
CASES: list[tuple[str, bool, Path | None, list[Mutation]]] = [
    ("n-tier-fits", False, MULTI, [fit]),
    ("n-tier-three-tiers", False, MULTI, [three, fit]),
    ("n-tier-two-tier-knob", True, MULTI, [fit, router(thresholdBasisPoints=5000)]),
    ("n-tier-share-knob", True, MULTI, [fit, router(targetStrongShareBasisPoints=2000)]),
    ("n-tier-unknown-tier", True, MULTI, [fit, large(servedModelName="gpt-9", model="org/gpt-9")]),
    ("n-tier-two-on-one", True, MULTI, [fit, large(servedModelName="gemma-2-9b-it")]),
    ("n-tier-by-model", False, MULTI, [fit, large(servedModelName="x-large", model="llama-3.1-nemotron-51b-instruct")]),
    ("n-tier-off-ratio", True, MULTI, [fit, large_price(inputPerMillion="5")]),
    ("n-tier-off-ratio-budget", True, MULTI, [fit, large_price(inputPerMillion="5"), router(budgetPerMillion="1")]),
    (
        "n-tier-off-ratio-weight",
        False,
        MULTI,
        [fit, large_price(inputPerMillion="5"), router(costWeightBasisPoints=500)],
    ),
    ("n-tier-doubled", False, MULTI, [fit, doubled]),
    ("n-tier-doubled-budget", False, MULTI, [fit, doubled, router(budgetPerMillion="10")]),
    ("n-tier-personalization", False, MULTI, [fit, router(personalization={"enabled": True})]),
    ("two-tier-sample", False, TWO, []),
    ("two-tier-three-tiers", True, TWO, [three]),
    ("two-tier-weight-knob", True, TWO, [router(costWeightBasisPoints=500)]),
    ("two-tier-budget-knob", True, TWO, [router(budgetPerMillion="1")]),
    ("two-tier-personalization", True, TWO, [router(personalization={"enabled": True})]),
    ("default-sample", False, None, [no_classifier]),
    ("default-three-tiers", True, None, [no_classifier, three]),
    ("default-weight-knob", True, None, [no_classifier, router(costWeightBasisPoints=500)]),
]


def _doc(mutations: list[Mutation]) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update({"namespace": "team-a", "uid": "u", "generation": 1})
    for m in mutations:
        m(doc)
    return doc


def _operator_refuses(doc: dict[str, Any], artifact: Path | None) -> bool:
    policy = parse_policy(doc)
    if artifact is None:
        return unservable_tiers(policy) is not None
    cm = {"metadata": {"name": "chat-router-artifact"}, "data": {"router.json": artifact.read_text()}}
    found = oc.read_source(policy, cm)
    assert found is not None
    return isinstance(found, oc.ClassifierProblem)


def _router_refuses(doc: dict[str, Any], artifact: Path | None) -> bool:
    path = artifact or TWO
    art = load_artifact(path)
    loaded = LoadedClassifier(MicroBatcher(lambda prompts: []), path, art, scorer=None)  # type: ignore[arg-type]
    policy = parse_policy(doc)
    try:
        if art.kind == "multi_tier":
            from_policy(policy, multi=loaded)
        else:
            from_policy(policy, thresholds=loaded)
    except ConfigError:
        return True
    return False


@pytest.mark.parametrize(("case", "refused", "artifact", "mutations"), CASES, ids=[c[0] for c in CASES])
def test_operator_and_router_agree(case: str, refused: bool, artifact: Path | None, mutations: list[Mutation]) -> None:
    doc = _doc(mutations)
    assert _router_refuses(doc, artifact) is refused, case
    assert _operator_refuses(doc, artifact) is refused, case


def test_the_knob_sets_are_one() -> None:
    assert oc.TWO_TIER_KNOBS == TWO_TIER_KNOBS


# A `candidates` (BEST-Route) artifact over the sample's served models, at the sample's prices.
SAMPLE_CANDIDATES = (
    ("qwen2.5-7b@1", "qwen2.5-7b", 1, 0.10, 0.30),
    ("qwen2.5-7b@4", "qwen2.5-7b", 4, 0.10, 0.30),
    ("qwen2.5-72b@1", "qwen2.5-72b", 1, 0.90, 2.70),
)


def _no_model_served(d: dict[str, Any]) -> None:
    for i, t in enumerate(d["spec"]["tiers"]):
        t.update(servedModelName=f"other-{i}", model=f"org/other-{i}")


CANDIDATE_CASES: list[tuple[str, bool, list[Mutation]]] = [
    ("candidates-fit", False, []),
    (
        "candidates-doubled",
        False,
        [
            large_price(inputPerMillion="1.80", outputPerMillion="5.40"),
            lambda d: d["spec"]["tiers"][0]["price"].update(inputPerMillion="0.20", outputPerMillion="0.60"),
        ],
    ),
    ("candidates-off-ratio", True, [large_price(inputPerMillion="5")]),
    ("candidates-off-ratio-weight", False, [large_price(inputPerMillion="5"), router(costWeightBasisPoints=40)]),
    ("candidates-budget-knob", True, [router(budgetPerMillion="1")]),
    ("candidates-two-tier-knob", True, [router(thresholdBasisPoints=5000)]),
    ("candidates-no-model-served", True, [_no_model_served]),
    ("candidates-personalization", True, [router(personalization={"enabled": True})]),
]


@pytest.mark.parametrize(("case", "refused", "mutations"), CANDIDATE_CASES, ids=[c[0] for c in CANDIDATE_CASES])
def test_operator_and_router_agree_on_candidates_artifacts(
    case: str, refused: bool, mutations: list[Mutation], tmp_path: Path
) -> None:
    from dataclasses import replace

    from tests.support.routing import tiny_candidates_artifact
    from tiergate.routing.artifact import Tier, save_artifact

    tiers = [
        Tier(name=n, price=i + o, model=m, n=k, input_usd_per_mtok=i, output_usd_per_mtok=o, output_tokens=300.0)
        for n, m, k, i, o in SAMPLE_CANDIDATES
    ]
    path = tmp_path / "candidates.json"
    save_artifact(replace(tiny_candidates_artifact(), tiers=tiers, reference="qwen2.5-72b@1"), path)
    doc = _doc([router(), *mutations])  # the sample's share knob is a two-tier one
    loaded = LoadedClassifier(MicroBatcher(lambda prompts: []), path, load_artifact(path), scorer=None)  # type: ignore[arg-type]
    try:
        from_policy(parse_policy(doc), candidates=loaded)
        router_refused = False
    except ConfigError:
        router_refused = True
    assert router_refused is refused, case
    assert _operator_refuses(doc, path) is refused, case
