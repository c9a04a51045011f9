"""Evaluating candidates (BEST-Route) routers: the `tiergate eval` report and k-fold cross-validation at a budget.

Costs are USD per 1k prompts throughout (`usd_per_1k_prompts`). A router decides with its cost estimates (what
serving knows) and is charged the rows' true costs (candidate_data.py says how each is made).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tiergate.routing.candidates import PROMPTS_PER_UNIT, choose_rows
from tiergate.routing.errors import NoOperatingPoint
from tiergate.routing.operating_points import CostWeightPoint, cost_weight_for_budget, cost_weight_for_quality
from tiergate.training.calibration import candidate_cost_table
from tiergate.training.metrics import oracle_choice, tier_point

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from tiergate.training.data import OutcomeSet
    from tiergate.training.train import TrainConfig

    FloatArray = npt.NDArray[np.float64]


def _entry(p: CostWeightPoint) -> dict[str, Any]:
    return {
        "cost_weight_bp": p.cost_weight_bp,
        "quality": p.quality,
        "cost": p.cost,
        "usd_per_1k_prompts": p.cost,
        "shares": list(p.shares),
    }


def _within(points: Sequence[CostWeightPoint], budget: float) -> float | None:
    try:
        return cost_weight_for_budget(points, budget).quality
    except NoOperatingPoint:
        return None


def candidates_report(
    quality_pred: FloatArray,
    scores: FloatArray,
    estimated_costs: FloatArray,
    true_costs: FloatArray,
    names: list[str],
    default_cost_weight_bp: int,
) -> dict[str, Any]:
    """The N-tier report's fields (`evaluate.multi_tier_report`) for candidates, every cost (`cost`, and the same
    figure as `usd_per_1k_prompts`) in USD per 1k prompts: the router at `default_cost_weight_bp`, its curve over
    the candidates' cost-weight grid, every single candidate, the oracle (best candidate per prompt, cheapest among
    ties), the best single candidate and the router's cheapest point matching it."""
    import numpy as np

    n = scores.shape[0]
    per_1k = np.asarray(true_costs, dtype=np.float64) * PROMPTS_PER_UNIT
    points = candidate_cost_table(quality_pred, scores, estimated_costs, true_costs).cost_weights
    default = tier_point("router", choose_rows(quality_pred, estimated_costs, default_cost_weight_bp), scores, per_1k)
    singles: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(names):
        sp = tier_point(name, np.full(n, j, dtype=np.int64), scores, per_1k)
        singles[name] = {
            "quality": sp.quality,
            "cost": sp.cost,
            "usd_per_1k_prompts": sp.cost,
            "router_best_quality_within_cost": _within(points, sp.cost),
        }
    orc = tier_point("oracle", oracle_choice(scores, per_1k), scores, per_1k)
    best_name = max(names, key=lambda k: (float(singles[k]["quality"]), -float(singles[k]["cost"])))
    try:
        matching: dict[str, Any] | None = _entry(cost_weight_for_quality(points, float(singles[best_name]["quality"])))
    except NoOperatingPoint:
        matching = None
    return {
        "n": n,
        "tiers": names,
        "cost_unit": "usd_per_1k_prompts",
        "quality": default.quality,
        "cost": default.cost,
        "usd_per_1k_prompts": default.cost,
        "shares": default.shares,
        "cost_weight_bp": default_cost_weight_bp,
        "curve": [_entry(p) for p in points],
        "single": singles,
        "oracle": {"quality": orc.quality, "cost": orc.cost, "usd_per_1k_prompts": orc.cost, "shares": orc.shares},
        "best_single": {"model": best_name, **singles[best_name]},
        "router_cheapest_matching_best_single": matching,
    }


@dataclass(frozen=True)
class BudgetCV:
    """k-fold cross-validation of a candidates router calibrated at a budget (USD per 1k prompts).

    Per outer fold the router is trained on the other folds exactly as `tiergate train` does (its calibration
    table out-of-fold on those rows), its cost weight chosen by `cost_weight_for_budget` (what `tiergate calibrate
    --usd-per-1k-prompts` stores), and applied to the held-out fold. `router` holds each row's held-out outcome,
    `router_cost` its true cost and `router_choice` the candidate chosen; `single` names the best single
    candidate whose mean cost on all rows fits the budget, `single_outcomes` its per-row scores. `curve` pools the
    held-out choices per cost weight."""

    budget: float
    router: FloatArray
    router_cost: FloatArray
    router_choice: npt.NDArray[np.int64]
    cost_weights_bp: tuple[int, ...]
    single: str | None
    single_outcomes: FloatArray | None
    single_cost: float | None
    curve: tuple[CostWeightPoint, ...]

    @property
    def router_quality(self) -> float:
        return float(self.router.mean())

    @property
    def router_usd_per_1k_prompts(self) -> float:
        return float(self.router_cost.mean())

    @property
    def single_quality(self) -> float | None:
        return None if self.single_outcomes is None else float(self.single_outcomes.mean())


