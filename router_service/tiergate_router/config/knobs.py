"""Decision knobs shared by every way of building a config: what a loaded classifier artifact tells the config
(its calibration, through the `ThresholdSource` / `MultiTierSource` protocols that
`tiergate_router.artifact_classifier.LoadedClassifier` satisfies), the N-tier mapping, and the placeholder
thresholds used when nothing sets them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

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


def even_thresholds(n: int, two_tier_bp: int = DEFAULT_THRESHOLD_BP) -> tuple[int, ...]:
    """Thresholds for `n` tiers when nothing sets them: two tiers split at `two_tier_bp`; more split the score
    range evenly (a placeholder knob until a policy sets one; a two-tier artifact's score is the strong-tier
    probability, so nothing calibrates the tiers between)."""
    if n <= 1:
        return ()
    if n == 2:
        return (two_tier_bp,)
    return tuple(round(10000 * i / n) for i in range(1, n))


def multi_tier_for(tiers: Sequence[TierConfig], source: MultiTierSource, cost_weight_bp: int | None) -> MultiTier:
    """The N-tier routing of `tiers` by `source`'s artifact (`cost_weight_bp` None: its calibrated default). Each
    tier maps to the artifact tier named like its name, else like its served model name, else like its model (tier
    names are DNS labels of at most 20 characters, artifact tiers are model names such as `llama-3.1-8b-instruct`).
    The tiers may be any subset of the artifact's; the choice is made among those served. ConfigError names a tier
    the artifact does not know, or two tiers on one. Computed once per config and carried in it."""
    known = source.tier_names
    columns: list[int] = []
    for i, t in enumerate(tiers):
        keys = [k for k in (t.name, t.served_model, t.model) if k]
        col = next((known.index(k) for k in keys if k in known), None)
        if col is None:
            raise ConfigError(
                f"tiers[{i}] ({t.name}): matches no tier of the N-tier artifact {source.source} by name, "
                f"servedModelName or model ({', '.join(map(repr, dict.fromkeys(keys)))}); its tiers: "
                f"{', '.join(known)}"
            )
        if col in columns:
            other = tiers[columns.index(col)].name
            raise ConfigError(f"tiers[{i}] ({t.name}): maps to artifact tier {known[col]!r}, as {other!r} does")
        columns.append(col)
    bp = source.default_cost_weight_bp if cost_weight_bp is None else cost_weight_bp
    return MultiTier(source.artifact, tuple(columns), bp)


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
    maps to a tier."""
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
    bp = source.default_cost_weight_bp if cost_weight_bp is None else cost_weight_bp
    return CandidateRouting(cands, tuple(tier_of), bp)
