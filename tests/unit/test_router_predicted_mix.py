"""The mix a config's operating point predicts (tiergate_router.config.predicted) and its gauge: the figures the
shipped artifacts' calibration tables hold, and nothing where the calibration does not describe the config."""

from __future__ import annotations

import dataclasses

import pytest

from tiergate.routing.artifact import DEFAULT_MULTI_TIER, DEFAULT_TWO_TIER, load_artifact
from tiergate.routing.operating_points import BP, shares_at, strong_share_at
from tiergate_router.config import RouterConfig, tier_at
from tiergate_router.config.predicted import predicted_mix_bp, with_predicted_mix
from tiergate_router.config.types import MultiTier
from tiergate_router.errors import ConfigError
from tiergate_router.metrics import RouterMetrics


def two_tiers(threshold_bp: int) -> RouterConfig:
    return RouterConfig(
        tiers=(tier_at("small", "http://127.0.0.1:1/v1"), tier_at("large", "http://127.0.0.1:2/v1")),
        thresholds_bp=(threshold_bp,),
    )


def test_two_tier_prediction_is_the_calibrated_share_at_the_threshold() -> None:
    art = load_artifact(DEFAULT_TWO_TIER)
    table = art.calibration.thresholds
    point = table[len(table) // 2]
    assert predicted_mix_bp(two_tiers(point.threshold_bp), art) == (
        BP - round(point.strong_share * BP),
        round(point.strong_share * BP),
    )
    # Between two calibrated thresholds: between their shares (the share falls as the threshold rises).
    pts = sorted(table, key=lambda p: p.threshold_bp)
    lo, hi = pts[40], pts[41]
    if hi.threshold_bp - lo.threshold_bp > 1:
        mid = strong_share_at(table, (lo.threshold_bp + hi.threshold_bp) // 2)
        assert mid is not None
        assert hi.strong_share <= mid <= lo.strong_share
    # A lower threshold sends more to the strong tier.
    low, high = predicted_mix_bp(two_tiers(1000), art), predicted_mix_bp(two_tiers(9000), art)
    assert low is not None
    assert high is not None
    assert low[1] > high[1]


def test_n_tier_prediction_needs_every_artifact_tier_at_the_artifacts_prices() -> None:
    art = load_artifact(DEFAULT_MULTI_TIER)
    names = [t.name for t in art.tiers]
    tiers = tuple(tier_at(f"t{i}", f"http://127.0.0.1:{i + 1}/v1", model=n) for i, n in enumerate(names))
    prices = tuple(float(t.price) for t in art.tiers)
    weight = art.calibration.cost_weights[4]
    mt = MultiTier(art, tuple(range(len(names))), weight.cost_weight_bp, prices)
    cfg = RouterConfig(tiers=tiers, thresholds_bp=(5000,) * (len(tiers) - 1), multi_tier=mt)
    got = predicted_mix_bp(cfg, art)
    assert got == tuple(round(s * BP) for s in weight.shares)
    assert shares_at(art.calibration.cost_weights, weight.cost_weight_bp) == weight.shares
    # Prices of the policy's own (a weight given by hand): the calibration did not measure that choice.
    other = dataclasses.replace(mt, prices=tuple(p * 2 + 1 for p in prices))
    assert predicted_mix_bp(dataclasses.replace(cfg, multi_tier=other), art) is None
    # A subset of the artifact's tiers: neither.
    sub = dataclasses.replace(
        cfg, tiers=tiers[:2], thresholds_bp=(5000,), multi_tier=dataclasses.replace(mt, columns=(0, 1))
    )
    assert predicted_mix_bp(sub, art) is None


def test_no_artifact_or_one_tier_predicts_nothing_and_the_gauge_follows_the_config() -> None:
    assert predicted_mix_bp(two_tiers(5000), None) is None
    one = RouterConfig(tiers=(tier_at("small", "http://127.0.0.1:1/v1"),), thresholds_bp=())
    assert predicted_mix_bp(one, load_artifact(DEFAULT_TWO_TIER)) is None
    cfg = with_predicted_mix(two_tiers(5000), load_artifact(DEFAULT_TWO_TIER))
    assert cfg.predicted_mix_bp is not None
    assert sum(cfg.predicted_mix_bp) == BP
    m = RouterMetrics()
    m.set_predicted_mix(cfg.tier_names, cfg.predicted_mix_bp)
    text = m.render().decode()
    assert f'tiergate_router_predicted_share{{tier="large"}} {cfg.predicted_mix_bp[1] / BP}' in text
    m.set_predicted_mix(cfg.tier_names, None)
    assert "tiergate_router_predicted_share{" not in m.render().decode()
    with pytest.raises(ConfigError, match="predicted_mix_bp"):
        dataclasses.replace(cfg, predicted_mix_bp=(10000,))