def cross_validate_at_budget(
    data: OutcomeSet,
    head_x: npt.NDArray[np.float32],
    emb: npt.NDArray[np.float32],
    names: list[str],
    prices: Sequence[tuple[float, float]],
    reference: str,
    budget: float,
    cfg: TrainConfig,
    folds: int = 5,
    seed: int = 0,
) -> BudgetCV:
    """See `BudgetCV`. `data` was read with `candidate_data.token_columns(names)`; `emb` are the prompts'
    embeddings (neighbourhoods) and `head_x` the head inputs (embeddings + standardised features)."""
    import numpy as np

    from tiergate.routing.candidates import COST_WEIGHTS_BP
    from tiergate.routing.scorer import members_forward
    from tiergate.training.candidate_data import estimated_costs, measure_candidates, true_costs
    from tiergate.training.train import build_candidates, kfold_indices

    n, k = data.scores.shape
    ref = names.index(reference)
    routed = np.zeros(n, dtype=np.float64)
    routed_cost = np.zeros(n, dtype=np.float64)
    routed_choice = np.zeros(n, dtype=np.int64)
    choices = np.zeros((len(COST_WEIGHTS_BP), n), dtype=np.int64)
    chosen_bp: list[int] = []
    truth = true_costs(data, measure_candidates(data, names, prices))
    for held in kfold_indices(n, folds, seed):
        mask = np.ones(n, dtype=bool)
        mask[held] = False
        train = data.subset(mask)
        cands = measure_candidates(train, names, prices)
        est_train = estimated_costs(train.prompts, cands)
        members, table, _, _ = build_candidates(
            emb[mask],
            train.scores,
            est_train,
            truth[mask],
            ref,
            cfg,
            tasks=train.tasks,
            head_x=head_x[mask],
        )
        try:
            bp = cost_weight_for_budget(table.cost_weights, budget).cost_weight_bp
        except NoOperatingPoint:
            # Nothing fits on the training rows: the cheapest point is what a user would be told about; take the
            # largest weight (cheapest choices) so the fold is still counted.
            bp = COST_WEIGHTS_BP[-1]
        chosen_bp.append(bp)
        qpred = members_forward(members, head_x[held])
        est_held = estimated_costs([data.prompts[i] for i in held], cands)
        pick = choose_rows(qpred, est_held, bp)
        routed[held] = data.scores[held, pick]
        routed_choice[held] = pick
        routed_cost[held] = truth[held, pick] * PROMPTS_PER_UNIT
        for j, w in enumerate(COST_WEIGHTS_BP):
            choices[j, held] = choose_rows(qpred, est_held, w)
    per_1k = truth * PROMPTS_PER_UNIT
    curve = tuple(
        CostWeightPoint(w, pt.cost, pt.quality, tuple(pt.shares))
        for w, pt in ((w, tier_point(str(w), choices[j], data.scores, per_1k)) for j, w in enumerate(COST_WEIGHTS_BP))
    )
    single_q = data.scores.mean(axis=0)
    single_c = per_1k.mean(axis=0)
    fitting = [j for j in range(k) if single_c[j] <= budget]
    best = max(fitting, key=lambda j: (single_q[j], -single_c[j])) if fitting else None
    return BudgetCV(
        budget=budget,
        router=routed,
        router_cost=routed_cost,
        router_choice=routed_choice,
        cost_weights_bp=tuple(chosen_bp),
        single=None if best is None else names[best],
        single_outcomes=None if best is None else data.scores[:, best].copy(),
        single_cost=None if best is None else float(single_c[best]),
        curve=curve,
    )


def paired_bootstrap(a: FloatArray, b: FloatArray, *, samples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of mean(a - b) over prompts resampled with replacement (paired: both on the same
    prompts), the noise of single judgements on a few hundred prompts."""
    import numpy as np

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)
