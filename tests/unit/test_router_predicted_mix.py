"""The mix a config's operating point predicts (tiergate_router.config.predicted) and its gauge: the figures the
shipped artifacts' calibration tables hold, and nothing where the calibration does not describe the config."""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit.test_router_config import TwoTier
from tiergate.routing.artifact import DEFAULT_MULTI_TIER, DEFAULT_TWO_TIER, RouterArtifact, load_artifact
from tiergate.routing.operating_points import BP, CalibrationTable, ThresholdPoint, shares_at, strong_share_at
from tiergate_router.config import RouterConfig, ShadowConfig, tier_at
from tiergate_router.config.local import LocalOverrides
from tiergate_router.config.predicted import blended_mix_bp, predicted_mix_bp, with_predicted_mix
from tiergate_router.config.serve import serve_config
from tiergate_router.config.shadow import ShadowFlags
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


# --- with shadow routing and a canary (spec.shadow, spec.router.canary) ------------------------------------------


class _Calibrated(TwoTier):
    """A loaded two-tier artifact whose calibration puts `strong_share` on the strong tier at its default threshold."""

    def __init__(self, strong_share: float) -> None:
        super().__init__()
        self.strong_share = strong_share

    @property
    def artifact(self) -> RouterArtifact:
        from types import SimpleNamespace

        table = CalibrationTable(thresholds=(ThresholdPoint(self.default_threshold_bp, self.strong_share, 0.5, 0.0),))
        art: RouterArtifact = SimpleNamespace(kind="two_tier", calibration=table)  # type: ignore[assignment]
        return art


def test_baseline_shadow_predicts_nothing_and_mirror_keeps_the_prediction() -> None:
    art = load_artifact(DEFAULT_TWO_TIER)
    cfg = two_tiers(5000)
    assert predicted_mix_bp(cfg, art) is not None
    # Baseline: the baseline tier serves everything, whatever the calibration says the decisions are.
    baseline = dataclasses.replace(cfg, shadow=ShadowConfig(mode="Baseline", baseline_tier="large"))
    assert predicted_mix_bp(baseline, art) is None
    mirror = ShadowConfig(mode="Mirror", baseline_tier="large", sample_rate_bp=100, reward_url="http://r:1")
    assert predicted_mix_bp(dataclasses.replace(cfg, shadow=mirror), art) == predicted_mix_bp(cfg, art)


def test_a_canary_blends_the_two_predictions_by_its_share() -> None:
    assert blended_mix_bp((8000, 2000), (2000, 8000), 2500) == (6500, 3500)
    assert blended_mix_bp((8000, 2000), (2000, 8000), 0) == (8000, 2000)
    assert blended_mix_bp((8000, 2000), None, 2500) is None
    assert blended_mix_bp(None, (2000, 8000), 2500) is None
    # Through serve_config: a primary predicting 20 % strong, a canary 60 %, the canary deciding 25 %.
    flags = (("small", "http://a/v1"), ("large", "http://b/v1"))
    local = LocalOverrides(tiers=flags, shadow=ShadowFlags(canary_share_bp=2500))
    cfg = serve_config(None, local, _Calibrated(0.2), canary=_Calibrated(0.6))
    assert cfg.canary is not None
    assert cfg.predicted_mix_bp == (7000, 3000)
    # Without the canary: the primary's own prediction.
    assert serve_config(None, local, _Calibrated(0.2)).predicted_mix_bp == (8000, 2000)
    # Baseline shadow on top: nothing, canary or not.
    baseline = dataclasses.replace(local, shadow=ShadowFlags(mode_tier=("Baseline", "large"), canary_share_bp=2500))
    assert serve_config(None, baseline, _Calibrated(0.2), canary=_Calibrated(0.6)).predicted_mix_bp is None
