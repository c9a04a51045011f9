"""Pure routing decisions: score -> tier, and the order in which tiers are tried."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def choose_tier(score: float, tier_names: Sequence[str], thresholds_bp: Sequence[int]) -> str:
    """The highest tier i (cheapest first) with thresholds_bp[i-1] <= score * 10000.

    Basis points keep the comparison exact for thresholds written in a policy (no float in the spec); the score
    is rounded to the nearest basis point first so that 0.5 and 5000 bp compare as a user expects.
    """
    if not tier_names:
        raise ValueError("no tiers")
    score_bp = round(min(max(score, 0.0), 1.0) * 10000)
    chosen = 0
    for i, th in enumerate(thresholds_bp[: len(tier_names) - 1]):
        if score_bp >= th:
            chosen = i + 1
    return tier_names[chosen]


def fallback_chain(chosen: str, tier_names: Sequence[str], fallback_order: Sequence[str] = ()) -> list[str]:
    """Tiers to try, chosen first. With an explicit order: that order (minus the chosen tier). Without: the
    stronger tiers cheapest first (quality is kept when the chosen tier is down), then the weaker ones strongest
    first (an answer from a weaker tier beats no answer)."""
    if fallback_order:
        return [chosen, *[t for t in fallback_order if t != chosen]]
    i = list(tier_names).index(chosen)
    return [chosen, *tier_names[i + 1 :], *reversed(tier_names[:i])]


def choose_multi_tier(
    quality: Sequence[float], artifact: Any, columns: Sequence[int], cost_weight_bp: int
) -> tuple[int, float]:
    """N-tier choice: (index into `columns`, i.e. the config tier, and that tier's predicted quality).

    `quality` holds the artifact head's prediction for every artifact tier; tiers the config does not serve are
    set to -inf, so tiergate.routing's own rule (argmax of quality - lambda * price, ties to the cheaper tier)
    chooses among the served ones: one rule for evaluation, calibration and serving.
    """
    import numpy as np

    from tiergate.routing.scorer import choose_from_quality

    q = np.full((1, len(quality)), -np.inf)
    for c in columns:
        q[0, c] = quality[c]
    pick = int(choose_from_quality(artifact, q, cost_weight_bp)[0])
    return list(columns).index(pick), float(quality[pick])
