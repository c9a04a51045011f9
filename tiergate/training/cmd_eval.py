"""`tiergate eval`: the cost-quality curve of a router on an outcome file.

    tiergate eval --data FILE.jsonl --weak MODEL --strong MODEL [--router ARTIFACT] --json
    tiergate eval --data FILE.jsonl --tiers M1,M2,... --prices FILE [--router ARTIFACT] --json
    tiergate eval --data FILE.jsonl --tiers C1@1,C1@16,... --prices FILE --router ARTIFACT --json   # candidates

Candidates (a `candidates` artifact, tiers named `MODEL@N`): every cost is USD per 1k prompts from the rows'
`tokens` and the --prices file; the JSON adds `usd_per_1k_prompts` to the router and to every `single` entry. No
candidates router ships (its only public data is non-commercial), so `--router` is needed.

Without `--router`, the shipped default router for that many tiers (tiergate/routing/default/). With `--json`,
stdout carries exactly one JSON document; progress bars and warnings go to stderr. `--plot PNG` writes the curve
with the random and oracle baselines.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from tiergate.routing.artifact import DEFAULT_MULTI_TIER, DEFAULT_TWO_TIER
from tiergate.routing.errors import RoutingError
from tiergate.training.common import (
    add_encoder_arguments,
    add_tier_arguments,
    guarded,
    tier_args,
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", action="append", required=True, metavar="FILE.jsonl", help="outcome file (repeat for several)"
    )
    add_tier_arguments(parser)
    parser.add_argument("--router", metavar="ARTIFACT", help="router artifact (default: the shipped default router)")
    parser.add_argument(
        "--split",
        choices=["all", "train", "test"],
        default="all",
        help="evaluate rows of this split only (default: all rows)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--plot", metavar="PNG", help="write the cost-quality plot here")
    parser.add_argument(
        "--budget",
        type=float,
        action="append",
        default=[],
        metavar="USD_PER_MTOK",
        help="N tiers: also report the router's best quality at this mean price (repeatable; candidates: USD per 1k "
        "prompts)",
    )
    add_encoder_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return guarded("eval", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from tiergate.routing.artifact import load_artifact
    from tiergate.routing.scorer import Scorer
    from tiergate.training.data import load_outcomes, load_prices
    from tiergate.training.embeddings import cached_minilm
    from tiergate.training.evaluate import (
        multi_tier_report,
        plot_multi_tier,
        plot_two_tier,
        quality_at_budget,
        two_tier_report,
    )

    tiers = tier_args(args)
    if tiers.candidates and not args.router:
        raise RoutingError("candidate tiers (MODEL@N) need --router ARTIFACT: no candidates router ships with tiergate")
    router_path = args.router or str(DEFAULT_TWO_TIER if tiers.two_tier else DEFAULT_MULTI_TIER)
    art = load_artifact(router_path)
    art_tiers = [t.name for t in art.tiers]
    if art.kind == "candidates" or tiers.candidates:
        return _run_candidates(args, art, router_path, tiers.models, str(tiers.prices_file))
    if tiers.two_tier:
        if art.kind != "two_tier" or art_tiers != tiers.models:
            raise RoutingError(
                f"router {router_path} routes between {', '.join(art_tiers)} ({art.kind}); "
                f"--weak/--strong ask for {', '.join(tiers.models)}"
            )
    else:
        if art.kind != "multi_tier" or sorted(art_tiers) != sorted(tiers.models):
            raise RoutingError(
                f"router {router_path} routes between {', '.join(art_tiers)} ({art.kind}); "
                f"--tiers asks for {', '.join(tiers.models)}"
            )
    split = None if args.split == "all" else args.split
    # Read and check all input before any work or output.
    data = load_outcomes(args.data, art_tiers, split=split)
    prices = load_prices(tiers.prices_file, art_tiers) if tiers.prices_file else [t.price for t in art.tiers]
    _warn_if_training_rows(art.provenance, data, router_path)
    enc = cached_minilm(cache_dir=args.cache_dir, threads=args.threads)
    scorer = Scorer(art, enc)
    emb = enc.encode(data.prompts)
    doc: dict[str, Any] = {
        "router": str(router_path),
        "data": [str(p) for p in args.data],
        "split": args.split,
        "label_mode": art.label_mode,
    }
    if tiers.two_tier:
        scores = scorer.score_embeddings(emb, data.prompts)
        report = two_tier_report(scores, data.scores[:, 0], data.scores[:, 1])
        curves = report.pop("_curves")
        doc.update({"kind": "two_tier", "weak": art_tiers[0], "strong": art_tiers[1], **report})
        if args.plot:
            report["_curves"] = curves
            plot_two_tier(
                {**report, "_curves": curves},
                args.plot,
                f"{art_tiers[0]} -> {art_tiers[1]}, {data.scores.shape[0]} prompts ({args.split})",
            )
    else:
        qpred = scorer.quality_embeddings(emb, data.prompts)
        report = multi_tier_report(qpred, data.scores, np.asarray(prices), art_tiers, art.default_cost_weight_bp)
        report["at_budget"] = {str(b): quality_at_budget(report, b) for b in args.budget}
        doc.update({"kind": "multi_tier", **report})
        if args.plot:
            plot_multi_tier(report, args.plot, f"{len(art_tiers)} tiers, {data.scores.shape[0]} prompts")
    if args.plot:
        doc["plot"] = args.plot
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_human(doc)
    return 0


def _run_candidates(args: argparse.Namespace, art: Any, router_path: str, models: list[str], prices_file: str) -> int:
    """`eval` of a `candidates` router: decide with the artifact's cost estimates, charge the rows' true costs."""
    from tiergate.routing.candidates import candidates_of
    from tiergate.routing.scorer import Scorer
    from tiergate.training.candidate_data import (
        estimated_costs,
        load_candidate_prices,
        measure_candidates,
        token_columns,
        true_costs,
    )
    from tiergate.training.candidate_eval import candidates_report
    from tiergate.training.data import load_outcomes
    from tiergate.training.embeddings import cached_minilm
    from tiergate.training.evaluate import plot_multi_tier, quality_at_budget

    names = [t.name for t in art.tiers]
    if art.kind != "candidates" or sorted(names) != sorted(models):
        raise RoutingError(
            f"router {router_path} routes between {', '.join(names)} ({art.kind}); --tiers asks for candidates "
            f"{', '.join(models)}"
        )
    split = None if args.split == "all" else args.split
    data = load_outcomes(args.data, names, split=split, token_columns=token_columns(names))
    # The router decides with its own candidates (prices, mean output tokens); the report charges --prices.
    cands = candidates_of(art)
    charged = measure_candidates(data, names, load_candidate_prices(prices_file, names))
    charged = tuple(replace(c, output_tokens=a.output_tokens) for c, a in zip(charged, cands, strict=True))
    _warn_if_training_rows(art.provenance, data, router_path)
    enc = cached_minilm(cache_dir=args.cache_dir, threads=args.threads)
    qpred = Scorer(art, enc).quality_embeddings(enc.encode(data.prompts), data.prompts)
    report = candidates_report(
        qpred,
        data.scores,
        estimated_costs(data.prompts, cands),
        true_costs(data, charged),
        names,
        art.default_cost_weight_bp,
    )
    report["at_budget"] = {str(b): quality_at_budget(report, b) for b in args.budget}
    doc: dict[str, Any] = {
        "router": str(router_path),
        "data": [str(p) for p in args.data],
        "split": args.split,
        "label_mode": art.label_mode,
        "kind": "candidates",
        "reference": art.reference,
        **report,
    }
    if args.plot:
        plot_multi_tier(
            report,
            args.plot,
            f"{len(names)} candidates, {len(data)} prompts",
            xlabel="mean cost, USD per 1k prompts",
        )
        doc["plot"] = args.plot
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_human(doc)
    return 0


def _warn_if_training_rows(provenance: dict[str, Any], data: Any, router_path: str) -> None:
    trained = {f.get("sha256") for f in provenance.get("files", [])}
    train_split = provenance.get("split")
    for f in data.provenance:
        if f.sha256 in trained and (train_split is None or train_split in set(data.splits)):
            print(
                f"tiergate eval: warning: {f.path} is one of the files {router_path} was trained on and the rows "
                f"evaluated include its training split ({train_split or 'all rows'}); use --split test for an "
                "honest figure",
                file=sys.stderr,
            )


def _print_human(doc: dict[str, Any]) -> None:
    if doc["kind"] == "two_tier":
        print(
            f"{doc['n']} prompts, weak {doc['weak']} {doc['q_weak']:.4f}, strong {doc['strong']} {doc['q_strong']:.4f}"
        )
        print(f"APGR {doc['apgr']:.4f}  CPT(50%) {doc['cpt50']:.2%}  CPT(80%) {doc['cpt80']:.2%}")
        o = doc["baselines"]["oracle"]
        print(f"oracle APGR {o['apgr']:.4f}  CPT(50%) {o['cpt50']:.2%}  CPT(80%) {o['cpt80']:.2%}; random APGR 0.5")
    else:
        unit = "USD/1k prompts" if doc["kind"] == "candidates" else "$/Mtok"
        print(
            f"{doc['n']} prompts; router at cost weight {doc['cost_weight_bp']} bp: quality {doc['quality']:.4f} "
            f"at {doc['cost']:.3f} {unit}"
        )
        for name, sp in doc["single"].items():
            rq = sp["router_best_quality_within_cost"]
            print(
                f"  {name:40s} quality {sp['quality']:.4f} at {sp['cost']:.3f}; router within that cost: "
                f"{'-' if rq is None else f'{rq:.4f}'}"
            )
        print(f"  {'oracle':40s} quality {doc['oracle']['quality']:.4f} at {doc['oracle']['cost']:.3f}")
        for b, q in doc.get("at_budget", {}).items():
            print(f"  router best quality at <= {b} {unit}: {'-' if q is None else f'{q:.4f}'}")
    if "plot" in doc:
        print(f"plot: {doc['plot']}")
