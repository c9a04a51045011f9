"""`tiergate calibrate`: pick a router's operating point for a cost or quality target.

    tiergate calibrate [--router ARTIFACT] --share 0.3       # at most 30 % of prompts on the strong tier
    tiergate calibrate [--router ARTIFACT] --pgr 0.8         # recover 80 % of the weak-to-strong quality gap
    tiergate calibrate [--router ARTIFACT] --budget 0.5      # N tiers: mean price at most 0.5 $/Mtok
    tiergate calibrate --router A --usd-per-1k-prompts 1.0 --write OUT   # candidates: mean cost per 1k prompts
    ... [--data FILE.jsonl --split test]                     # measure on this data instead of the artifact's table
    ... [--write OUT.json]                                   # also store it as the artifact's default

Prints the RoutingPolicy snippet: `spec.router.thresholdBasisPoints` for two tiers, `spec.router.costWeightBasisPoints`
for N tiers (a policy may instead give `budgetPerMillion`: the router then picks from the artifact's table
with the same function, `operating_points.cost_weight_for_budget`, so it serves the weight printed here); `--write`
also stores the choice as the artifact's default, used when the policy sets no knob. The artifact's own table was
measured out-of-fold on its training rows; `--data` recomputes the table on other outcome data (e.g. recent
traffic) before choosing.

`--data` also reads the router's decision logs (`tiergate serve --decision-log FILE`, rotated sets included):
`tiergate calibrate --router A --data decisions.jsonl --share 0.3` picks the threshold that sends 30 % of the
logged production traffic to the strong tier, from the scores the router logged (`decision_logs`); `--pgr` needs
requests judged on both tiers (shadow records). Feedback per tier is reported alongside.

Candidates (BEST-Route) artifacts take `--usd-per-1k-prompts B`: the best-quality point of the table (measured
out-of-fold on the training rows, cost = mean USD per 1k prompts) whose cost is at most B, by the same
`cost_weight_for_budget`; `--write` stores its cost weight as the artifact's default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tiergate.routing.artifact import DEFAULT_TWO_TIER, RouterArtifact
from tiergate.routing.errors import RoutingError
from tiergate.routing.operating_points import (
    CalibrationTable,
    CostWeightPoint,
    ThresholdPoint,
    cost_weight_for_budget,
    threshold_for_pgr,
    threshold_for_share,
)
from tiergate.training.common import add_encoder_arguments, guarded


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", metavar="ARTIFACT", help="router artifact (default: the shipped two-tier one)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--share", type=float, help="two tiers: target share of strong-tier calls, 0..1")
    target.add_argument("--pgr", type=float, help="two tiers: target PGR (recovered quality gap), 0..1")
    target.add_argument("--budget", type=float, help="N tiers: mean price budget in $/Mtok")
    target.add_argument(
        "--usd-per-1k-prompts",
        type=float,
        metavar="B",
        help="candidates (best-of-N) routers: mean cost budget in USD per 1k prompts",
    )
    parser.add_argument(
        "--data",
        action="append",
        metavar="FILE.jsonl",
        help="recompute the table on this data: outcome files, or the router's decision logs (two tiers)",
    )
    parser.add_argument("--split", choices=["all", "train", "test"], default="all")
    parser.add_argument("--write", type=Path, metavar="OUT", help="write the artifact with this default to OUT")
    parser.add_argument("--policy-name", default="my-policy", help="metadata.name in the printed snippet")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of YAML")
    add_encoder_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return guarded("calibrate", lambda: _run(args))


def choose_two_tier(table: CalibrationTable, share: float | None, pgr: float | None) -> ThresholdPoint:
    """The operating point for `--share` or `--pgr` (exactly one given), by `operating_points`' rules."""
    if share is not None:
        return threshold_for_share(table.thresholds, share)
    if pgr is None:
        raise RoutingError("give --share or --pgr")
    return threshold_for_pgr(table.thresholds, pgr)


def choose_multi_tier(table: CalibrationTable, budget: float) -> CostWeightPoint:
    """The operating point for `--budget`: `operating_points.cost_weight_for_budget`, the function the router
    applies to a policy's `budgetPerMillion`, so the printed weight is the one a router would serve."""
    return cost_weight_for_budget(table.cost_weights, budget)


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
    from dataclasses import asdict

    from tiergate.routing.artifact import load_artifact, save_artifact

    router_path = args.router or str(DEFAULT_TWO_TIER)
    art = load_artifact(router_path)
    from tiergate.training.decision_logs import log_set

    logs = log_set(args.data or [])
    if logs:
        return _from_logs(art, router_path, logs, args)
    calibration = _recalibrate(art, args) if args.data else art.calibration
    if art.kind == "two_tier":
        if args.budget is not None or args.usd_per_1k_prompts is not None:
            raise RoutingError("a two-tier router takes --share or --pgr")
        tp = choose_two_tier(calibration, args.share, args.pgr)
        bp = tp.threshold_bp
        out: dict[str, Any] = {"router": router_path, "kind": art.kind, "threshold_bp": bp, "expected": asdict(tp)}
        if args.write:
            save_artifact(art.with_updates(default_threshold_bp=bp, calibration=calibration), args.write)
            out["written"] = str(args.write)
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            print(
                f"# threshold {bp} bp: expected strong share {tp.strong_share:.1%}, quality "
                f"{tp.quality:.4f}, PGR {tp.pgr:.3f}"
            )
            print(policy_snippet(args.policy_name, bp), end="")
    else:
        candidates = art.kind == "candidates"
        if candidates and args.usd_per_1k_prompts is None:
            raise RoutingError("a candidates router takes --usd-per-1k-prompts B (mean USD per 1k prompts)")
        if not candidates and args.budget is None:
            raise RoutingError("an N-tier router takes --budget (mean $/Mtok)")
        budget = args.usd_per_1k_prompts if candidates else args.budget
        cp = choose_multi_tier(calibration, budget)
        bp = cp.cost_weight_bp
        expected = {"cost_weight_bp": bp, "cost": cp.cost, "quality": cp.quality, "shares": list(cp.shares)}
        if candidates:
            expected["usd_per_1k_prompts"] = cp.cost
        out = {"router": router_path, "kind": art.kind, "cost_weight_bp": bp, "expected": expected}
        if args.write:
            save_artifact(art.with_updates(default_cost_weight_bp=bp, calibration=calibration), args.write)
            out["written"] = str(args.write)
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            unit = "USD per 1k prompts" if candidates else "$/Mtok"
            print(f"# cost weight {bp} bp: expected mean price {cp.cost:.3f} {unit}, quality {cp.quality:.4f}")
            if args.write:
                print(f"# also stored as the artifact's default_cost_weight_bp in {args.write}")
            print(policy_snippet(args.policy_name, bp, "costWeightBasisPoints"), end="")
    return 0


