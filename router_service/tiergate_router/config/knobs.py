"""Decision knobs shared by every way of building a config: what a loaded classifier artifact tells the config
(its calibration, through the `ThresholdSource` / `MultiTierSource` protocols that
`tiergate_router.artifact_classifier.LoadedClassifier` satisfies), the N-tier mapping, and the placeholder
threshold used when nothing sets it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tiergate.routing.tiers import PRICE_WAY_OUT, artifact_tier, price_factor, price_mismatch
from tiergate_router.config.types import CandidateRouting, MultiTier, RouterConfig, TierConfig
from tiergate_router.errors import ConfigError

if TYPE_CHECKING:
    from tiergate.routing.artifact import RouterArtifact

# The two-tier threshold used when neither a policy nor the artifact gives one (an even split of the score).
DEFAULT_THRESHOLD_BP = 5000

# The knobs (API names) that act on a two-tier artifact's score; the others choose among N tiers.
TWO_TIER_KNOBS = ("thresholdBasisPoints", "targetStrongShareBasisPoints")


class ThresholdSource(Protocol):
    """What a loaded two-tier classifier artifact knows about thresholds (its calibration)."""

    @property
    def default_threshold_bp(self) -> int: ...

    def threshold_for_share_bp(self, share_bp: int) -> int: ...


class MultiTierSource(Protocol):
    """What a loaded N-tier artifact tells the config. The budget rule is the artifact's calibration
    (`cost_weight_for_budget_bp`), never recomputed here."""

    @property
    def source(self) -> Path: ...

    @property
    def artifact(self) -> RouterArtifact: ...

    @property
    def tier_names(self) -> tuple[str, ...]: ...

    @property
    def default_cost_weight_bp(self) -> int: ...

    def cost_weight_for_budget_bp(self, budget: float) -> int: ...


class LoadedSource(ThresholdSource, MultiTierSource, Protocol):
    """A loaded classifier of either kind, as `tiergate serve` holds it; `kind` says which protocol applies."""

    @property
    def kind(self) -> str: ...


def two_tier_thresholds(names: Sequence[str], threshold_bp: int, *, where: str) -> tuple[int, ...]:
    """The thresholds of the tiers `names` under a two-tier artifact: none for one tier, `threshold_bp` for two.
    More are refused (ConfigError naming `where` and the tiers between): the artifact's one score is the
    probability that the strongest tier is needed, calibrated between the cheapest and the strongest only, so
    nothing says where a middle tier would begin (splitting the score range evenly, as this once did for `--tier`,
    routed by thresholds no data supports; repeating the one threshold, as it did for a policy, never chose the
    middle tiers at all)."""
    if len(names) <= 1:
        return ()
    if len(names) == 2:
        return (threshold_bp,)
    between = ", ".join(names[1:-1])
    raise ConfigError(
        f"{where}: {len(names)} tiers, but a two-tier classifier artifact (one score: the cheapest or the strongest "
        f"tier) calibrates nothing between the two, so {between} would never be chosen; serve two tiers with it, "
        "or an N-tier artifact that predicts every tier's quality (`tiergate train --tiers M1,M2,... --prices "
        "FILE`, named by spec.router.classifier or --router)"
    )


def multi_tier_for(
    tiers: Sequence[TierConfig],
    source: MultiTierSource,
    cost_weight_bp: int | None,
    *,
    budget: float | None = None,
) -> MultiTier:
    """The N-tier routing of `tiers` by `source`'s artifact. Each tier maps to the artifact tier named like its
    name, else like its served model name, else like its model (tier names are DNS labels of at most 20 characters,
    artifact tiers are model names such as `llama-3.1-8b-instruct`). The tiers may be any subset of the artifact's;
    the choice is made among those served. ConfigError names a tier the artifact does not know, or two tiers on one.
    Computed once per config and carried in it.

    Prices: each priced tier (a policy's) is weighed at its own price (input + output), an unpriced one (`--tier`)
    at the artifact's price for its tier. The weight: `cost_weight_bp` as given (it means quality per $/Mtok of
    these prices); else from the artifact's calibration, its default or the best point within `budget` ($/Mtok).
    That table was measured at the artifact's prices, so it holds only for prices in the same ratios (k times the
    artifact's, `tiergate.routing.tiers.price_factor`): then the budget is compared as budget / k and the choice
    made at the artifact's prices with the calibrated weight, which chooses exactly as these prices do at
    weight / k. Prices in other ratios are refused, naming the first tier off the ratio: no table describes them.
    The operator checks the same rules on an artifact it hands over (`tiergate_operator.classifier`)."""
    known = source.tier_names
    columns = _columns(tiers, known, source.source)
    art_prices = [float(t.price) for t in source.artifact.tiers]
    mine = [
        art_prices[c] if t.price_per_mtok is None else t.price_per_mtok for t, c in zip(tiers, columns, strict=True)
    ]
    k, off = price_factor(mine, [art_prices[c] for c in columns])
    scale = k if off < 0 else None
    if cost_weight_bp is not None:
        prices = list(art_prices)
        for c, p in zip(columns, mine, strict=True):
            prices[c] = p
        return MultiTier(source.artifact, tuple(columns), cost_weight_bp, tuple(prices), calibration_scale=scale)
    if off >= 0:
        need = "spec.router.budgetPerMillion" if budget is not None else "the artifact's default cost weight"
        off_by = price_mismatch(mine[off], k, off == 0, art_prices[columns[off]], known[columns[off]])
        raise ConfigError(
            f"tiers[{off}] ({tiers[off].name}).price: {off_by}; the artifact's calibration, measured at its own "
            f"prices, does not describe these, and {need} comes from it. {PRICE_WAY_OUT}"
        )
    if budget is None:
        bp = source.default_cost_weight_bp
    else:
        try:
            bp = source.cost_weight_for_budget_bp(budget / k)
        except ConfigError as e:
            if k == 1.0:
                raise
            raise ConfigError(f"{e} (the tiers' prices are {k:g} x the artifact's, so that is {budget:g} here)") from e
    return MultiTier(source.artifact, tuple(columns), bp, tuple(art_prices), price_scale=k, calibration_scale=k)


def _columns(tiers: Sequence[TierConfig], known: Sequence[str], source: Path) -> list[int]:
    """Per tier, the index of the artifact tier (`known`) it serves (`multi_tier_for` gives the rule)."""
    columns: list[int] = []
    for i, t in enumerate(tiers):
        keys = [k for k in (t.name, t.served_model, t.model) if k]
        col = artifact_tier(keys, known)
        if col is None:
            raise ConfigError(
                f"tiers[{i}] ({t.name}): matches no tier of the N-tier artifact {source} by name, "
                f"servedModelName or model ({', '.join(map(repr, dict.fromkeys(keys)))}); its tiers: "
                f"{', '.join(known)}"
            )
        if col in columns:
            other = tiers[columns.index(col)].name
            raise ConfigError(f"tiers[{i}] ({t.name}): maps to artifact tier {known[col]!r}, as {other!r} does")
        columns.append(col)
    return columns


def with_multi_tier(cfg: RouterConfig, source: MultiTierSource, cost_weight_bp: int | None = None) -> RouterConfig:
    """`cfg` routed by the N-tier artifact `source`, its tiers mapped afresh (`multi_tier_for`): for a config whose
    tiers are final and whose classifier changes. Building a config from a policy or flags maps its tiers already."""
    return dataclasses.replace(cfg, multi_tier=multi_tier_for(cfg.tiers, source, cost_weight_bp))


def candidate_routing_for(
    tiers: Sequence[TierConfig], source: MultiTierSource, cost_weight_bp: int | None
) -> CandidateRouting:
    """(tier, n) routing of `tiers` by `source`'s `candidates` artifact (`cost_weight_bp` None: its calibrated
    default). Each candidate `MODEL@N` maps to the tier whose name, servedModelName or model is its MODEL (as
    `multi_tier_for` matches); candidates of models no tier serves are never chosen. ConfigError when no candidate
    maps to a tier.

    Prices, as for N-tier artifacts (`multi_tier_for`): a priced tier's input and output prices are what its
    candidates cost (n samples of output each); with `cost_weight_bp` given they replace the artifact's. The
    calibrated default weight was measured at the artifact's prices: it holds for prices that are one factor k times
    the artifact's (input and output alike: every candidate's cost is then k times, and the choice at the artifact's
    prices is the choice at these), and prices in other ratios are refused, naming the tier."""
    from dataclasses import replace

    from tiergate.routing.candidates import candidates_of

    cands = candidates_of(source.artifact)
    tier_of: list[int | None] = []
    for c in cands:
        tier_of.append(next((i for i, t in enumerate(tiers) if c.model in (t.name, t.served_model, t.model)), None))
    if all(i is None for i in tier_of):
        raise ConfigError(
            f"no tier serves a model of the candidates artifact {source.source} (its models: "
            f"{', '.join(dict.fromkeys(c.model for c in cands))}); name tiers, servedModelName or model after them"
        )
    served = [(c, tiers[i]) for c, i in zip(cands, tier_of, strict=True) if i is not None and tiers[i].priced]
    if cost_weight_bp is not None:
        by_model = {c.model: t for c, t in served}
        cands = tuple(
            replace(c, input_usd_per_mtok=t.input_price_per_mtok, output_usd_per_mtok=t.output_price_per_mtok)
            if (t := by_model.get(c.model)) is not None
            else c
            for c in cands
        )
        return CandidateRouting(cands, tuple(tier_of), cost_weight_bp)
    mine = [p for _, t in served for p in (t.input_price_per_mtok, t.output_price_per_mtok)]
    theirs = [p for c, _ in served for p in (c.input_usd_per_mtok, c.output_usd_per_mtok)]
    _, off = price_factor(mine, theirs)
    if off >= 0:
        c, t = served[off // 2]
        side = ("input", "output")[off % 2]
        raise ConfigError(
            f"tier {t.name}: its {side} price {mine[off]:g} $/Mtok is not the candidates artifact's "
            f"{theirs[off]:g} for {c.model} (nor the same multiple as the other prices); the artifact's calibrated "
            f"cost weight, measured at its own prices, does not describe these. {PRICE_WAY_OUT}"
        )
    return CandidateRouting(cands, tuple(tier_of), source.default_cost_weight_bp)
