"""The configuration `tiergate serve` runs: a policy (optional), the command line's overrides and the loaded
classifier, composed in one pure function, used at start-up and on every policy reload alike."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from tiergate.api.naming import TENANT_KEYS_DIR
from tiergate_router.config.from_policy import from_policy
from tiergate_router.config.knobs import DEFAULT_THRESHOLD_BP, LoadedSource
from tiergate_router.config.local import LocalOverrides, apply_overrides, local_config
from tiergate_router.config.predicted import blended_mix_bp, with_predicted_mix
from tiergate_router.config.shadow import canary_share_bp, with_canary
from tiergate_router.config.types import RouterConfig
from tiergate_router.errors import ConfigError

if TYPE_CHECKING:
    from tiergate.api.policy import RoutingPolicy

NOTHING_TO_ROUTE = "nothing to route to: give -f POLICY.yaml or at least one --tier NAME=BASE_URL"


def serve_config(
    policy: RoutingPolicy | None,
    overrides: LocalOverrides,
    classifier: LoadedSource | None,
    *,
    discovery: bool = False,
    canary: LoadedSource | None = None,
) -> RouterConfig:
    """The RouterConfig for `tiergate serve`. `classifier` is the loaded artifact (None with one tier: nothing to
    decide); an N-tier one makes the config choose by cost weight, and the two-tier knobs are refused for it. The
    tiers (the policy's with `--tier` merged in) are mapped to an N-tier artifact once, here, and `--cost-weight-bp`
    replaces the policy's knob (costWeightBasisPoints, budgetPerMillion) or the artifact's default there. A
    `candidates` artifact chooses (tier, n) by a cost weight too (its own, calibrated in USD per 1k prompts).
    `canary`: the loaded canary artifact (spec.router.canary, `--canary-artifact`), whose knobs come from the same
    policy and flags by the same rules (a second config built here, `shadow.with_canary`)."""
    cfg = _serve_config(policy, overrides, classifier, discovery=discovery)
    share = canary_share_bp(policy, overrides.shadow)
    if canary is None or share is None:
        return cfg
    try:
        canary_cfg = _serve_config(policy, overrides, canary, discovery=discovery)
    except ConfigError as e:
        raise ConfigError(f"canary artifact {canary.source}: {e}") from e
    blended = blended_mix_bp(cfg.predicted_mix_bp, canary_cfg.predicted_mix_bp, share)
    return with_canary(dataclasses.replace(cfg, predicted_mix_bp=blended), canary_cfg, str(canary.source), share)


def _serve_config(
    policy: RoutingPolicy | None,
    overrides: LocalOverrides,
    classifier: LoadedSource | None,
    *,
    discovery: bool = False,
) -> RouterConfig:
    kind = classifier.kind if classifier is not None else None
    multi = classifier if kind == "multi_tier" else None
    cands = classifier if kind == "candidates" else None
    if multi is None and cands is None and overrides.cost_weight_bp is not None:
        raise ConfigError("--cost-weight-bp: applies to N-tier (multi_tier) and candidates artifacts only")
    if (multi is not None or cands is not None) and overrides.threshold_bp is not None:
        what = "an N-tier" if multi is not None else "a candidates"
        raise ConfigError(f"--threshold-bp: {what} artifact chooses by cost weight; use --cost-weight-bp")
    if policy is not None:
        cfg = from_policy(
            policy,
            discovery=discovery,
            thresholds=classifier if kind == "two_tier" else None,
            multi=multi,
            candidates=cands,
            tier_flags=overrides.tiers,
            cost_weight_bp=overrides.cost_weight_bp,
            reward_url=overrides.best_of_n.reward_url,
            tenant_keys_dir=Path(TENANT_KEYS_DIR),
        )
    elif not overrides.tiers:
        raise ConfigError(NOTHING_TO_ROUTE)
    else:
        default_bp = DEFAULT_THRESHOLD_BP
        if classifier is not None and kind == "two_tier":
            default_bp = classifier.default_threshold_bp
        cfg = local_config(
            overrides.tiers,
            threshold_bp=default_bp,
            multi=multi,
            cost_weight_bp=overrides.cost_weight_bp,
            candidates=cands,
        )
    cfg = apply_overrides(cfg, overrides)
    return with_predicted_mix(cfg, classifier.artifact if classifier is not None else None)
