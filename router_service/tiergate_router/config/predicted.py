"""The traffic mix a config's operating point predicts: per tier, the share of routed requests the classifier
artifact's calibration measured at the knob the config serves (`tiergate.routing.operating_points`).

The router exports it (`tiergate_router_predicted_share`) beside what it served, so that whoever watches the mix
(the operator's status.observedMix and its MixDrift condition, a dashboard) compares it with the figure `tiergate
calibrate` prints for the same knob. A prediction is only made where the calibration describes the decision:
- two tiers with a two-tier artifact: the strong share at the threshold;
- N tiers with a multi-tier artifact, every artifact tier served and the choice weighed at the artifact's own
  prices (the calibration's conditions): the shares at the cost weight.
Anything else (a subset of an N-tier artifact's tiers, prices in other ratios with a weight given by hand, a
candidates artifact, one tier, shadow routing in Baseline mode, where the baseline tier answers everything) predicts
nothing: a figure the calibration never measured would raise false alarms. A canary artifact deciding a share of
requests (spec.router.canary) blends the two predictions by that share (`blended_mix_bp`), or predicts nothing when
either artifact's calibration does not describe its decision.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from tiergate.routing.operating_points import BP, shares_at, strong_share_at
from tiergate_router.config.types import RouterConfig

if TYPE_CHECKING:
    from tiergate.routing.artifact import RouterArtifact


def predicted_mix_bp(cfg: RouterConfig, artifact: RouterArtifact | None) -> tuple[int, ...] | None:
    """Per tier of `cfg` (cheapest first), the predicted share of routed requests in basis points; None where the
    calibration does not describe this config (the module docstring lists when it does)."""
    if artifact is None or cfg.candidates is not None or len(cfg.tiers) < 2:
        return None
    if cfg.shadow is not None and cfg.shadow.mode == "Baseline":
        # What is served is the baseline tier, not the decisions the calibration describes.
        return None
    table = artifact.calibration
    mt = cfg.multi_tier
    if mt is None:
        if artifact.kind != "two_tier" or len(cfg.tiers) != 2:
            return None
        strong = strong_share_at(table.thresholds, cfg.thresholds_bp[0])
        if strong is None:
            return None
        s = round(strong * BP)
        return (BP - s, s)
    art_prices = tuple(float(t.price) for t in artifact.tiers)
    if len(mt.columns) != len(artifact.tiers) or tuple(mt.prices) != art_prices:
        return None
    shares = shares_at(table.cost_weights, mt.cost_weight_bp)
    if shares is None or len(shares) != len(artifact.tiers):
        return None
    return tuple(round(shares[c] * BP) for c in mt.columns)


def with_predicted_mix(cfg: RouterConfig, artifact: RouterArtifact | None) -> RouterConfig:
    """`cfg` carrying its predicted mix (`predicted_mix_bp`)."""
    return dataclasses.replace(cfg, predicted_mix_bp=predicted_mix_bp(cfg, artifact))


def blended_mix_bp(
    primary: tuple[int, ...] | None, canary: tuple[int, ...] | None, canary_share_bp: int
) -> tuple[int, ...] | None:
    """The mix predicted when a canary artifact decides `canary_share_bp` of routed requests and the primary the
    rest: each tier's share weighed by the artifacts' shares of traffic; None unless both predict one."""
    if primary is None or canary is None or len(primary) != len(canary):
        return None
    return tuple(
        round((p * (BP - canary_share_bp) + c * canary_share_bp) / BP) for p, c in zip(primary, canary, strict=True)
    )
