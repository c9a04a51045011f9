"""Issue 12 "Must show": BEST-Route candidates on alpacaeval-bon by 5-fold cross-validation. Prints the figures
docs/routing.md ("Best-of-N candidates (BEST-Route)") quotes.

    nice .venv/bin/python bench/best_route_quality.py [--data-dir DIR] [--budgets 1.0,2.0,5.0] [--plot curve.png]

- every single candidate: quality (mean GPT-4 judgement vs text-davinci-003, 95 % binomial CI) and cost (USD per
  1k prompts from the rows' tokens and alpacaeval-bon-models.json);
- the router calibrated at each budget as `tiergate train` + `tiergate calibrate --usd-per-1k-prompts` do, applied
  to the held-out fold, with the @16 candidates and without them, against the best single candidate fitting the
  budget (paired bootstrap 95 % CI of the difference: 473 single judgements);
- BEST-Route's own rule on the same folds (heads for Pr[candidate >= reference], the cheapest candidate with
  p >= t, else the reference; t chosen out-of-fold on the training rows for the budget);
- the quality-cost curves (held-out choices pooled over folds, per cost weight): with @16, without, best single.

Embeddings come from the cache (tiergate.training.embeddings; 473 prompts embed in well under a minute cold).
The data is non-commercial (CC BY-NC 4.0): nothing here is shipped or trained into the package.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _data import routing_data_dir

from tiergate.routing.features import head_inputs
from tiergate.routing.operating_points import CostWeightPoint
from tiergate.routing.scorer import members_forward
from tiergate.training.candidate_data import (
    estimated_costs,
    load_candidate_prices,
    measure_candidates,
    token_columns,
    true_costs,
)
from tiergate.training.candidate_eval import BudgetCV, cross_validate_at_budget, paired_bootstrap
from tiergate.training.data import OutcomeSet, load_outcomes
from tiergate.training.embeddings import cached_minilm
from tiergate.training.train import TrainConfig, fit_features, kfold_indices, quality_head

DATA = "alpacaeval-bon.jsonl"
PRICES = "alpacaeval-bon-models.json"
REFERENCE = "gpt-4-1106-preview@1"
# `tiergate train`'s defaults (neighbours 200, task weight and task head 0.3); the rows' task is AlpacaEval's
# source set (helpful_base, koala, oasst, selfinstruct, vicuna).
RECIPE = TrainConfig(label_mode="quality")
FOLDS = 5
THRESHOLDS = tuple(round(float(t), 2) for t in np.arange(0.0, 1.0001, 0.01))


def all_candidates(data_dir: Path) -> list[str]:
    with open(data_dir / DATA, encoding="utf-8") as f:
        return sorted(json.loads(f.readline())["scores"])


def load(data_dir: Path, names: list[str]) -> tuple[OutcomeSet, list[tuple[float, float]], Any, Any]:
    """Rows, prices, embeddings and head inputs (embeddings + standardised log_chars, as `tiergate train`)."""
    data = load_outcomes([data_dir / DATA], names, token_columns=token_columns(names))
    prices = load_candidate_prices(data_dir / PRICES, names)
    emb = cached_minilm(progress=None).encode(data.prompts)
    hx = head_inputs(fit_features(["log_chars"], data.prompts), emb, data.prompts)
    return data, prices, emb, hx


def router_cv(data_dir: Path, names: list[str], budget: float) -> BudgetCV:
    """The must-show figure: the CV router calibrated at `budget` USD per 1k prompts (what the test asserts on)."""
    import torch

    torch.set_num_threads(1)
    data, prices, emb, hx = load(data_dir, names)
    return cross_validate_at_budget(data, hx, emb, names, prices, REFERENCE, budget, RECIPE, folds=FOLDS)


def _best_route_rule(p: np.ndarray, est: np.ndarray, t: float, ref: int) -> np.ndarray:
    ok = p >= t
    ok[:, ref] = True  # none qualifies: the reference, one sample
    return np.argmin(np.where(ok, est, np.inf), axis=1)


def best_route_cv(
    data: OutcomeSet, prices: Sequence[tuple[float, float]], emb: Any, hx: Any, names: list[str], budget: float
) -> tuple[float, float, list[float]]:
    """BEST-Route's formulation on the same folds: quality and USD per 1k prompts held out, thresholds per fold."""
    n = len(data)
    ref = names.index(REFERENCE)
    truth = true_costs(data, measure_candidates(data, names, prices)) * 1000
    routed, cost, chosen = np.zeros(n), np.zeros(n), []
    for held in kfold_indices(n, FOLDS, 0):
        mask = np.ones(n, dtype=bool)
        mask[held] = False
        tr = data.subset(mask)
        cands = measure_candidates(tr, names, prices)
        wins = (tr.scores >= tr.scores[:, [ref]]).astype(np.float64)
        members, oof = quality_head(emb[mask], wins, RECIPE, tasks=tr.tasks, head_x=hx[mask])
        est = estimated_costs(tr.prompts, cands)
        best: tuple[float, float] | None = None
        for t in THRESHOLDS:
            c = _best_route_rule(oof, est, t, ref)
            q, cc = tr.scores[np.arange(len(c)), c].mean(), truth[mask][np.arange(len(c)), c].mean()
            if cc <= budget and (best is None or q > best[0]):
                best = (float(q), t)
        t = 1.0 if best is None else float(best[1])
        chosen.append(t)
        p = members_forward(members, hx[held])
        c = _best_route_rule(p, estimated_costs([data.prompts[i] for i in held], cands), t, ref)
        routed[held] = data.scores[held, c]
        cost[held] = truth[held, c]
    return float(routed.mean()), float(cost.mean()), chosen


