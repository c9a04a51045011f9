"""The BEST-Route run-time rule (tiergate.routing.candidates) and the `candidates` artifact kind."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.support.routing import TINY_CANDIDATES, FakeEncoder, tiny_artifact, tiny_candidates_artifact
from tiergate.routing.artifact import DEFAULT_MULTI_TIER, DEFAULT_TWO_TIER, dumps, load_artifact, save_artifact
from tiergate.routing.candidates import (
    Candidate,
    candidate_costs,
    candidates_of,
    choose_candidate,
    choose_rows,
    input_tokens,
    parse_candidate,
)
from tiergate.routing.errors import ArtifactError, RoutingError
from tiergate.routing.scorer import Scorer

CANDS = candidates_of(tiny_candidates_artifact())
ALL = [True, True, True]


def test_candidates_of_reads_every_field_in_head_order() -> None:
    assert tuple(Candidate(*row) for row in TINY_CANDIDATES) == CANDS
    with pytest.raises(ArtifactError, match="no candidates"):
        candidates_of(tiny_artifact("multi_tier", tiers=3))


def test_input_tokens_is_ceil_chars_over_four() -> None:
    assert [input_tokens(t) for t in ("", "a", "abcd", "abcde", "x" * 400)] == [0, 1, 1, 2, 100]


def test_costs_follow_the_formula() -> None:
    # small@4: (100 * 0.2 + 4 * 300 * 0.2) / 1e6; big@1: (100 * 10 + 500 * 30) / 1e6.
    np.testing.assert_allclose(candidate_costs(CANDS, 100), [80e-6, 260e-6, 16000e-6])


def test_zero_weight_takes_the_best_predicted_quality_and_a_large_weight_the_cheapest() -> None:
    row = [0.5, 0.7, 0.9]
    assert choose_candidate(row, CANDS, 100, 0, ALL) == 2
    assert choose_candidate(row, CANDS, 100, 100000, ALL) == 0
    # lambda 0.05 per $/1k prompts: big@1 costs 16 $/1k (0.9 - 0.8), small@4 0.26 (0.7 - 0.013): small@4 wins.
    assert choose_candidate(row, CANDS, 100, 500, ALL) == 1
    # lambda 0.01: big@1 keeps 0.9 - 0.16 = 0.74 > 0.6974.
    assert choose_candidate(row, CANDS, 100, 100, ALL) == 2


def test_never_a_disallowed_candidate_and_nothing_allowed_is_a_value_error() -> None:
    row = [0.5, 0.7, 0.9]
    assert choose_candidate(row, CANDS, 100, 0, [True, True, False]) == 1
    assert choose_candidate(row, CANDS, 100, 0, [True, False, False]) == 0
    with pytest.raises(ValueError, match="no candidate"):
        choose_candidate(row, CANDS, 100, 0, [False, False, False])


def test_ties_go_to_the_cheaper_candidate() -> None:
    # Equal predicted quality and weight 0: the cheapest wins whatever the order of the candidates.
    assert choose_candidate([0.8, 0.8, 0.8], CANDS, 100, 0, ALL) == 0
    rev = tuple(reversed(CANDS))
    assert choose_candidate([0.8, 0.8, 0.8], rev, 100, 0, ALL) == 2


def test_batch_rule_is_the_single_prompt_rule() -> None:
    rng = np.random.default_rng(1)
    q = rng.uniform(0.5, 1.0, size=(200, 3))
    t_in = rng.integers(1, 2000, size=200)
    costs = np.stack([candidate_costs(CANDS, int(t)) for t in t_in])
    for bp in (0, 5, 50, 500):
        batch = choose_rows(q, costs, bp)
        assert list(batch) == [choose_candidate(q[i], CANDS, int(t_in[i]), bp, ALL) for i in range(200)]


def test_bad_knob_and_shapes_are_refused() -> None:
    with pytest.raises(RoutingError, match="cost weight"):
        choose_candidate([0.5, 0.6, 0.7], CANDS, 10, -1, ALL)
    with pytest.raises(RoutingError, match="differ"):
        choose_candidate([0.5, 0.6], CANDS, 10, 0, ALL)


def test_parse_candidate() -> None:
    assert parse_candidate("zephyr-7b-beta@16") == ("zephyr-7b-beta", 16)
    assert parse_candidate("plain") == ("plain", 1)
    for bad in ("m@0", "m@x", "@3", "m@"):
        with pytest.raises(RoutingError, match="MODEL@N"):
            parse_candidate(bad)


def test_candidates_artifact_round_trips_and_scores(tmp_path: Path) -> None:
    art = tiny_candidates_artifact()
    p = tmp_path / "c.json"
    save_artifact(art, p)
    doc = json.loads(p.read_text())
    assert doc["kind"] == "candidates"
    assert doc["reference"] == "big@1"
    assert doc["tiers"][1] == {
        "name": "small@4",
        "price": 0.4,
        "model": "small",
        "n": 4,
        "input_usd_per_mtok": 0.2,
        "output_usd_per_mtok": 0.2,
        "output_tokens": 300.0,
    }
    back = load_artifact(p)
    assert back.tiers == art.tiers
    assert back.reference == "big@1"
    prompts = ["a short one", "x" * 4000]
    scorer = Scorer(back, FakeEncoder())
    q = scorer.quality(prompts)
    chosen = scorer.choose(prompts, cost_weight_bp=0)
    assert list(chosen) == [choose_candidate(q[i], CANDS, input_tokens(t), 0, ALL) for i, t in enumerate(prompts)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reference": "nope@1"}, "not one of the candidates"),
        ({"reference": "small@4"}, "one-sample"),
        ({"label_mode": "difference"}, "regresses quality"),
    ],
)
def test_bad_candidates_artifacts_are_refused(change: dict[str, str], message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        dumps(replace(tiny_candidates_artifact(), **change))  # type: ignore[arg-type]


def test_candidate_fields_on_other_kinds_are_refused() -> None:
    art = tiny_artifact("multi_tier", tiers=3)
    with pytest.raises(ArtifactError, match="carries no reference"):
        dumps(replace(art, reference="m0"))
    cand = tiny_candidates_artifact()
    missing = replace(cand, tiers=[replace(t, output_tokens=None) for t in cand.tiers])
    with pytest.raises(ArtifactError, match="output_tokens"):
        dumps(missing)


@pytest.mark.parametrize("path", [DEFAULT_TWO_TIER, DEFAULT_MULTI_TIER])
def test_shipped_defaults_are_unchanged_by_the_candidates_kind(path: Path) -> None:
    # Loading and re-writing a shipped artifact gives its exact bytes: the new optional fields write nothing.
    assert dumps(load_artifact(path)) == path.read_bytes()
