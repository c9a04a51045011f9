"""The one owner of operating points: the typed calibration table and one function per target, no-match included."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tiergate.routing.artifact import DEFAULT_MULTI_TIER, DEFAULT_TWO_TIER, load_artifact, to_json_dict
from tiergate.routing.errors import ArtifactError, NoOperatingPoint, RoutingError
from tiergate.routing.operating_points import (
    COST_WEIGHTS_BP,
    CalibrationTable,
    CostWeightPoint,
    ThresholdPoint,
    choose_tiers,
    cost_weight_for_budget,
    cost_weight_for_quality,
    reaches,
    threshold_bp_at,
    threshold_for_pgr,
    threshold_for_share,
    tier_for_score,
)

THRESHOLDS = (
    ThresholdPoint(threshold_bp=10000, strong_share=0.05, quality=0.6, pgr=0.1),
    ThresholdPoint(threshold_bp=6000, strong_share=0.2, quality=0.7, pgr=0.5),
    ThresholdPoint(threshold_bp=4000, strong_share=0.5, quality=0.75, pgr=0.8),
    ThresholdPoint(threshold_bp=0, strong_share=1.0, quality=0.8, pgr=1.0),
)
# Not monotone on purpose, as measured tables are not: 100 bp spends less than 50 bp and scores higher.
COST_WEIGHTS = (
    CostWeightPoint(cost_weight_bp=0, cost=1.2, quality=0.70, shares=(0.0, 1.0)),
    CostWeightPoint(cost_weight_bp=50, cost=0.9, quality=0.64, shares=(0.25, 0.75)),
    CostWeightPoint(cost_weight_bp=100, cost=0.8, quality=0.66, shares=(0.4, 0.6)),
    CostWeightPoint(cost_weight_bp=200, cost=0.8, quality=0.66, shares=(0.4, 0.6)),
    CostWeightPoint(cost_weight_bp=1000, cost=0.3, quality=0.5, shares=(1.0, 0.0)),
)


@pytest.mark.parametrize("path", [DEFAULT_TWO_TIER, DEFAULT_MULTI_TIER], ids=["two-tier", "multi-tier"])
def test_shipped_tables_parse_typed_and_serialise_unchanged(path: object) -> None:
    assert isinstance(path, Path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    art = load_artifact(path)
    table = art.calibration
    assert len(table) == len(raw["calibration"]) > 10
    if art.kind == "two_tier":
        assert table.thresholds
        assert not table.cost_weights
        assert all(isinstance(p.threshold_bp, int) for p in table.thresholds)
    else:
        assert table.cost_weights
        assert not table.thresholds
        assert [p.cost_weight_bp for p in table.cost_weights] == list(COST_WEIGHTS_BP)
        assert all(len(p.shares) == len(art.tiers) for p in table.cost_weights)
    # The artifact format is unchanged: the typed table writes back the same list, and the same checksum.
    assert table.to_json() == raw["calibration"]
    assert to_json_dict(art)["sha256"] == raw["sha256"]


def test_table_refuses_malformed_rows_and_mixed_kinds() -> None:
    with pytest.raises(ArtifactError, match="malformed operating point"):
        CalibrationTable.from_json([{"threshold_bp": 10, "strong_share": 0.1, "quality": 0.5}], "two_tier")
    with pytest.raises(ArtifactError, match="malformed operating point"):
        CalibrationTable.from_json([{"cost_weight_bp": "x", "cost": 1, "quality": 1, "shares": []}], "multi_tier")
    with pytest.raises(ArtifactError, match="list"):
        CalibrationTable.from_json({"threshold_bp": 1}, "two_tier")
    with pytest.raises(ArtifactError, match="not both"):
        CalibrationTable(thresholds=THRESHOLDS, cost_weights=COST_WEIGHTS)
    assert CalibrationTable.from_json([], "two_tier") == CalibrationTable()


def test_share_target_picks_the_lowest_threshold_within_it() -> None:
    assert threshold_for_share(THRESHOLDS, 0.5).threshold_bp == 4000
    assert threshold_for_share(THRESHOLDS, 0.3).threshold_bp == 6000
    assert threshold_for_share(THRESHOLDS, 1.0).threshold_bp == 0
    assert threshold_for_share(THRESHOLDS, 0.05).threshold_bp == 10000
    with pytest.raises(NoOperatingPoint, match=r"at or below 0.01 \(lowest calibrated 0.0500\)") as e:
        threshold_for_share(THRESHOLDS, 0.01)
    assert e.value.closest == 0.05
    with pytest.raises(RoutingError, match="outside"):
        threshold_for_share(THRESHOLDS, 1.5)


def test_pgr_target_picks_the_highest_threshold_reaching_it() -> None:
    assert threshold_for_pgr(THRESHOLDS, 0.8).threshold_bp == 4000
    assert threshold_for_pgr(THRESHOLDS, 0.5).threshold_bp == 6000
    assert threshold_for_pgr(THRESHOLDS, 0.0).threshold_bp == 10000
    with pytest.raises(NoOperatingPoint, match=r"PGR 1.2 .*best 1.000") as e:
        threshold_for_pgr(THRESHOLDS, 1.2)
    assert e.value.closest == 1.0
    with pytest.raises(RoutingError, match="outside"):
        threshold_for_pgr(THRESHOLDS, -0.1)


def test_budget_target_takes_the_best_quality_that_fits() -> None:
    # 0.95 fits 50, 100, 200 and 1000 bp: the best quality is 100/200 bp's 0.66 (the smaller weight on the tie),
    # not 50 bp, the smallest weight that fits.
    assert cost_weight_for_budget(COST_WEIGHTS, 0.95).cost_weight_bp == 100
    assert cost_weight_for_budget(COST_WEIGHTS, 0.8).cost_weight_bp == 100
    assert cost_weight_for_budget(COST_WEIGHTS, 0.79).cost_weight_bp == 1000
    assert cost_weight_for_budget(COST_WEIGHTS, 5.0).cost_weight_bp == 0
    with pytest.raises(NoOperatingPoint, match=r"costs at most 0.2 \$/Mtok \(cheapest 0.300 \$/Mtok\)") as e:
        cost_weight_for_budget(COST_WEIGHTS, 0.2)
    assert (e.value.target, e.value.closest) == ("budget 0.2 $/Mtok", 0.3)
    with pytest.raises(NoOperatingPoint, match="no calibration table"):
        cost_weight_for_budget((), 1.0)


def test_quality_target_takes_the_cheapest_point_reaching_it() -> None:
    assert cost_weight_for_quality(COST_WEIGHTS, 0.65).cost_weight_bp == 100
    assert cost_weight_for_quality(COST_WEIGHTS, 0.5).cost_weight_bp == 1000
    assert cost_weight_for_quality(COST_WEIGHTS, 0.7).cost_weight_bp == 0
    with pytest.raises(NoOperatingPoint, match=r"best 0\.7000"):
        cost_weight_for_quality(COST_WEIGHTS, 0.71)


def test_score_rule_is_exact_and_threshold_at_is_its_inverse() -> None:
    assert reaches(0.5, 5000)
    assert not reaches(0.49999, 5000)
    assert reaches(0.57, 5700)  # 0.57 * 10000 is 5699.999... in floats: the rule divides instead
    assert not reaches(0.99995, 10000)
    assert reaches(1.0, 10000)
    np.testing.assert_array_equal(reaches(np.array([0.1, 0.3, 0.2]), 2000), [False, True, True])
    rng = np.random.default_rng(0)
    for s in [*rng.uniform(0, 1, 500), 0.0, 0.57, 0.29, 1.0]:
        bp = threshold_bp_at(float(s))
        assert reaches(float(s), bp)
        assert not reaches(float(s), bp + 1)
    assert tier_for_score(0.0, (3000, 7000)) == 0
    assert tier_for_score(0.3, (3000, 7000)) == 1
    assert tier_for_score(0.2999, (3000, 7000)) == 0
    assert tier_for_score(0.7, (3000, 7000)) == 2
    assert tier_for_score(0.5, ()) == 0


def test_quality_rule_trades_quality_for_price_with_ties_to_the_cheaper_tier() -> None:
    q = np.array([[0.5, 0.6, 0.9], [0.7, 0.7, 0.7], [0.1, 0.2, 0.25], [0.9, -math.inf, 0.2]])
    prices = [0.6, 0.2, 0.4]  # not sorted: ties must go by price, not by index
    np.testing.assert_array_equal(choose_tiers(q, prices, 0), [2, 1, 2, 0])
    # lambda 0.5: row 2 utilities -0.2, 0.1, 0.05 -> 1.
    np.testing.assert_array_equal(choose_tiers(q, prices, 5000), [2, 1, 1, 0])
    with pytest.raises(RoutingError, match="non-negative"):
        choose_tiers(q, prices, -1)
    with pytest.raises(RoutingError, match="non-negative"):
        choose_tiers(q, prices, True)
