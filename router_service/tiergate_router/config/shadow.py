"""Shadow routing and the router canary in the config: `spec.shadow` and `spec.router.canary` narrowed to
`ShadowConfig` / `CanaryConfig`, and the `tiergate serve` flags that set or replace them:

    --shadow MODE=BASELINE_TIER      Baseline or Mirror, e.g. Mirror=large (spec.shadow.mode, .baselineTier)
    --shadow-sample-bp N             spec.shadow.sampleRateBasisPoints (default 0 without a policy)
    --shadow-max-concurrent N        spec.shadow.maxConcurrent (default 16)
    --shadow-reward-url URL          spec.shadow.rewardUrl (default: the best-of-N reward server)
    --canary-artifact PATH           spec.router.canary.classifier
    --canary-share-bp N              spec.router.canary.shareBasisPoints
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiergate_router.config.types import SHADOW_MODES, BestOfNConfig, CanaryConfig, RouterConfig, ShadowConfig
from tiergate_router.errors import ConfigError

if TYPE_CHECKING:
    from tiergate.api.policy import RoutingPolicy


@dataclass(frozen=True)
class ShadowFlags:
    """The shadow and canary flags of `tiergate serve`; None: not given."""

    mode_tier: tuple[str, str] | None = None
    sample_bp: int | None = None
    max_concurrent: int | None = None
    reward_url: str | None = None
    canary_artifact: Path | None = None
    canary_share_bp: int | None = None

    @property
    def shadow_given(self) -> bool:
        return any(v is not None for v in (self.mode_tier, self.sample_bp, self.max_concurrent, self.reward_url))


def parse_shadow_flag(value: str) -> tuple[str, str]:
    """`MODE=BASELINE_TIER` from `--shadow` -> (mode, tier)."""
    mode, sep, tier = value.partition("=")
    if not sep or mode not in SHADOW_MODES or not tier:
        raise ConfigError(
            f"--shadow {value!r}: expected MODE=BASELINE_TIER with MODE Baseline or Mirror, e.g. Mirror=large"
        )
    return mode, tier


def basis_points(flag: str, value: int | None) -> int | None:
    if value is not None and not 0 <= value <= 10000:
        raise ConfigError(f"{flag}: {value} is outside 0..10000")
    return value


def shadow_of(policy: RoutingPolicy, best_of_n: BestOfNConfig | None) -> ShadowConfig | None:
    """`spec.shadow` as the router's ShadowConfig (None when unset). The judge is `rewardUrl`, else the reward
    server best-of-N uses (`best_of_n`, already resolved: the operator's reward Service or `--reward-url`)."""
    sh = policy.spec.shadow
    if sh is None:
        return None
    url: str | None = sh.reward_url
    model: str | None = None
    if url is None and best_of_n is not None:
        url, model = best_of_n.reward_url, best_of_n.reward_model
    return ShadowConfig(
        mode=sh.mode.value,
        baseline_tier=sh.baseline_tier,
        sample_rate_bp=sh.sample_rate_basis_points,
        max_concurrent=sh.max_concurrent,
        reward_url=None if url is None else url.rstrip("/"),
        reward_model=model,
    )


def apply_shadow(cfg: RouterConfig, flags: ShadowFlags) -> RouterConfig:
    """`cfg` with the shadow flags over its `shadow` (the policy's), or shadow routing turned on by `--shadow`."""
    if not flags.shadow_given:
        return cfg
    base = cfg.shadow
    if base is None:
        if flags.mode_tier is None:
            raise ConfigError("shadow flags: without spec.shadow in a policy, give --shadow MODE=BASELINE_TIER")
        b = cfg.best_of_n
        base = ShadowConfig(
            mode=flags.mode_tier[0],
            baseline_tier=flags.mode_tier[1],
            reward_url=b.reward_url if b is not None else None,
            reward_model=b.reward_model if b is not None else None,
        )
    changes: dict[str, Any] = {}
    if flags.mode_tier is not None:
        changes["mode"], changes["baseline_tier"] = flags.mode_tier
    if flags.sample_bp is not None:
        changes["sample_rate_bp"] = flags.sample_bp
    if flags.max_concurrent is not None:
        changes["max_concurrent"] = flags.max_concurrent
    if flags.reward_url is not None:
        changes["reward_url"], changes["reward_model"] = flags.reward_url.rstrip("/"), None
    try:
        return dataclasses.replace(cfg, shadow=dataclasses.replace(base, **changes))
    except ConfigError as e:
        raise ConfigError(f"command line: {e}") from e


def canary_share_bp(policy: RoutingPolicy | None, flags: ShadowFlags) -> int | None:
    """The canary's share: `--canary-share-bp`, else the policy's; None when no canary is configured."""
    if flags.canary_share_bp is not None:
        return flags.canary_share_bp
    canary = policy.spec.router.canary if policy is not None else None
    return canary.share_basis_points if canary is not None else None


def policy_canary_path(policy: RoutingPolicy | None) -> Path | None:
    """The canary artifact's path inside the router container (a path, or the ConfigMap key the operator mounts)."""
    from tiergate.api import naming

    canary = policy.spec.router.canary if policy is not None else None
    if canary is None:
        return None
    ref = canary.classifier
    if ref.path is not None:
        return Path(ref.path)
    if ref.config_map is None:  # the model's validator enforces exactly one of the two
        raise ConfigError("spec.router.canary.classifier: names neither a configMap nor a path")
    return Path(naming.canary_classifier_path(ref.config_map.key))


def with_canary(cfg: RouterConfig, canary_cfg: RouterConfig, artifact: str, share_bp: int) -> RouterConfig:
    """`cfg` with a canary deciding `share_bp` of routed requests by the knobs `canary_cfg` was built with (the same
    policy and flags over the canary artifact: `serve.serve_config` builds it, so every knob rule applies alike)."""
    if canary_cfg.tier_names != cfg.tier_names:
        raise ConfigError("canary: serves other tiers than the primary artifact")
    canary = CanaryConfig(
        artifact=artifact,
        share_bp=share_bp,
        thresholds_bp=canary_cfg.thresholds_bp,
        multi_tier=canary_cfg.multi_tier,
        candidates=canary_cfg.candidates,
    )
    return dataclasses.replace(cfg, canary=canary)
