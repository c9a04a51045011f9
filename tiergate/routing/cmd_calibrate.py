"""`tiergate calibrate`: pick a router's operating point for a cost or quality target.

    tiergate calibrate [--router ARTIFACT] --share 0.3       # at most 30 % of prompts on the strong tier
    tiergate calibrate [--router ARTIFACT] --pgr 0.8         # recover 80 % of the weak-to-strong quality gap
    tiergate calibrate [--router ARTIFACT] --budget 0.5      # N tiers: mean price at most 0.5 $/Mtok
    ... [--data FILE.jsonl --split test]                     # measure on this data instead of the artifact's table
    ... [--write OUT.json]                                   # also store it as the artifact's default

Prints the RoutingPolicy snippet: `spec.router.thresholdBasisPoints` for two tiers, `spec.router.costWeightBasisPoints`
for N tiers (a policy may instead give `budgetPerMillion` and let the router pick from the artifact's table); `--write`
also stores the choice as the artifact's default, used when the policy sets no knob. The artifact's own table was
measured out-of-fold on its training rows; `--data` recomputes the table on other outcome data (e.g. recent
traffic) before choosing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tiergate.routing.common import DEFAULT_TWO_TIER, add_encoder_arguments, guarded
from tiergate.routing.errors import RoutingError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", metavar="ARTIFACT", help="router artifact (default: the shipped two-tier one)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--share", type=float, help="two tiers: target share of strong-tier calls, 0..1")
    target.add_argument("--pgr", type=float, help="two tiers: target PGR (recovered quality gap), 0..1")
    target.add_argument("--budget", type=float, help="N tiers: mean price budget in $/Mtok")
    parser.add_argument("--data", action="append", metavar="FILE.jsonl", help="recompute the table on this data")
    parser.add_argument("--split", choices=["all", "train", "test"], default="all")
    parser.add_argument("--write", type=Path, metavar="OUT", help="write the artifact with this default to OUT")
    parser.add_argument("--policy-name", default="my-policy", help="metadata.name in the printed snippet")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of YAML")
    add_encoder_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return guarded("calibrate", lambda: _run(args))


def choose_two_tier(calibration: list[dict[str, Any]], share: float | None, pgr: float | None) -> dict[str, Any]:
    """The calibration row for a target: the lowest threshold with share <= target share, or the highest
    threshold (fewest strong calls) with PGR >= target PGR."""
    if not calibration:
        raise RoutingError("the artifact has no calibration table")
    if share is not None:
        if not 0.0 <= share <= 1.0:
            raise RoutingError(f"--share {share} is outside 0..1")
        ok = [r for r in calibration if float(r["strong_share"]) <= share + 1e-9]
        if not ok:
            raise RoutingError(f"no threshold keeps the strong share at or below {share}")
        return min(ok, key=lambda r: (int(r["threshold_bp"]), -float(r["strong_share"])))
    assert pgr is not None
    if not 0.0 <= pgr <= 1.5:
        raise RoutingError(f"--pgr {pgr} is outside 0..1.5")
    ok = [r for r in calibration if float(r["pgr"]) >= pgr - 1e-9]
    if not ok:
        best = max(float(r["pgr"]) for r in calibration)
        raise RoutingError(f"no threshold reaches PGR {pgr} on the calibration data (best {best:.3f})")
    return max(ok, key=lambda r: int(r["threshold_bp"]))


def choose_multi_tier(calibration: list[dict[str, Any]], budget: float) -> dict[str, Any]:
    """The best-quality calibrated point whose mean price fits the budget (smaller cost weight on ties)."""
    ok = [r for r in calibration if float(r["cost"]) <= budget + 1e-12]
    if not ok:
        cheapest = min(float(r["cost"]) for r in calibration)
        raise RoutingError(f"no operating point costs at most {budget} $/Mtok (cheapest {cheapest:.3f})")
    return max(ok, key=lambda r: (float(r["quality"]), -int(r["cost_weight_bp"])))


def policy_snippet(name: str, value_bp: int, knob: str = "thresholdBasisPoints") -> str:
    return (
        "apiVersion: tiergate.io/v1alpha1\n"
        "kind: RoutingPolicy\n"
        f"metadata:\n  name: {name}\n"
        "spec:\n"
        "  router:\n"
        f"    {knob}: {value_bp}\n"
    )


def _run(args: argparse.Namespace) -> int:
    from tiergate.routing.artifact import load_artifact, save_artifact

    router_path = args.router or str(DEFAULT_TWO_TIER)
    art = load_artifact(router_path)
    calibration = art.calibration
    if args.data:
        calibration = _recalibrate(art, args)
    if art.kind == "two_tier":
        if args.budget is not None:
            raise RoutingError("--budget is for N-tier routers; a two-tier router takes --share or --pgr")
        row = choose_two_tier(calibration, args.share, args.pgr)
        bp = int(row["threshold_bp"])
        out: dict[str, Any] = {"router": router_path, "kind": art.kind, "threshold_bp": bp, "expected": row}
        if args.write:
            save_artifact(art.with_updates(default_threshold_bp=bp, calibration=calibration), args.write)
            out["written"] = str(args.write)
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            print(
                f"# threshold {bp} bp: expected strong share {row['strong_share']:.1%}, quality "
                f"{row['quality']:.4f}, PGR {row['pgr']:.3f}"
            )
            print(policy_snippet(args.policy_name, bp), end="")
    else:
        if args.budget is None:
            raise RoutingError("an N-tier router takes --budget (mean $/Mtok)")
        row = choose_multi_tier(calibration, args.budget)
        bp = int(row["cost_weight_bp"])
        out = {"router": router_path, "kind": art.kind, "cost_weight_bp": bp, "expected": row}
        if args.write:
            save_artifact(art.with_updates(default_cost_weight_bp=bp, calibration=calibration), args.write)
            out["written"] = str(args.write)
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            print(f"# cost weight {bp} bp: expected mean price {row['cost']:.3f} $/Mtok, quality {row['quality']:.4f}")
            if args.write:
                print(f"# also stored as the artifact's default_cost_weight_bp in {args.write}")
            print(policy_snippet(args.policy_name, bp, "costWeightBasisPoints"), end="")
    return 0


def _recalibrate(art: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    import numpy as np

    from tiergate.routing.data import load_outcomes
    from tiergate.routing.encoder import cached_minilm
    from tiergate.routing.evaluate import COST_WEIGHTS_BP
    from tiergate.routing.metrics import tier_point
    from tiergate.routing.scorer import Scorer, choose_from_quality
    from tiergate.routing.train import two_tier_calibration

    names = [t.name for t in art.tiers]
    data = load_outcomes(args.data, names, split=None if args.split == "all" else args.split)
    enc = cached_minilm(cache_dir=args.cache_dir, threads=args.threads)
    scorer = Scorer(art, enc)
    emb = enc.encode(data.prompts)
    if art.kind == "two_tier":
        return two_tier_calibration(scorer.score_embeddings(emb, data.prompts), data.scores[:, 0], data.scores[:, 1])
    q = scorer.quality_embeddings(emb, data.prompts)
    prices = np.array([t.price for t in art.tiers])
    rows = []
    for bp in COST_WEIGHTS_BP:
        pt = tier_point(str(bp), choose_from_quality(art, q, bp), data.scores, prices)
        rows.append({"cost_weight_bp": bp, "cost": pt.cost, "quality": pt.quality, "shares": pt.shares})
    return rows
