"""Pieces shared by the train/eval/calibrate subcommands: tier arguments, encoder arguments, error handling.

Kept import-light (argparse, pathlib): numpy, torch and matplotlib are imported inside the command bodies.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tiergate.routing.errors import RoutingError


@dataclass(frozen=True)
class TierArgs:
    """The tiers a command works on: two (weak, strong), N with prices, or candidates (`MODEL@N`) with prices."""

    models: list[str]
    prices_file: str | None

    @property
    def two_tier(self) -> bool:
        return self.prices_file is None and len(self.models) == 2

    @property
    def candidates(self) -> bool:
        """`--tiers` names BEST-Route candidates (some `MODEL@N`): a `candidates` router, costs per prompt."""
        return self.prices_file is not None and any("@" in m for m in self.models)


def add_tier_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tiers (either --weak/--strong, or --tiers with --prices)")
    g.add_argument("--weak", metavar="MODEL", help="the cheap model of a two-tier router")
    g.add_argument("--strong", metavar="MODEL", help="the expensive model of a two-tier router")
    g.add_argument(
        "--tiers",
        metavar="M1,M2,...",
        help="models of a multi-tier router, comma-separated; MODEL@N names a best-of-N candidate (docs/routing.md)",
    )
    g.add_argument(
        "--prices",
        metavar="FILE",
        help="JSON {model: {input_usd_per_mtok, output_usd_per_mtok}} or {model: price}; price = input + output "
        "(candidates need the input/output form, keyed by MODEL@N or MODEL)",
    )


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="embedding cache folder (default: embeddings/ under $TIERGATE_CACHE, else ~/.cache/tiergate/embeddings)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for the encoder")


def tier_args(args: argparse.Namespace) -> TierArgs:
    if args.tiers:
        if args.weak or args.strong:
            raise RoutingError("give either --weak/--strong or --tiers, not both")
        models = [m.strip() for m in args.tiers.split(",") if m.strip()]
        if len(models) < 2:
            raise RoutingError(f"--tiers needs at least two models, got {models}")
        if len(set(models)) != len(models):
            raise RoutingError(f"--tiers lists a model twice: {args.tiers}")
        if not args.prices:
            raise RoutingError("--tiers needs --prices FILE")
        return TierArgs(models, args.prices)
    if not (args.weak and args.strong):
        raise RoutingError("give --weak MODEL and --strong MODEL (or --tiers M1,M2,... with --prices FILE)")
    if args.weak == args.strong:
        raise RoutingError("--weak and --strong name the same model")
    if args.prices:
        raise RoutingError("--prices goes with --tiers; a two-tier router measures cost as the strong share")
    return TierArgs([args.weak, args.strong], None)


def guarded(name: str, body: Callable[[], int]) -> int:
    """Run a command body; a `RoutingError` becomes one line on stderr and exit status 2 (no traceback)."""
    try:
        return body()
    except RoutingError as e:
        print(f"tiergate {name}: error: {e}", file=sys.stderr)
        return 2