def _from_logs(art: RouterArtifact, router_path: str, logs: list[str], args: argparse.Namespace) -> int:
    """`calibrate --data LOG`: the two-tier operating point on the logged production traffic
    (`decision_logs.log_threshold_table`)."""
    import math

    from tiergate.routing.artifact import save_artifact
    from tiergate.training.decision_logs import has_quality, join_logs, log_threshold_table, two_tier_outcomes

    if art.kind != "two_tier":
        raise RoutingError(
            f"--data LOG recalibrates two-tier routers (a score against a threshold); {router_path} is {art.kind}: "
            "calibrate it on outcome files"
        )
    if args.split != "all":
        raise RoutingError("--split applies to outcome files, not to decision logs")
    tiers = (art.tiers[0].name, art.tiers[1].name)
    data = two_tier_outcomes(join_logs(logs), tiers, artifact=_artifact_id(router_path))
    table = log_threshold_table(data)
    judged = has_quality(table)
    if args.pgr is not None and not judged:
        raise RoutingError(
            "--pgr needs requests judged on both tiers (shadow records: spec.shadow Baseline or Mirror with a reward "
            f"model); the log has none for {data.weak_tier} and {data.strong_tier}; use --share"
        )
    tp = choose_two_tier(table, args.share, args.pgr)
    bp = tp.threshold_bp
    expected: dict[str, Any] = {
        "strong_share": tp.strong_share,
        "quality": tp.quality if judged else None,
        "pgr": tp.pgr if judged else None,
    }
    feedback = {
        tier: {"requests": n, "rated": k, "mean_rating": mean, "requeries": rq}
        for tier, (n, k, mean, rq) in data.feedback.items()
    }
    out: dict[str, Any] = {
        "router": router_path,
        "kind": art.kind,
        "threshold_bp": bp,
        "expected": expected,
        "log": {
            "decisions": len(data.scores),
            "judged_pairs": len(data.pair_scores),
            "weak_tier": data.weak_tier,
            "strong_tier": data.strong_tier,
            "artifact": data.artifact,
            "feedback": feedback,
        },
    }
    if args.write:
        # Without judgements the table has no quality: keep the artifact's own and store only the threshold.
        updated = art.with_updates(default_threshold_bp=bp, calibration=table if judged else art.calibration)
        save_artifact(updated, args.write)
        out["written"] = str(args.write)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"# from {len(data.scores)} logged decisions ({len(data.pair_scores)} judged on both tiers): threshold {bp} "
        f"bp, strong share {tp.strong_share:.1%}"
        + (f", quality {tp.quality:.4f}, PGR {tp.pgr:.3f}" if judged and not math.isnan(tp.quality) else "")
    )
    for tier, f in feedback.items():
        mean = "-" if f["mean_rating"] is None else f"{f['mean_rating']:+.2f}"
        print(f"# {tier}: {f['requests']} answers, {f['rated']} rated (mean {mean}), {f['requeries']} re-asked")
    if args.write:
        print(f"# also stored as the artifact's default_threshold_bp in {args.write}")
    print(policy_snippet(args.policy_name, bp), end="")
    return 0


def _artifact_id(router_path: str) -> str | None:
    """The artifact's `sha256` field, the id the router logs for the decisions it made (None when absent)."""
    try:
        value = json.loads(Path(router_path).read_bytes()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _recalibrate(art: RouterArtifact, args: argparse.Namespace) -> CalibrationTable:
    from tiergate.routing.candidates import candidates_of
    from tiergate.routing.scorer import Scorer
    from tiergate.training.calibration import candidate_cost_table, cost_weight_table, threshold_table
    from tiergate.training.candidate_data import estimated_costs, token_columns, true_costs
    from tiergate.training.data import load_outcomes
    from tiergate.training.embeddings import cached_minilm

    names = [t.name for t in art.tiers]
    columns = token_columns(names) if art.kind == "candidates" else ()
    data = load_outcomes(args.data, names, split=None if args.split == "all" else args.split, token_columns=columns)
    enc = cached_minilm(cache_dir=args.cache_dir, threads=args.threads)
    scorer = Scorer(art, enc)
    emb = enc.encode(data.prompts)
    if art.kind == "candidates":
        cands = candidates_of(art)
        return candidate_cost_table(
            scorer.quality_embeddings(emb, data.prompts),
            data.scores,
            estimated_costs(data.prompts, cands),
            true_costs(data, cands),
        )
    if art.kind == "two_tier":
        return threshold_table(scorer.score_embeddings(emb, data.prompts), data.scores[:, 0], data.scores[:, 1])
    prices = [t.price for t in art.tiers]
    return cost_weight_table(scorer.quality_embeddings(emb, data.prompts), data.scores, prices)
