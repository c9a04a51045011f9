"""`tiergate train`: fit a router head on per-prompt outcome files and write a router artifact.

    tiergate train --data A.jsonl [--data B.jsonl ...] --weak MODEL --strong MODEL --out router.json
    tiergate train --data A.jsonl --tiers M1,M2,... --prices prices.json --out router.json
    tiergate train --data A.jsonl --tiers M1@1,M1@16,M2@1,... --prices prices.json --reference M2@1 --out router.json
    tiergate train --data decisions.jsonl --weak TIER --strong TIER --out router.json   # from decision logs

Tiers named `MODEL@N` (or `--reference` given) train a `candidates` router (BEST-Route, docs/routing.md): one
quality output per candidate, calibrated in USD per 1k prompts from the rows' `tokens`.

Only rows with `split == "train"` are used unless `--split all`. Every input is read and checked before any
work starts, and the artifact is written atomically at the end, so a bad file or an interrupted run leaves the
previous artifact (if any) untouched. Seeded: the same inputs and flags give the same artifact bytes, apart from
the `created` timestamp (`--created` pins it).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tiergate.routing.candidates import parse_candidate
from tiergate.routing.errors import DataError, RoutingError
from tiergate.training.candidate_data import check_reference
from tiergate.training.common import TierArgs, add_encoder_arguments, add_tier_arguments, guarded, tier_args

if TYPE_CHECKING:
    from tiergate.routing.artifact import Tier
    from tiergate.routing.candidates import Candidate


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", action="append", required=True, metavar="FILE.jsonl", help="outcome file (repeat for several)"
    )
    add_tier_arguments(parser)
    parser.add_argument(
        "--reference",
        metavar="CANDIDATE",
        help="candidates: the one-sample candidate (MODEL@1) the others are measured against, e.g. the frontier model",
    )
    parser.add_argument("--out", required=True, type=Path, help="where to write the router artifact (JSON)")
    parser.add_argument(
        "--split", default="train", help='use rows with this split value; "all" for every row (default: train)'
    )
    parser.add_argument(
        "--label-mode",
        choices=["deterministic", "probabilistic", "transformed", "difference"],
        default="difference",
        help="two tiers: Hybrid LLM label (docs/routing.md); N tiers always regress per-tier quality",
    )
    parser.add_argument("--neighbours", type=int, default=200, help="neighbourhood size for label estimates")
    parser.add_argument(
        "--task-weight",
        type=float,
        default=0.3,
        help="weight of the per-task mean score in the training targets, 0..1 (rows' task field; 0 ignores it)",
    )
    parser.add_argument(
        "--task-head",
        type=float,
        default=0.3,
        help="share (0..1) of the head given to task-classifier members (needs a task field; docs/routing.md)",
    )
    parser.add_argument(
        "--ridge-share",
        type=float,
        default=0.0,
        help="share (0..1) of the head given to a ridge regression on raw labels (1: ridge only)",
    )
    parser.add_argument("--ridge-lambda", type=float, default=100.0, help="ridge penalty")
    parser.add_argument(
        "--features",
        default="log_chars",
        help='prompt features appended to the embedding, comma-separated ("" for none; known: log_chars)',
    )
    parser.add_argument("--hidden", type=int, default=64, help="hidden units per head member (0: linear)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256, help="rows per optimiser step")
    parser.add_argument("--ensemble", type=int, default=3, help="head members (seeds) averaged")
    parser.add_argument("--folds", type=int, default=5, help="folds for the out-of-fold calibration table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--created", help="ISO-8601 timestamp recorded in the artifact (default: now)")
    add_encoder_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return guarded("train", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from tiergate.routing.artifact import EncoderSpec, RouterArtifact, Tier, save_artifact
    from tiergate.routing.encoder import MAX_TOKENS
    from tiergate.routing.features import head_inputs
    from tiergate.training.candidate_data import (
        estimated_costs,
        load_candidate_prices,
        measure_candidates,
        token_columns,
        true_costs,
    )
    from tiergate.training.data import load_outcomes, load_prices
    from tiergate.training.decision_logs import log_set, outcomes_from_logs
    from tiergate.training.embeddings import cached_minilm, tqdm_progress
    from tiergate.training.labels import check_two_classes
    from tiergate.training.train import (
        HeadConfig,
        TrainConfig,
        build_candidates,
        build_multi_tier,
        build_two_tier,
        default_threshold_bp,
        fit_features,
    )

    tiers = tier_args(args)
    candidates = tiers.candidates or args.reference is not None
    if candidates:
        _check_candidates(tiers, args.reference)
    for name, val, low in (
        ("--neighbours", args.neighbours, 1),
        ("--epochs", args.epochs, 1),
        ("--ensemble", args.ensemble, 1),
        ("--folds", args.folds, 2),
        ("--hidden", args.hidden, 0),
    ):
        if val < low:
            raise DataError(f"{name} must be at least {low}, got {val}")
    if args.ridge_lambda < 0:
        raise DataError(f"--ridge-lambda must be >= 0, got {args.ridge_lambda}")
    for flag, val in (
        ("--task-weight", args.task_weight),
        ("--task-head", args.task_head),
        ("--ridge-share", args.ridge_share),
    ):
        if not 0.0 <= val <= 1.0:
            raise DataError(f"{flag} must be in 0..1, got {val}")
    split = None if args.split == "all" else args.split
    columns = token_columns(tiers.models) if candidates else ()
    logs = log_set(args.data)
    if logs and not tiers.two_tier:
        raise DataError("decision logs train two-tier routers: give --weak and --strong (tier names as logged)")
    if logs:
        data = outcomes_from_logs(logs, tiers.models)
    else:
        data = load_outcomes(args.data, tiers.models, split=split, token_columns=columns)
    if candidates:
        cands = measure_candidates(data, tiers.models, load_candidate_prices(str(tiers.prices_file), tiers.models))
        prices = [c.input_usd_per_mtok + c.output_usd_per_mtok for c in cands]
    else:
        prices = load_prices(tiers.prices_file, tiers.models) if tiers.prices_file else [0.0, 1.0]
    if tiers.two_tier:
        # Deterministic label "strong strictly better": one value on every row leaves nothing to route.
        check_two_classes(
            (data.scores[:, 1] > data.scores[:, 0]).astype(float),
            data.origins,
            f"'{tiers.models[1]} beats {tiers.models[0]}'",
        )
    else:
        best = data.scores.argmax(axis=1)
        check_two_classes(best.astype(float), data.origins, "the best tier's index")
    if len(data) < args.folds * 2:
        raise DataError(f"{len(data)} rows are too few to train with {args.folds} folds")
    cfg = TrainConfig(
        label_mode=args.label_mode if tiers.two_tier else "quality",
        neighbours=args.neighbours,
        head=HeadConfig(
            hidden=args.hidden, epochs=args.epochs, batch=args.batch, ensemble=args.ensemble, seed=args.seed
        ),
        folds=args.folds,
        task_weight=args.task_weight,
        task_head=args.task_head,
        ridge_share=args.ridge_share,
        ridge_lambda=args.ridge_lambda,
    )
    enc = cached_minilm(cache_dir=args.cache_dir, threads=args.threads)
    emb = enc.encode(data.prompts).astype(np.float32)
    feature_names = [f.strip() for f in args.features.split(",") if f.strip()]
    features = fit_features(feature_names, data.prompts)
    head_x = head_inputs(features, emb, data.prompts)
    per_fit = cfg.head.epochs * (2 if cfg.task_head > 0 and len(set(data.tasks)) > 1 else 1)
    per_fit = 0 if cfg.ridge_share >= 1.0 else per_fit
    bar = tqdm_progress((cfg.folds + cfg.head.ensemble) * per_fit, "training", "epoch")
    try:
        import torch

        # Small MLP steps are dominated by per-op overhead: one thread measured 2.3x faster than two here.
        torch.set_num_threads(1)
        torch.manual_seed(args.seed)
        if tiers.two_tier:
            members, margin, calibration, metrics = build_two_tier(
                emb, data.scores[:, 0], data.scores[:, 1], cfg, progress=bar, tasks=data.tasks, head_x=head_x
            )
            default_bp, default_lambda = default_threshold_bp(calibration), 0
        elif candidates:
            members, calibration, default_lambda, metrics = build_candidates(
                emb,
                data.scores,
                estimated_costs(data.prompts, cands),
                true_costs(data, cands),
                tiers.models.index(args.reference),
                cfg,
                progress=bar,
                tasks=data.tasks,
                head_x=head_x,
            )
            margin, default_bp = None, 5000
        else:
            members, calibration, default_lambda, metrics = build_multi_tier(
                emb, data.scores, prices, cfg, progress=bar, tasks=data.tasks, head_x=head_x
            )
            margin, default_bp = None, 5000
    finally:
        bar.close()
    created = args.created or datetime.now(UTC).replace(microsecond=0).isoformat()
    art = RouterArtifact(
        encoder=EncoderSpec(id=enc.encoder_id, dim=enc.dim, max_tokens=MAX_TOKENS),
        kind="two_tier" if tiers.two_tier else "candidates" if candidates else "multi_tier",
        label_mode=cfg.label_mode,
        label_margin=margin,
        tiers=[_candidate_tier(c) for c in cands]
        if candidates
        else [Tier(name=m, price=p) for m, p in zip(tiers.models, prices, strict=True)],
        reference=args.reference if candidates else None,
        members=members,
        calibration=calibration,
        provenance={
            "files": [f.to_json() for f in data.provenance],
            "split": split,
            "rows": len(data),
            "seed": args.seed,
            "neighbours": cfg.neighbours,
            "task_weight": cfg.task_weight,
            "task_head": cfg.task_head,
            "features": feature_names,
            "ridge_share": cfg.ridge_share,
            "ridge_lambda": cfg.ridge_lambda,
            "head": {"hidden": cfg.head.hidden, "epochs": cfg.head.epochs, "ensemble": cfg.head.ensemble},
            "created": created,
            "tiergate_version": _version(),
            "command": "tiergate train " + " ".join(shlex.quote(a) for a in _argv_tail()),
        },
        default_threshold_bp=default_bp,
        default_cost_weight_bp=default_lambda,
        metrics=metrics,
        features=features,
    )
    size = save_artifact(art, args.out)
    summary = (
        f"OOF APGR {metrics['oof_apgr']:.4f}, default threshold {default_bp} bp"
        if tiers.two_tier
        else f"default cost weight {default_lambda} bp" + (" per USD per 1k prompts" if candidates else "")
    )
    print(f"wrote {args.out} ({size} bytes, {len(data)} rows, label {cfg.label_mode}; {summary})", file=sys.stderr)
    return 0


def _check_candidates(tiers: TierArgs, reference: str | None) -> None:
    """Candidates need --tiers with --prices and a one-sample --reference among them (`RoutingError` otherwise)."""
    if tiers.prices_file is None:
        raise RoutingError("--reference (candidates) goes with --tiers C1,...,Ck and --prices FILE")
    for name in tiers.models:
        parse_candidate(name)
    if reference is None:
        raise RoutingError(
            "candidate tiers (MODEL@N) need --reference C: the one-sample candidate the others are measured against"
        )
    check_reference(tiers.models, reference)


def _candidate_tier(c: Candidate) -> Tier:
    from tiergate.routing.artifact import Tier

    return Tier(
        name=c.name,
        price=c.input_usd_per_mtok + c.output_usd_per_mtok,
        model=c.model,
        n=c.n,
        input_usd_per_mtok=c.input_usd_per_mtok,
        output_usd_per_mtok=c.output_usd_per_mtok,
        output_tokens=c.output_tokens,
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tiergate")
    except PackageNotFoundError:
        return "unknown"


def _argv_tail() -> list[str]:
    argv = sys.argv[1:]
    return argv[argv.index("train") + 1 :] if "train" in argv else argv