def binomial_ci(scores: np.ndarray) -> float:
    """Half-width of the normal-approximation 95 % CI of a mean of judgements in {0, 0.5, 1}."""
    return float(1.96 * scores.std(ddof=1) / math.sqrt(len(scores)))


def best_within(points: Sequence[CostWeightPoint], budget: float) -> tuple[float, float] | None:
    ok = [p for p in points if p.cost <= budget + 1e-12]
    if not ok:
        return None
    p = max(ok, key=lambda p: (p.quality, -p.cost))
    return p.quality, p.cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=routing_data_dir())
    ap.add_argument("--budgets", default="1.0,2.0,5.0", help="USD per 1k prompts, comma-separated")
    ap.add_argument("--plot", help="write the quality-cost curves here (PNG)")
    ap.add_argument(
        "--small-models",
        action="store_true",
        help="only the 7B/13B models and the reference (no 70B, no gpt-3.5): where best-of-N has something to add",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    budgets = [float(b) for b in args.budgets.split(",")]
    names = all_candidates(args.data_dir)
    if args.small_models:
        names = [n for n in names if n == REFERENCE or any(f"-{s}b" in n for s in ("7", "13"))]
    no16 = [n for n in names if n.endswith("@1")]
    data, prices, emb, hx = load(args.data_dir, names)
    per_1k = true_costs(data, measure_candidates(data, names, prices)) * 1000
    print(f"{len(data)} prompts, {len(names)} candidates, reference {REFERENCE}; quality = mean GPT-4 judgement")
    print(f"{'candidate':26s} {'quality':>8s} {'95% CI':>8s} {'USD/1k prompts':>15s}")
    for j, name in enumerate(names):
        s = data.scores[:, j]
        print(f"{name:26s} {s.mean():8.4f} {binomial_ci(s):8.4f} {per_1k[:, j].mean():15.3f}")
    curves: dict[str, tuple[CostWeightPoint, ...]] = {}
    for budget in budgets:
        for label, cands in (("with @16", names), ("without @16", no16)):
            t0 = time.time()
            d, pr, e, h = (data, prices, emb, hx) if cands is names else load(args.data_dir, cands)
            cv = cross_validate_at_budget(d, h, e, cands, pr, REFERENCE, budget, RECIPE, folds=FOLDS)
            curves.setdefault(label, cv.curve)
            line = (
                f"budget {budget:5.2f}: router {label:11s} {cv.router_quality:.4f} at "
                f"{cv.router_usd_per_1k_prompts:.3f} (cost weights {list(cv.cost_weights_bp)} bp)"
            )
            if cv.single is not None and cv.single_outcomes is not None:
                lo, hi = paired_bootstrap(cv.router, cv.single_outcomes)
                line += (
                    f"; best single fitting {cv.single} {cv.single_quality:.4f} at {cv.single_cost:.3f};"
                    f" router - single {cv.router_quality - float(cv.single_quality or 0):+.4f} "
                    f"(95% CI {lo:+.4f} .. {hi:+.4f})"
                )
            at16 = float(np.isin(cv.router_choice, [j for j, n in enumerate(cands) if not n.endswith("@1")]).mean())
            print(line + f"; {at16:.1%} of prompts to @16  [{time.time() - t0:.0f}s]", flush=True)
        q, c, ts = best_route_cv(data, prices, emb, hx, names, budget)
        print(f"budget {budget:5.2f}: BEST-Route rule (Pr[>= reference] >= t) {q:.4f} at {c:.3f} (t per fold {ts})")
    single_pts = [(float(per_1k[:, j].mean()), float(data.scores[:, j].mean()), n) for j, n in enumerate(names)]
    print("curve (held-out choices pooled over folds; best quality within each cost):")
    print(f"{'USD/1k':>8s} {'with @16':>9s} {'without':>9s} {'single':>9s}")
    for b in (0.1, 0.2, 0.35, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 16.0):
        cells = []
        for label in ("with @16", "without @16"):
            w = best_within(curves[label], b)
            cells.append("-" if w is None else f"{w[0]:.4f}")
        fit = [q for c, q, _ in single_pts if c <= b]
        cells.append(f"{max(fit):.4f}" if fit else "-")
        print(f"{b:8.2f} " + " ".join(f"{x:>9s}" for x in cells))
    if args.plot:
        from tiergate.training.evaluate import plot_multi_tier

        def pts(cs: Sequence[CostWeightPoint]) -> list[dict[str, Any]]:
            return [{"cost": p.cost, "quality": p.quality} for p in cs]

        report = {
            "curve": pts(curves["with @16"]),
            "single": {n: {"cost": c, "quality": q} for c, q, n in single_pts},
        }
        plot_multi_tier(
            report,
            args.plot,
            f"alpacaeval-bon, {len(data)} prompts, 5-fold CV (held-out choices pooled)",
            xlabel="mean cost, USD per 1k prompts (log scale)",
            extra_curves={"router without @16": pts(curves["without @16"])},
            router_label="router with @16 candidates",
            logx=True,
        )
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
