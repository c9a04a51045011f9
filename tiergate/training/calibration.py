"""Measuring a calibration table (`tiergate.routing.operating_points.CalibrationTable`) on scored data.

`tiergate train` measures it on out-of-fold predictions, `tiergate calibrate --data` on other outcome data, and
`tiergate eval` traces its N-tier curve the same way; every decision inside goes through `operating_points`'
rules (`reaches`, `choose_tiers`) or, for candidates, `tiergate.routing.candidates.choose_rows`: the ones the
router serves with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tiergate.routing.candidates import COST_WEIGHTS_BP as CANDIDATE_COST_WEIGHTS_BP
from tiergate.routing.operating_points import (
    COST_WEIGHTS_BP,
    CalibrationTable,
    CostWeightPoint,
    ThresholdPoint,
    choose_tiers,
    reaches,
    threshold_bp_at,
)
from tiergate.training.metrics import tier_point

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


def threshold_table(
    scores: npt.NDArray[np.float64], weak: npt.NDArray[np.float64], strong: npt.NDArray[np.float64]
) -> CalibrationTable:
    """Two tiers: points at the score quantiles 0, 1, ..., 100 % (as integer basis points, plus 0 and 10000),
    thresholds descending, each measured exactly with the serving rule `reaches(score, bp)`."""
    import numpy as np

    q_w, q_s = float(weak.mean()), float(strong.mean())
    gap = q_s - q_w
    qs = np.quantile(scores, np.linspace(0.0, 1.0, 101))
    bps = sorted({threshold_bp_at(float(v)) for v in qs} | {0, 10000}, reverse=True)
    points = []
    for bp in bps:
        route = reaches(scores, bp)
        quality = float(np.where(route, strong, weak).mean())
        points.append(
            ThresholdPoint(
                threshold_bp=bp,
                strong_share=float(route.mean()),
                quality=quality,
                pgr=(quality - q_w) / gap if abs(gap) > 1e-12 else 0.0,
            )
        )
    return CalibrationTable(thresholds=tuple(points))


def cost_weight_table(
    quality_pred: npt.NDArray[np.float64],
    outcomes: npt.NDArray[np.float64],
    prices: Sequence[float] | npt.NDArray[np.float64],
    weights_bp: Sequence[int] = COST_WEIGHTS_BP,
) -> CalibrationTable:
    """N tiers: one point per cost weight, choosing with `choose_tiers(quality_pred, prices, bp)` and measuring the
    chosen tiers' mean `outcomes` (quality) and mean price."""
    import numpy as np

    pr = np.asarray(prices, dtype=np.float64)
    points = []
    for bp in weights_bp:
        pt = tier_point(str(bp), choose_tiers(quality_pred, pr, bp), outcomes, pr)
        points.append(CostWeightPoint(cost_weight_bp=bp, cost=pt.cost, quality=pt.quality, shares=tuple(pt.shares)))
    return CalibrationTable(cost_weights=tuple(points))


def candidate_cost_table(
    quality_pred: npt.NDArray[np.float64],
    outcomes: npt.NDArray[np.float64],
    estimated_costs: npt.NDArray[np.float64],
    true_costs: npt.NDArray[np.float64],
    weights_bp: Sequence[int] = CANDIDATE_COST_WEIGHTS_BP,
) -> CalibrationTable:
    """Candidates: one point per cost weight, choosing with `candidates.choose_rows` on the router's cost
    estimates (what serving sees) and measuring mean quality and the mean true cost in USD per 1k prompts."""
    from tiergate.routing.candidates import PROMPTS_PER_UNIT, choose_rows

    per_1k = true_costs * PROMPTS_PER_UNIT
    points = []
    for bp in weights_bp:
        pt = tier_point(str(bp), choose_rows(quality_pred, estimated_costs, bp), outcomes, per_1k)
        points.append(CostWeightPoint(cost_weight_bp=bp, cost=pt.cost, quality=pt.quality, shares=tuple(pt.shares)))
    return CalibrationTable(cost_weights=tuple(points))
