"""Evaluation reports (pure functions from scores to JSON-ready dicts) and their PNG plots.

Two tiers: `two_tier_report(router_scores, weak, strong)` gives APGR, CPT(50%), CPT(80%), the curve (101 points
at strong shares 0.00 .. 1.00, each with the integer threshold in basis points that realises it) and the same
figures for the random and oracle baselines.

N tiers: `multi_tier_report(quality_pred, scores, prices)` sweeps the cost weight lambda (basis points) to trace
the router's cost-quality curve and reports, next to it, every single tier and the oracle (best tier per prompt,
cheapest among ties), plus the router's best quality within each single tier's cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tiergate.routing.errors import NoOperatingPoint
from tiergate.routing.operating_points import (
    CostWeightPoint,
    choose_tiers,
    cost_weight_for_budget,
    cost_weight_for_quality,
    threshold_bp_at,
)
from tiergate.training.calibration import cost_weight_table
from tiergate.training.metrics import PGRCurve, oracle_choice, oracle_scores, pgr_curve, tier_point

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float64]

SHARE_GRID = 101


def curve_points(curve: PGRCurve, scores: FloatArray) -> list[dict[str, float | int]]:
    """The curve at shares 0.00 .. 1.00: quality and PGR interpolated, and the threshold (bp) whose rule
    `score >= bp / 10000` reaches that share (with tied scores it may send a little more)."""
    import numpy as np

    n = len(scores)
    desc = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    out: list[dict[str, float | int]] = []
    for i in range(SHARE_GRID):
        x = i / (SHARE_GRID - 1)
        q = float(np.interp(x, curve.share, curve.quality))
        p = float(np.interp(x, curve.share, curve.pgr))
        k = round(x * n)
        # The largest integer bp that still routes the k-th highest score to strong (10001: nothing is routed).
        bp = 10001 if k == 0 else threshold_bp_at(float(desc[k - 1]))
        out.append({"strong_share": x, "quality": q, "pgr": p, "threshold_bp": bp})
    return out


def two_tier_report(router_scores: FloatArray, weak: FloatArray, strong: FloatArray) -> dict[str, Any]:
    import numpy as np

    curve = pgr_curve(router_scores, weak, strong)
    oracle = pgr_curve(oracle_scores(weak, strong), weak, strong)
    n = len(router_scores)
    return {
        "n": n,
        "q_weak": curve.q_weak,
        "q_strong": curve.q_strong,
        "apgr": curve.apgr,
        "cpt50": curve.cpt(0.5),
        "cpt80": curve.cpt(0.8),
        "curve": curve_points(curve, np.asarray(router_scores, dtype=np.float64)),
        "baselines": {
            # Random routing in expectation: PGR(x) = x.
            "random": {"apgr": 0.5, "cpt50": 0.5, "cpt80": 0.8},
            "oracle": {"apgr": oracle.apgr, "cpt50": oracle.cpt(0.5), "cpt80": oracle.cpt(0.8)},
        },
        "_curves": {"router": curve, "oracle": oracle},
    }


def _curve_entry(p: CostWeightPoint) -> dict[str, Any]:
    return {"cost_weight_bp": p.cost_weight_bp, "quality": p.quality, "cost": p.cost, "shares": list(p.shares)}


def _budget_quality(points: Sequence[CostWeightPoint], budget: float) -> float | None:
    """The quality the router reaches at `budget` by `operating_points.cost_weight_for_budget` (None: no point
    fits), so a report says what a policy with that budget would get."""
    try:
        return cost_weight_for_budget(points, budget).quality
    except NoOperatingPoint:
        return None


def multi_tier_report(
    quality_pred: FloatArray,
    scores: FloatArray,
    prices: FloatArray,
    models: list[str],
    default_cost_weight_bp: int,
) -> dict[str, Any]:
    """The router's cost-quality curve (`calibration.cost_weight_table`, the rule `operating_points.choose_tiers`
    with these prices), every single tier, the oracle, and the router at `default_cost_weight_bp`."""
    import numpy as np

    pr = np.asarray(prices, dtype=np.float64)
    n = scores.shape[0]
    points = cost_weight_table(quality_pred, scores, pr).cost_weights
    default = tier_point("router", choose_tiers(quality_pred, pr, default_cost_weight_bp), scores, pr)
    singles: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(models):
        sp = tier_point(name, np.full(n, j, dtype=np.int64), scores, pr)
        singles[name] = {
            "quality": sp.quality,
            "cost": sp.cost,
            "router_best_quality_within_cost": _budget_quality(points, sp.cost),
        }
    orc = tier_point("oracle", oracle_choice(scores, pr), scores, pr)
    best_name = max(models, key=lambda k: (float(singles[k]["quality"]), -float(singles[k]["cost"])))
    best = singles[best_name]
    # Cheapest router point at least as good as the best single tier.
    try:
        matching: dict[str, Any] | None = _curve_entry(cost_weight_for_quality(points, float(best["quality"])))
    except NoOperatingPoint:
        matching = None
    return {
        "n": n,
        "tiers": models,
        "prices": [float(p) for p in pr],
        "quality": default.quality,
        "cost": default.cost,
        "shares": default.shares,
        "cost_weight_bp": default_cost_weight_bp,
        "curve": [_curve_entry(p) for p in points],
        "single": singles,
        "oracle": {"quality": orc.quality, "cost": orc.cost, "shares": orc.shares},
        "best_single": {"model": best_name, **best},
        "router_cheapest_matching_best_single": matching,
    }


def quality_at_budget(report: dict[str, Any], budget: float) -> float | None:
    """The router's quality at `budget` $/Mtok on a `multi_tier_report`'s curve (None: no point fits)."""
    points = [
        CostWeightPoint(int(c["cost_weight_bp"]), float(c["cost"]), float(c["quality"]), tuple(c["shares"]))
        for c in report["curve"]
    ]
    return _budget_quality(points, budget)


def plot_two_tier(report: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report["_curves"]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    r, o = curves["router"], curves["oracle"]
    ax.plot(r.share, r.pgr, label=f"router (APGR {report['apgr']:.3f})", color="tab:blue", linewidth=2)
    ax.plot([0, 1], [0, 1], label="random (APGR 0.500)", color="tab:gray", linestyle="--")
    ax.plot(o.share, o.pgr, label=f"oracle (APGR {o.apgr:.3f})", color="tab:green", linestyle=":")
    for target, key, color in ((0.5, "cpt50", "tab:orange"), (0.8, "cpt80", "tab:red")):
        ax.axhline(target, color=color, linewidth=0.8, alpha=0.6)
        ax.axvline(report[key], color=color, linewidth=0.8, alpha=0.6)
        ax.annotate(
            f"CPT({int(target * 100)}%) = {report[key]:.1%}",
            (report[key], target),
            textcoords="offset points",
            xytext=(6, -14),
            color=color,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(min(-0.05, float(r.pgr.min())), max(1.3, float(o.pgr.max()) * 1.02))
    ax.set_xlabel("share of prompts sent to the strong tier")
    ax.set_ylabel("PGR (share of the weak-to-strong quality gap recovered)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_multi_tier(
    report: dict[str, Any],
    path: str,
    title: str,
    *,
    xlabel: str = "mean price of the chosen model ($/Mtok, input + output)",
    extra_curves: dict[str, list[dict[str, Any]]] | None = None,
    router_label: str = "router (lambda sweep)",
    logx: bool = False,
) -> None:
    """The router's curve, each single tier, the oracle and the default point (each where the report has one);
    `extra_curves` (label -> points with `cost` and `quality`) are drawn beside the router's (e.g. the same router
    without some candidates); `logx` for costs spanning orders of magnitude (candidates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    cs = sorted(report["curve"], key=lambda c: c["cost"])
    ax.plot([c["cost"] for c in cs], [c["quality"] for c in cs], "-o", markersize=3, label=router_label)
    for label, pts in (extra_curves or {}).items():
        es = sorted(pts, key=lambda c: c["cost"])
        ax.plot([c["cost"] for c in es], [c["quality"] for c in es], "-s", markersize=3, label=label)
    for name, sp in report["single"].items():
        ax.scatter([sp["cost"]], [sp["quality"]], color="tab:gray", s=25, zorder=3)
        ax.annotate(name, (sp["cost"], sp["quality"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    if "oracle" in report:
        o = report["oracle"]
        ax.scatter([o["cost"]], [o["quality"]], color="tab:green", marker="*", s=120, label="oracle", zorder=4)
    if "quality" in report:
        ax.scatter(
            [report["cost"]], [report["quality"]], color="tab:red", marker="D", s=50, label="router default", zorder=4
        )
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean quality")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
