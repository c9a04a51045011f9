"""Pure routing decisions: score -> tier, and the order in which tiers are tried.

The rules themselves are `tiergate.routing.operating_points`' (the ones calibration and evaluation use); this
module maps them onto the config's tiers.
"""

from __future__ import annotations

from collections.abc import Sequence

from tiergate.routing.operating_points import choose_tiers, tier_for_score


def choose_tier(score: float, tier_names: Sequence[str], thresholds_bp: Sequence[int]) -> str:
    """The highest tier i (cheapest first) whose threshold thresholds_bp[i-1] the score reaches
    (`operating_points.tier_for_score`: `score >= bp / 10000`, exactly, as the artifact was calibrated; a score
    a fraction of a basis point under a threshold stays below it). Scores are clipped to [0, 1] first."""
    if not tier_names:
        raise ValueError("no tiers")
    clipped = min(max(score, 0.0), 1.0)
    return tier_names[tier_for_score(clipped, thresholds_bp[: len(tier_names) - 1])]


def fallback_chain(chosen: str, tier_names: Sequence[str], fallback_order: Sequence[str] = ()) -> list[str]:
    """Tiers to try, chosen first. With an explicit order: that order (minus the chosen tier). Without: the
    stronger tiers cheapest first (quality is kept when the chosen tier is down), then the weaker ones strongest
    first (an answer from a weaker tier beats no answer)."""
    if fallback_order:
        return [chosen, *[t for t in fallback_order if t != chosen]]
    i = list(tier_names).index(chosen)
    return [chosen, *tier_names[i + 1 :], *reversed(tier_names[:i])]


def choose_multi_tier(
    quality: Sequence[float], prices: Sequence[float], columns: Sequence[int], cost_weight_bp: int
) -> tuple[int, float]:
    """N-tier choice: (index into `columns`, i.e. the config tier, and that tier's predicted quality).

    `quality` holds the artifact head's prediction for every artifact tier and `prices` the price of each
    (`config.MultiTier.prices`: the policy's, or the artifact's where they choose alike); tiers the config does not
    serve are set to -inf, so
    `operating_points.choose_tiers` (argmax of quality - lambda * price, ties to the cheaper tier) chooses among
    the served ones: one rule for evaluation, calibration and serving.
    """
    import numpy as np

    q = np.full((1, len(quality)), -np.inf)
    for c in columns:
        q[0, c] = quality[c]
    pick = int(choose_tiers(q, prices, cost_weight_bp)[0])
    return list(columns).index(pick), float(quality[pick])
