"""Building a RouterConfig from the typed RoutingPolicy model (`tiergate.api.policy`, the CRD spec's schema).

The router never works on the policy model directly: `from_policy` narrows it to what the data plane needs. Every
policy field is read here through the typed model, so a renamed field fails `mypy --strict`, not a running router.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tiergate_router.classifier import DEFAULT_CACHE_BYTES, DEFAULT_CACHE_ENTRIES
from tiergate_router.config.knobs import (
    DEFAULT_THRESHOLD_BP,
    TWO_TIER_KNOBS,
    MultiTierSource,
    ThresholdSource,
    candidate_routing_for,
    multi_tier_for,
    two_tier_thresholds,
)
from tiergate_router.config.local import TierFlag, merge_tier_flags
from tiergate_router.config.secrets import api_key
from tiergate_router.config.shadow import shadow_of
from tiergate_router.config.tenancy import tenancy_from_policy
from tiergate_router.config.types import (
    DEFAULT_INFLIGHT_BODY_BYTES,
    DEFAULT_RESPONSE_BYTES,
    PERSONALIZATION_NEEDS,
    BestOfNConfig,
    PersonalizationConfig,
    RouterConfig,
    ServiceRef,
    TierConfig,
    check_base_url,
    tier_at,
)
from tiergate_router.errors import ConfigError
from tiergate_router.modality import AttachmentPolicy

if TYPE_CHECKING:
    from tiergate.api.policy import RoutingPolicy, Tier


def from_policy(
    policy: RoutingPolicy,
    *,
    namespace: str | None = None,
    discovery: bool = False,
    thresholds: ThresholdSource | None = None,
    multi: MultiTierSource | None = None,
    environ: Mapping[str, str] | None = None,
    tier_flags: Sequence[TierFlag] = (),
    cost_weight_bp: int | None = None,
    reward_url: str | None = None,
    candidates: MultiTierSource | None = None,
    tenant_keys_dir: Path | None = None,
) -> RouterConfig:
    """Narrow a typed RoutingPolicy to a RouterConfig.

    Tiers with `endpoint` use that URL. Tiers the operator deploys are reached through their Service: with
    `discovery`, the pods behind it (EndpointSlices, for per-pod balancing); without, the Service's DNS name.
    `tier_flags` (`tiergate serve --tier`) replace the URL of the tier of that name or add a tier
    (`local.merge_tier_flags`), before anything below is decided.
    The decision knob: `thresholdBasisPoints` as given; `targetStrongShareBasisPoints` or nothing needs the
    artifact's calibration (`thresholds`). With a two-tier artifact and more than two tiers the score separates the
    cheapest tier from the strongest, and the tiers between serve as fallbacks. With an N-tier artifact (`multi`)
    the tiers map to the artifact's (`knobs.multi_tier_for`, once, over the final tiers) and the cost weight
    chooses, against the policy's tier prices: `cost_weight_bp` (`--cost-weight-bp`) or `costWeightBasisPoints` as
    given, `budgetPerMillion` through the artifact's calibration, else its calibrated default (those two only for
    prices in the artifact's ratios, see `multi_tier_for`). A `candidates` artifact (`candidates`) chooses (tier, n)
    by its own cost weight (`--cost-weight-bp`, `costWeightBasisPoints`, else its calibrated default). A two-tier
    artifact serves at most two tiers (`knobs.two_tier_thresholds`). A knob of the other artifact kind means nothing
    there and is refused, naming it. An external tier's `apiKeySecretRef` is read from the environment
    (`secrets.api_key`; `environ`, default os.environ). `spec.bestOfN` becomes `best_of_n` (`best_of_n_of`;
    `reward_url`, the `--reward-url` flag, wins over the reward Service's address the operator deploys).
    Tenants: `tenancy.tenancy_from_policy`, their keys from the environment or files in `tenant_keys_dir`.
    """
    spec = policy.spec
    ns = policy.metadata.namespace or namespace or "default"
    policy_tiers = tuple(_tier(policy, i, t, ns, discovery, environ) for i, t in enumerate(spec.tiers))
    tiers = merge_tier_flags(policy_tiers, tier_flags)
    r = spec.router
    cache_entries, cache_bytes = _cache_bounds(policy)
    inflight_bytes, response_bytes = _body_limits(policy)
    cost_weight, budget = _cost_weight_bp(policy, multi) if multi is not None else (None, None)
    if cost_weight_bp is not None:
        cost_weight, budget = cost_weight_bp, None
    by_weight = multi is not None or candidates is not None
    th = DEFAULT_THRESHOLD_BP if by_weight else _threshold_bp(policy, thresholds, needed=len(tiers) > 1)
    # Its messages name the policy already (as _cost_weight_bp's), so it runs outside the try that adds the name.
    candidate_weight = _candidate_weight_bp(policy, candidates, cost_weight_bp) if candidates is not None else None
    personalization = personalization_of(policy, multi)
    try:
        multi_tier = None
        routing = None
        if multi is not None:
            multi_tier = multi_tier_for(tiers, multi, cost_weight, budget=budget)
            thresholds_bp: tuple[int, ...] = (th,) * (len(tiers) - 1)  # unused: N-tier configs choose by weight
        elif candidates is not None:
            routing = candidate_routing_for(tiers, candidates, candidate_weight)
            thresholds_bp = (th,) * (len(tiers) - 1)  # unused: candidates configs choose by weight
        else:
            where = "spec.tiers" if len(tiers) == len(policy_tiers) else "spec.tiers with --tier"
            thresholds_bp = two_tier_thresholds([t.name for t in tiers], th, where=where)
        best_of_n = best_of_n_of(policy, ns, reward_url=reward_url)
        return RouterConfig(
            tiers=tiers,
            thresholds_bp=thresholds_bp,
            fallback_order=tuple(spec.effective_fallback_order()),
            classifier_artifact=policy_classifier_path(policy),
            connect_timeout_s=float(r.timeouts.connect_seconds),
            request_timeout_s=float(r.timeouts.request_seconds),
            per_try_timeout_s=None if r.timeouts.per_try_seconds is None else float(r.timeouts.per_try_seconds),
            max_attempts_per_tier=r.retries.attempts_per_tier,
            retry_budget_percent=r.retries.budget_percent,
            min_retry_concurrency=r.retries.min_retry_concurrency,
            backoff_base_s=r.retries.backoff_base_milliseconds / 1000,
            backoff_max_s=r.retries.backoff_max_milliseconds / 1000,
            breaker_failures=r.circuit_breaker.consecutive_failures,
            breaker_open_s=float(r.circuit_breaker.open_seconds),
            max_outstanding_per_endpoint=r.saturation.max_in_flight_per_endpoint,
            saturation_waiting=r.saturation.queued_requests,
            multi_tier=multi_tier,
            classifier_cache_entries=cache_entries,
            classifier_cache_bytes=cache_bytes,
            max_inflight_body_bytes=inflight_bytes,
            max_response_bytes=response_bytes,
            best_of_n=best_of_n,
            shadow=shadow_of(policy, best_of_n),
            candidates=routing,
            attachments=attachment_policy(policy),
            decision_log="-" if r.decision_log is not None and r.decision_log.enabled else None,
            decision_log_prompts=r.decision_log is not None and r.decision_log.include_prompts,
            personalization=personalization,
            tenancy=tenancy_from_policy(
                policy,
                multi=multi,
                keys_dir=tenant_keys_dir,
                price_scale=multi_tier.calibration_scale if multi_tier is not None else None,
            ),
        )
    except ConfigError as e:
        raise ConfigError(f"policy {policy.metadata.name}: {e}") from e


def attachment_policy(policy: RoutingPolicy) -> AttachmentPolicy:
    """`spec.router.attachments` (absent: the defaults, the same as the policy model's)."""
    a = policy.spec.router.attachments
    if a is None:
        return AttachmentPolicy()
    return AttachmentPolicy(
        allowed_hosts=tuple(a.allowed_hosts),
        max_count=a.max_count,
        max_bytes=a.max_bytes,
        on_specialist_failure=a.on_specialist_failure.value,
        mixed_requests=a.mixed_requests.value,
    )


def personalization_of(policy: RoutingPolicy, multi: MultiTierSource | None) -> PersonalizationConfig | None:
    """`spec.router.personalization` when enabled (None otherwise); refused, naming the field, unless the
    classifier artifact is an N-tier one (`multi`): nothing else would act on it."""
    p = policy.spec.router.personalization
    if p is None or not p.enabled:
        return None
    if multi is None:
        where = "the shipped default router" if policy_classifier_path(policy) is None else "the classifier artifact"
        raise ConfigError(
            f"policy {policy.metadata.name}: spec.router.personalization.enabled: {PERSONALIZATION_NEEDS}, and "
            f"{where} is not one"
        )
    return PersonalizationConfig(max_users=p.max_users, prior_strength=p.prior_strength)


def reward_service_url(policy: RoutingPolicy, namespace: str) -> str:
    """The root URL of the reward model the operator deploys for `spec.bestOfN` (its Service, `<policy>-reward`;
    `naming.reward_url`, the address the operator reports too): vLLM's pooling API is at `{url}/pooling`."""
    from tiergate.api import naming

    if policy.spec.best_of_n is None:
        raise ConfigError("spec.bestOfN: not set, so there is no reward Service")
    return naming.reward_url(policy.metadata.name, namespace, policy.spec.best_of_n.reward_model.port)


def best_of_n_of(policy: RoutingPolicy, namespace: str, *, reward_url: str | None = None) -> BestOfNConfig | None:
    """`spec.bestOfN` as the router's BestOfNConfig (None when unset): the reference tier defaults to the strongest
    (last) tier, the reward model is reached at `reward_url` when given (`tiergate serve --reward-url`), else at the
    Service the operator deploys, under the policy's `rewardModel.model` (the name vLLM serves it as)."""
    b = policy.spec.best_of_n
    if b is None:
        return None
    return BestOfNConfig(
        tier=b.tier,
        max_samples=b.max_samples,
        reward_url=(reward_url or reward_service_url(policy, namespace)).rstrip("/"),
        reward_model=b.reward_model.model,
        reference_tier=b.reference_tier or policy.spec.strongest.name,
        timeout_s=b.reward_timeout_milliseconds / 1000,
        # Decimal in the policy (no floats in spec); the scores the reward model returns are floats.
        min_reward=None if b.min_reward is None else float(b.min_reward),
    )


def _cache_bounds(policy: RoutingPolicy) -> tuple[int, int]:
    """`spec.router.classifierCache` (entries, bytes); an unset bound keeps the router's default."""
    c = policy.spec.router.classifier_cache
    entries = c.max_entries if c is not None else None
    size = c.max_bytes if c is not None else None
    return (
        DEFAULT_CACHE_ENTRIES if entries is None else entries,
        DEFAULT_CACHE_BYTES if size is None else size,
    )


def _body_limits(policy: RoutingPolicy) -> tuple[int, int]:
    """`spec.router.bodyLimits` (request bytes in flight, answer bytes); an unset limit keeps the router's default."""
    b = policy.spec.router.body_limits
    inflight = b.max_in_flight_request_bytes if b is not None else None
    response = b.max_response_bytes if b is not None else None
    return (
        DEFAULT_INFLIGHT_BODY_BYTES if inflight is None else inflight,
        DEFAULT_RESPONSE_BYTES if response is None else response,
    )


def _tier(
    policy: RoutingPolicy, i: int, t: Tier, ns: str, discovery: bool, environ: Mapping[str, str] | None
) -> TierConfig:
    from tiergate.api import naming

    endpoint: str | ServiceRef
    if t.endpoint is not None:
        endpoint = t.endpoint.url.rstrip("/")
        check_base_url(endpoint, f"spec.tiers[{i}].endpoint.url")
    elif discovery:
        endpoint = ServiceRef(namespace=ns, name=naming.tier_name(policy.metadata.name, t.name), port=t.engine.port)
    else:
        endpoint = naming.tier_service_url(policy.metadata.name, ns, t.name, t.engine.port)
    return tier_at(
        t.name,
        endpoint,
        served_model=t.model_name,
        model=t.model,
        api_key=api_key(t, i, environ),
        # Decimal in the policy (exact money); float here, where it weighs against predicted quality (N-tier
        # artifacts) and feeds an estimated-cost counter.
        price_per_mtok=(float(t.price.input_per_million), float(t.price.output_per_million)),
        modalities=frozenset(m.value for m in t.modalities),
        hold_when_empty_s=_hold_seconds(t),
        scales_to_zero=t.scales_to_zero,
    )


def _hold_seconds(t: Tier) -> float | None:
    """`autoscaling.whenScaledToZero` Hold's maxHoldSeconds; None (fall back at once) otherwise."""
    held = t.autoscaling.hold_seconds if t.autoscaling is not None else None
    return None if held is None else float(held)


def _knob(policy: RoutingPolicy) -> str | None:
    return next(iter(policy.spec.router.decision_knobs()), None)  # the policy model allows at most one


def _cost_weight_bp(policy: RoutingPolicy, multi: MultiTierSource) -> tuple[int | None, float | None]:
    """An N-tier artifact's (cost weight, budget) from the policy's knob; (None, None): the artifact's calibrated
    default. The budget becomes a weight in `multi_tier_for`, which knows the prices it is compared at."""
    r = policy.spec.router
    knob = _knob(policy)
    if knob in TWO_TIER_KNOBS:
        raise ConfigError(
            f"policy {policy.metadata.name}: spec.router.{knob} is a two-tier knob, but {multi.source} is an "
            "N-tier artifact, which chooses by cost weight: set costWeightBasisPoints or budgetPerMillion "
            "instead, or neither for the artifact's calibrated default"
        )
    if r.cost_weight_basis_points is not None:
        return int(r.cost_weight_basis_points), None
    if r.budget_per_million is not None:
        # Decimal in the policy; the calibration table holds float prices, and one budget comparison is all.
        return None, float(r.budget_per_million)
    return None, None


def _candidate_weight_bp(policy: RoutingPolicy, source: MultiTierSource, flag_bp: int | None) -> int | None:
    """A `candidates` artifact's cost weight: `--cost-weight-bp`, else `costWeightBasisPoints`, else None (the
    artifact's calibrated default, which `tiergate calibrate --usd-per-1k-prompts` sets). `budgetPerMillion` is
    refused: it is a price per million tokens, and a candidates artifact is calibrated in USD per 1k prompts."""
    weight, budget = _cost_weight_bp(policy, source)
    if budget is not None:
        raise ConfigError(
            f"policy {policy.metadata.name}: spec.router.budgetPerMillion is a price per million tokens, but "
            f"{source.source} is a candidates artifact, calibrated in USD per 1k prompts: set costWeightBasisPoints, "
            "or store the operating point in the artifact (tiergate calibrate --usd-per-1k-prompts B --write OUT)"
        )
    return flag_bp if flag_bp is not None else weight


def _threshold_bp(policy: RoutingPolicy, thresholds: ThresholdSource | None, *, needed: bool) -> int:
    """A two-tier artifact's threshold from the policy's knob, else the artifact's calibrated default. With one
    tier there is nothing to decide (`needed` False): no artifact is loaded and any threshold will do."""
    r = policy.spec.router
    knob = _knob(policy)
    if knob is not None and knob not in TWO_TIER_KNOBS:
        where = "the shipped default router" if policy_classifier_path(policy) is None else "its classifier artifact"
        raise ConfigError(
            f"policy {policy.metadata.name}: spec.router.{knob} is an N-tier knob, but {where} is a two-tier one, "
            "which routes by a score threshold: set thresholdBasisPoints or targetStrongShareBasisPoints instead"
        )
    if r.threshold_basis_points is not None:
        return int(r.threshold_basis_points)
    if thresholds is None:
        if not needed:
            return DEFAULT_THRESHOLD_BP
        raise ConfigError(
            "spec.router: sets no thresholdBasisPoints, so the classifier artifact's calibration is "
            "needed to choose one"
        )
    if r.target_strong_share_basis_points is not None:
        return thresholds.threshold_for_share_bp(int(r.target_strong_share_basis_points))
    return thresholds.default_threshold_bp


def policy_classifier_path(policy: RoutingPolicy) -> Path | None:
    """The artifact path inside the router container that the policy names (None: the shipped default)."""
    from tiergate.api import naming

    ref = policy.spec.router.classifier
    if ref is None:
        return None
    if ref.path is not None:
        return Path(ref.path)
    if ref.config_map is None:  # the model's validator enforces exactly one of the two
        raise ConfigError("spec.router.classifier: names neither a configMap nor a path")
    return Path(naming.classifier_path(ref.config_map.key))
