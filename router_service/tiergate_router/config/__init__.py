"""The router's configuration: one typed, frozen `RouterConfig`, built from a RoutingPolicy, the command line, or both.

types        RouterConfig, TierConfig, ServiceRef, MultiTier, BestOfNConfig, CandidateRouting and their
             invariants; `tier_at` makes every tier
knobs        the decision knobs' shared parts: the classifier protocols, the N-tier mapping, default thresholds
from_policy  RoutingPolicy (typed) -> RouterConfig
local        `tiergate serve` flags: --tier, --threshold-bp, --cost-weight-bp, the dispatch limits, where to listen
secrets      external tiers' API keys from the environment the operator fills from Secrets
policy_file  reading the mounted policy file
serve        the composition `tiergate serve` runs, at start-up and on reload
predicted    the traffic mix the operating point predicts (exported for the observed-mix status)
"""

from tiergate_router.config.from_policy import (
    best_of_n_of,
    from_policy,
    policy_classifier_path,
    reward_service_url,
)
from tiergate_router.config.knobs import (
    DEFAULT_THRESHOLD_BP,
    TWO_TIER_KNOBS,
    LoadedSource,
    MultiTierSource,
    ThresholdSource,
    candidate_routing_for,
    multi_tier_for,
    two_tier_thresholds,
    with_multi_tier,
)
from tiergate_router.config.local import (
    DISPATCH_FLAGS,
    BestOfNFlags,
    DispatchFlag,
    DispatchSetting,
    Listen,
    LocalOverrides,
    TierFlag,
    apply_best_of_n,
    apply_overrides,
    dispatch_settings,
    listen,
    local_config,
    merge_tier_flags,
    parse_best_of_n_flag,
    parse_min_reward,
    parse_reward_url,
    parse_tier_flag,
    parse_tier_flags,
    served_tier_names,
)
from tiergate_router.config.policy_file import load_policy_file, read_policy
from tiergate_router.config.secrets import api_key
from tiergate_router.config.serve import serve_config
from tiergate_router.config.types import (
    MAX_SAMPLES,
    BestOfNConfig,
    CanaryConfig,
    CandidateRouting,
    MultiTier,
    PersonalizationConfig,
    RouterConfig,
    ServiceRef,
    ShadowConfig,
    TierConfig,
    allowed_candidates,
    check_base_url,
    tier_at,
    validate,
)
from tiergate_router.errors import ConfigError

__all__ = [
    "DEFAULT_THRESHOLD_BP",
    "DISPATCH_FLAGS",
    "MAX_SAMPLES",
    "TWO_TIER_KNOBS",
    "BestOfNConfig",
    "BestOfNFlags",
    "CanaryConfig",
    "CandidateRouting",
    "ConfigError",
    "DispatchFlag",
    "DispatchSetting",
    "Listen",
    "LoadedSource",
    "LocalOverrides",
    "MultiTier",
    "MultiTierSource",
    "PersonalizationConfig",
    "RouterConfig",
    "ServiceRef",
    "ShadowConfig",
    "ThresholdSource",
    "TierConfig",
    "TierFlag",
    "allowed_candidates",
    "api_key",
    "apply_best_of_n",
    "apply_overrides",
    "best_of_n_of",
    "candidate_routing_for",
    "check_base_url",
    "dispatch_settings",
    "from_policy",
    "listen",
    "load_policy_file",
    "local_config",
    "merge_tier_flags",
    "multi_tier_for",
    "parse_best_of_n_flag",
    "parse_min_reward",
    "parse_reward_url",
    "parse_tier_flag",
    "parse_tier_flags",
    "policy_classifier_path",
    "read_policy",
    "reward_service_url",
    "serve_config",
    "served_tier_names",
    "tier_at",
    "two_tier_thresholds",
    "validate",
    "with_multi_tier",
]
