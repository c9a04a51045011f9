"""The router's configuration types and their invariants.

`RouterConfig` is the one typed object the data plane works on; it is frozen and checks itself on construction
(`validate`), so no half-valid config ever reaches the router. It is built from a RoutingPolicy (`from_policy`),
from the command line (`local`), or both (`serve`); `tier_at` is the one place a `TierConfig` is made, so a tier
from the policy and a tier from `--tier` cannot drift apart in what they carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from tiergate_router.classifier import DEFAULT_CACHE_BYTES, DEFAULT_CACHE_ENTRIES
from tiergate_router.errors import ConfigError
from tiergate_router.modality import TEXT, TEXT_ONLY, AttachmentPolicy
from tiergate_router.tenants import Tenancy

if TYPE_CHECKING:
    from tiergate.routing.artifact import RouterArtifact
    from tiergate.routing.candidates import Candidate


# Defaults of RouterConfig's body limits (spec.router.bodyLimits); their reasons are at the fields.
DEFAULT_INFLIGHT_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_RESPONSE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ServiceRef:
    """A Kubernetes Service whose ready pods (found through EndpointSlices) serve a tier."""

    namespace: str
    name: str
    port: int
    # URL path prefix of the OpenAI API on each pod.
    path: str = "/v1"
    scheme: str = "http"


@dataclass(frozen=True)
class TierConfig:
    """One model tier. Tiers are ordered cheapest first."""

    name: str
    # Static OpenAI-compatible base URLs, each ending in /v1 (local mode, external endpoints, Service DNS).
    base_urls: tuple[str, ...] = ()
    # Discover the pods behind this Service instead of (or in addition to) the static URLs.
    service: ServiceRef | None = None
    # The model name the tier's server expects; None asks the server (`GET /v1/models`) on first use.
    served_model: str | None = None
    # What the tier serves (the policy's `model`); with an N-tier artifact it may name the artifact's tier.
    model: str | None = None
    # Sent as `Authorization: Bearer <api_key>` (external endpoints with `apiKeySecretRef`). Never printed.
    api_key: str | None = field(default=None, repr=False)
    # Dollars per million tokens: the estimated-cost metric, and, when `priced`, the N-tier decision.
    input_price_per_mtok: float = 0.0
    output_price_per_mtok: float = 0.0
    # Whether the prices above were given (a policy's tier always has them). A `--tier` flag's tier has none: an
    # N-tier artifact then prices it at the artifact's own price for the tier it maps to.
    priced: bool = False
    # Input modalities the tier accepts (spec.tiers[].modalities, `--tier-modalities`); always includes text.
    modalities: frozenset[str] = TEXT_ONLY
    # While the tier has no endpoint (scaled to zero, or waking up): None, the next tier of the chain answers at
    # once; else a request routed to this tier waits up to this long for discovery to find one, then falls back
    # (spec.tiers[].autoscaling.whenScaledToZero Hold, maxHoldSeconds).
    hold_when_empty_s: float | None = None
    # Whether the tier may be scaled to zero (autoscaling mode KEDA or External with replicas.min 0): the router
    # stays ready while it has no endpoint, since the requests routed to it are its demand, which wakes it.
    scales_to_zero: bool = False

    @property
    def price_per_mtok(self) -> float | None:
        """The price the N-tier decision compares: input + output per million tokens, as the artifact's tier
        prices are (`tiergate.training.data.load_prices`); None when not `priced`."""
        return self.input_price_per_mtok + self.output_price_per_mtok if self.priced else None


@dataclass(frozen=True)
class MultiTier:
    """N-tier routing with a `multi_tier` artifact: the router picks argmax(quality - lambda * price) over the
    artifact tiers this config serves (tiergate.routing.operating_points.choose_tiers, lambda = bp / 10000), with
    `prices`. `knobs.multi_tier_for` makes it and says which prices those are (the policy's, or the artifact's when
    the policy's are the same up to one factor and the weight comes from the artifact's calibration: then both
    give the same choice)."""

    artifact: RouterArtifact = field(compare=False, repr=False)
    # Per config tier (cheapest first), the index of the artifact tier it serves.
    columns: tuple[int, ...]
    cost_weight_bp: int
    # Per artifact tier ($/Mtok, input + output), the price the choice weighs; only the served columns matter.
    prices: tuple[float, ...]
    # The policy's prices over `prices` (k when the choice weighs the artifact's prices, which are the policy's / k;
    # else 1): a weight given against the policy's prices (a tenant's) acts on `prices` as weight * k.
    price_scale: float = 1.0
    # k when the policy's prices are k times the artifact's (its calibration holds for them, a budget read as
    # budget / k: tiergate.routing.tiers.price_factor), None when no one factor makes them so.
    calibration_scale: float | None = 1.0


@dataclass(frozen=True)
class CandidateRouting:
    """(tier, n) routing with a `candidates` artifact (BEST-Route): the router picks one candidate `MODEL@N` per
    prompt with `tiergate.routing.candidates.choose_candidate` at `cost_weight_bp`, among those whose model a tier
    serves (`tier_of`) and whose n this config allows (`allowed_candidates`: n > 1 only on the best-of-N tier, and
    at most its maxSamples)."""

    candidates: tuple[Candidate, ...]
    # Per candidate, the index of the config tier serving its model (matched like the N-tier mapping); None: none.
    tier_of: tuple[int | None, ...]
    cost_weight_bp: int


@dataclass(frozen=True)
class PersonalizationConfig:
    """Per-user routing profiles (`spec.router.personalization`, `tiergate serve --personalization`): an N-tier
    decision adjusted by the requesting user's own ratings (`tiergate_router.personalize`)."""

    # Users the table holds (least recently used replaced first).
    max_users: int = 100_000
    # Pseudo-ratings of shrinkage toward the artifact's prediction (`profiles.ProfileConfig.prior`).
    prior_strength: int = 50


@dataclass(frozen=True)
class BestOfNConfig:
    """Best-of-N sampling (`spec.bestOfN`, `tiergate serve --best-of-n TIER=N --reward-url URL`): the prompts routed
    to `tier` get up to `max_samples` answers drawn in one request, and the one the reward model scores highest is
    returned. When the reward model is slow (`timeout_s`), down or answers garbage, or the best score is below
    `min_reward`, `reference_tier` answers the request instead (one sample)."""

    tier: str
    max_samples: int
    # The reward server's root URL (vLLM's pooling API: the client posts to `{reward_url}/pooling`).
    reward_url: str
    # The reward model's name on that server; None asks it (`GET /v1/models`) once.
    reward_model: str | None
    reference_tier: str
    timeout_s: float = 3.0
    min_reward: float | None = None


SHADOW_MODES = ("Baseline", "Mirror")


@dataclass(frozen=True)
class ShadowConfig:
    """Shadow routing (`spec.shadow`, `tiergate serve --shadow MODE=BASELINE_TIER`; tiergate_router.shadow says how
    it acts). Baseline: the baseline tier answers every routed request, the router's decision is only recorded.
    Mirror: the router's tier answers. Either way `sample_rate_bp` of the routed requests are paired with a second
    answer fetched in the background (never awaited by the client), at most `max_concurrent` at once (more are
    dropped and counted), and both are judged by the reward model at `reward_url`."""

    mode: str
    baseline_tier: str
    sample_rate_bp: int = 0
    max_concurrent: int = 16
    # The reward server's root URL (vLLM's pooling API); None only when nothing is judged (Baseline, rate 0).
    reward_url: str | None = None
    reward_model: str | None = None
    # The reward call's deadline: it is off the request path, so it may take longer than best-of-N's.
    reward_timeout_s: float = 10.0


@dataclass(frozen=True)
class CanaryConfig:
    """A second classifier artifact deciding `share_bp` of the routed requests (`spec.router.canary`,
    `tiergate serve --canary-artifact PATH --canary-share-bp N`): its decision knobs, computed once like the primary
    artifact's (`thresholds_bp`, `multi_tier` or `candidates` replace the config's for the requests it decides)."""

    artifact: str
    share_bp: int
    thresholds_bp: tuple[int, ...] = ()
    multi_tier: MultiTier | None = None
    candidates: CandidateRouting | None = None


# Why per-user profiles need an N-tier artifact (the error names the field or flag that asked for them).
PERSONALIZATION_NEEDS = (
    "needs an N-tier (multi_tier) classifier artifact: only the N-tier choice is adjusted per user (two-tier "
    "thresholds and candidates artifacts were not measured)"
)


# The most samples one request may draw (the policy's spec.bestOfN.maxSamples bound, MAX_BEST_OF_N).
MAX_SAMPLES = 16


@dataclass(frozen=True)
class RouterConfig:
    tiers: tuple[TierConfig, ...]
    # Score thresholds in basis points between consecutive tiers (len(tiers) - 1 values, ascending): a prompt goes
    # to the highest tier i whose threshold thresholds_bp[i-1] <= score * 10000. Two tiers: one threshold.
    thresholds_bp: tuple[int, ...] = (5000,)
    # Tier names tried, in this order, after the chosen tier fails; empty = the default order (see fallback_chain).
    fallback_order: tuple[str, ...] = ()
    # Path of the classifier artifact; None = the shipped default router.
    classifier_artifact: Path | None = None
    # Seconds to establish a connection to a backend; a refused/timed-out connect is retried on another endpoint.
    connect_timeout_s: float = 2.0
    # The overall deadline of one client request (Envoy's route timeout): every try on every tier and the backoff
    # between them fit in it; for a streaming request it ends at the first byte. A client may ask for less.
    request_timeout_s: float = 120.0
    # The deadline of one try on one endpoint (Envoy's per_try_timeout); None = what is left of the request's.
    per_try_timeout_s: float | None = None
    # Seconds without data on an established stream before it is abandoned.
    stream_idle_timeout_s: float = 60.0
    # Endpoints tried per tier before falling back (connection failures and 5xx are retried; 4xx are not).
    max_attempts_per_tier: int = 3
    # Envoy's retry budget: retries in flight at most max(min_retry_concurrency, budget% of requests in flight).
    retry_budget_percent: int = 20
    min_retry_concurrency: int = 3
    # Exponential backoff with full jitter between tries on one tier: uniform in [0, min(max, base * 2^(n-1))].
    backoff_base_s: float = 0.025
    backoff_max_s: float = 0.25
    # Consecutive failures that open an endpoint's breaker, and how long it stays open before one probe.
    breaker_failures: int = 3
    breaker_open_s: float = 5.0
    # A tier counts as saturated when every endpoint has this many requests in flight through this router
    # (0 = no limit) or reports at least `saturation_waiting` queued requests (vLLM's num_requests_waiting).
    max_outstanding_per_endpoint: int = 0
    saturation_waiting: int = 0
    # Largest request body accepted; a 10 MB prompt is far beyond any served context and is refused with 413.
    max_body_bytes: int = 4 * 1024 * 1024
    # Bytes of request bodies held at once (admission.ByteBudget): a request waits for room before its body is
    # read. Memory per request is a few times its body (raw, parsed, prompt, forwarded), so this bounds the
    # router's request memory whatever the concurrency; 64 MiB is 16 maximal bodies or thousands of usual ones.
    max_inflight_body_bytes: int = DEFAULT_INFLIGHT_BODY_BYTES
    # Largest non-streaming answer read from a tier (UpstreamTooLargeError, HTTP 502 naming the tier, beyond it). A
    # long chat answer is a few hundred KB; 16 MiB leaves room for many choices or logprobs while bounding what one
    # request can make the router hold. Streams are passed through chunk by chunk and need no cap.
    max_response_bytes: int = DEFAULT_RESPONSE_BYTES
    # The classifier's result cache: at most this many verdicts and this many bytes (classifier.ScoreCache; 0 turns
    # it off). Keys are digests, so neither depends on prompt sizes.
    classifier_cache_entries: int = DEFAULT_CACHE_ENTRIES
    classifier_cache_bytes: int = DEFAULT_CACHE_BYTES
    # The model name clients use for routed requests; tier names also work as model names (forcing that tier).
    routed_model_name: str = "tiergate"
    # Set when the classifier artifact is an N-tier one: the tiers are chosen by cost weight, not thresholds.
    multi_tier: MultiTier | None = None
    # Best-of-N sampling with reward reranking on one tier; None: one sample per request.
    best_of_n: BestOfNConfig | None = None
    # Set when the classifier artifact is a `candidates` one: (tier, n) chosen per prompt by its heads.
    candidates: CandidateRouting | None = None
    # Tenants, their keys, limits and budgets (tiergate_router.tenants); the default lets everyone in.
    tenancy: Tenancy = field(default_factory=Tenancy)
    # Images and audio in chat requests: limits, allowed URL hosts, decomposition (spec.router.attachments).
    attachments: AttachmentPolicy = field(default_factory=AttachmentPolicy)
    # Per tier (cheapest first), the share of routed requests in basis points the classifier artifact's calibration
    # predicts at this config's operating point (`config.predicted.with_predicted_mix`); None: no prediction.
    # Exported as tiergate_router_predicted_share, which the operator sets against the observed mix.
    predicted_mix_bp: tuple[int, ...] | None = None
    # Shadow routing (spec.shadow); None: off.
    shadow: ShadowConfig | None = None
    # A canary classifier artifact deciding a share of routed requests (spec.router.canary); None: off.
    canary: CanaryConfig | None = None
    # The decision log's target (a path, or "-" for stdout; `decision_records`); None: no log. Prompts' text is
    # written only with `decision_log_prompts`, otherwise their digest.
    decision_log: str | None = None
    decision_log_prompts: bool = False
    # Per-user routing profiles; None: off. Only with an N-tier artifact (`multi_tier`).
    personalization: PersonalizationConfig | None = None

    def __post_init__(self) -> None:
        validate(self)

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    @property
    def tier_modalities(self) -> tuple[tuple[str, frozenset[str]], ...]:
        return tuple((t.name, t.modalities) for t in self.tiers)


def validate(cfg: RouterConfig) -> None:
    """Raise ConfigError naming the first field that makes `cfg` unusable."""
    if not cfg.tiers:
        raise ConfigError("tiers: at least one tier is required")
    names = [t.name for t in cfg.tiers]
    for i, t in enumerate(cfg.tiers):
        if not t.name:
            raise ConfigError(f"tiers[{i}].name: must not be empty")
        if t.name in names[:i]:
            raise ConfigError(f"tiers[{i}].name: duplicate tier name {t.name!r}")
        if t.name == cfg.routed_model_name:
            raise ConfigError(f"tiers[{i}].name: {t.name!r} is reserved for routed requests")
        if not t.base_urls and t.service is None:
            raise ConfigError(f"tiers[{i}] ({t.name}): needs an endpoint URL or a service to discover")
        for u in t.base_urls:
            check_base_url(u, f"tiers[{i}].endpoint")
        if t.input_price_per_mtok < 0 or t.output_price_per_mtok < 0:
            raise ConfigError(f"tiers[{i}].price: must not be negative")
        if TEXT not in t.modalities:
            raise ConfigError(f"tiers[{i}] ({t.name}).modalities: must include text")
        if t.hold_when_empty_s is not None and not t.hold_when_empty_s > 0:
            raise ConfigError(f"tiers[{i}].hold_when_empty_s: must be positive")
    if len(cfg.thresholds_bp) != len(cfg.tiers) - 1 and len(cfg.tiers) > 1:
        raise ConfigError(
            f"thresholds_bp: {len(cfg.tiers)} tiers need {len(cfg.tiers) - 1} threshold(s), "
            f"got {len(cfg.thresholds_bp)}"
        )
    for i, th in enumerate(cfg.thresholds_bp):
        if not 0 <= th <= 10000:
            raise ConfigError(f"thresholds_bp[{i}]: {th} is outside 0..10000")
    if list(cfg.thresholds_bp) != sorted(cfg.thresholds_bp):
        raise ConfigError("thresholds_bp: must be ascending")
    for i, n in enumerate(cfg.fallback_order):
        if n not in names:
            raise ConfigError(f"fallback_order[{i}]: unknown tier {n!r} (tiers: {', '.join(names)})")
    for attr in ("connect_timeout_s", "request_timeout_s", "stream_idle_timeout_s", "breaker_open_s"):
        if getattr(cfg, attr) <= 0:
            raise ConfigError(f"{attr}: must be positive")
    if cfg.max_attempts_per_tier < 1 or cfg.breaker_failures < 1:
        raise ConfigError("max_attempts_per_tier and breaker_failures: must be at least 1")
    if cfg.per_try_timeout_s is not None and not 0 < cfg.per_try_timeout_s <= cfg.request_timeout_s:
        raise ConfigError("per_try_timeout_s: must be positive and at most request_timeout_s")
    if not 0 <= cfg.retry_budget_percent <= 100 or cfg.min_retry_concurrency < 0:
        raise ConfigError("retry_budget_percent: must be 0..100, and min_retry_concurrency not negative")
    if not 0 < cfg.backoff_base_s <= cfg.backoff_max_s:
        raise ConfigError("backoff_base_s: must be positive and at most backoff_max_s")
    if cfg.max_outstanding_per_endpoint < 0 or cfg.saturation_waiting < 0:
        raise ConfigError("max_outstanding_per_endpoint and saturation_waiting: must not be negative")
    if cfg.personalization is not None and cfg.multi_tier is None:
        raise ConfigError(f"personalization: {PERSONALIZATION_NEEDS}")
    if cfg.max_body_bytes < 1024:
        raise ConfigError("max_body_bytes: must be at least 1024")
    if cfg.max_inflight_body_bytes < cfg.max_body_bytes:
        raise ConfigError(
            f"max_inflight_body_bytes: {cfg.max_inflight_body_bytes} is less than one body (max_body_bytes "
            f"{cfg.max_body_bytes})"
        )
    if cfg.max_response_bytes < 1024:
        raise ConfigError("max_response_bytes: must be at least 1024")
    if cfg.classifier_cache_entries < 0 or cfg.classifier_cache_bytes < 0:
        raise ConfigError("classifier_cache_entries and classifier_cache_bytes: must not be negative")
    pm = cfg.predicted_mix_bp
    if pm is not None and (len(pm) != len(cfg.tiers) or any(not 0 <= x <= 10000 for x in pm)):
        raise ConfigError("predicted_mix_bp: one share in 0..10000 basis points per tier")
    mt = cfg.multi_tier
    if mt is not None:
        if len(mt.columns) != len(cfg.tiers) or len(set(mt.columns)) != len(mt.columns):
            raise ConfigError("multi_tier.columns: one distinct artifact tier per tier")
        if isinstance(mt.cost_weight_bp, bool) or mt.cost_weight_bp < 0:
            raise ConfigError(f"cost weight: {mt.cost_weight_bp} bp must be a non-negative integer")
        if len(mt.prices) <= max(mt.columns) or any(not 0 <= mt.prices[c] < float("inf") for c in mt.columns):
            raise ConfigError("multi_tier.prices: a finite non-negative price per artifact tier")
    if cfg.best_of_n is not None:
        _validate_best_of_n(cfg.best_of_n, names)
    if cfg.shadow is not None:
        _validate_shadow(cfg.shadow, names)
    if cfg.canary is not None:
        c = cfg.canary
        if isinstance(c.share_bp, bool) or not 0 <= c.share_bp <= 10000:
            raise ConfigError(f"canary.share_bp: {c.share_bp} is outside 0..10000")
        if c.multi_tier is None and c.candidates is None and len(c.thresholds_bp) != len(cfg.tiers) - 1:
            raise ConfigError("canary.thresholds_bp: one threshold between each two tiers")
    cr = cfg.candidates
    if cr is not None:
        if len(cr.tier_of) != len(cr.candidates):
            raise ConfigError("candidates.tier_of: one entry per candidate")
        if isinstance(cr.cost_weight_bp, bool) or cr.cost_weight_bp < 0:
            raise ConfigError(f"cost weight: {cr.cost_weight_bp} bp must be a non-negative integer")
        if not any(allowed_candidates(cfg)):
            raise ConfigError(
                "candidates: no candidate of the artifact can be served: none is one sample of a served tier's "
                "model, nor best-of-n on the best-of-N tier within its maxSamples"
            )


def allowed_candidates(cfg: RouterConfig) -> tuple[bool, ...]:
    """Which candidates of `cfg.candidates` the router may choose: a served tier's model, with n = 1, or n up to
    maxSamples on the best-of-N tier (so the chosen n never exceeds N)."""
    cr = cfg.candidates
    if cr is None:
        return ()
    b = cfg.best_of_n
    out = []
    for c, ti in zip(cr.candidates, cr.tier_of, strict=True):
        if ti is None:
            out.append(False)
        elif c.n == 1:
            out.append(True)
        else:
            out.append(b is not None and cfg.tiers[ti].name == b.tier and c.n <= b.max_samples)
    return tuple(out)


def _validate_shadow(sh: ShadowConfig, names: list[str]) -> None:
    if sh.mode not in SHADOW_MODES:
        raise ConfigError(f"shadow.mode: {sh.mode!r} is not one of {', '.join(SHADOW_MODES)}")
    if sh.baseline_tier not in names:
        raise ConfigError(f"shadow.baseline_tier: unknown tier {sh.baseline_tier!r} (tiers: {', '.join(names)})")
    if isinstance(sh.sample_rate_bp, bool) or not 0 <= sh.sample_rate_bp <= 10000:
        raise ConfigError(f"shadow.sample_rate_bp: {sh.sample_rate_bp} is outside 0..10000")
    if sh.max_concurrent < 1:
        raise ConfigError("shadow.max_concurrent: must be at least 1")
    if (sh.mode == "Mirror" or sh.sample_rate_bp > 0) and sh.reward_url is None:
        raise ConfigError(
            "shadow: judging shadow answers (mode Mirror, or a sample rate above 0) needs a reward model: "
            "spec.shadow.rewardUrl or spec.bestOfN, or --shadow-reward-url"
        )
    if sh.reward_url is not None:
        parsed = urlparse(sh.reward_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"shadow.reward_url: {sh.reward_url!r} is not an http(s) URL")
    if not sh.reward_timeout_s > 0:
        raise ConfigError("shadow.reward_timeout_s: must be positive")


def _validate_best_of_n(b: BestOfNConfig, names: list[str]) -> None:
    for what, tier in (("tier", b.tier), ("reference_tier", b.reference_tier)):
        if tier not in names:
            raise ConfigError(f"best_of_n.{what}: unknown tier {tier!r} (tiers: {', '.join(names)})")
    if isinstance(b.max_samples, bool) or not 1 <= b.max_samples <= MAX_SAMPLES:
        raise ConfigError(f"best_of_n.max_samples: {b.max_samples} is outside 1..{MAX_SAMPLES}")
    parsed = urlparse(b.reward_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"best_of_n.reward_url: {b.reward_url!r} is not an http(s) URL")
    if not b.timeout_s > 0:
        raise ConfigError("best_of_n.timeout_s: must be positive")
    if b.min_reward is not None and not math.isfinite(b.min_reward):
        raise ConfigError("best_of_n.min_reward: must be a finite number")


def tier_at(
    name: str,
    endpoint: str | ServiceRef,
    *,
    served_model: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    price_per_mtok: tuple[float, float] | None = None,
    modalities: frozenset[str] = TEXT_ONLY,
    hold_when_empty_s: float | None = None,
    scales_to_zero: bool = False,
) -> TierConfig:
    """A tier reached at one static base URL or through a Service's pods: what the policy and `--tier` make.
    `price_per_mtok` (input, output) None: not priced (a `--tier` flag). (`TierConfig` itself also takes several
    URLs, or URLs and a Service, for callers that assemble tiers by hand.)"""
    urls, service = ((endpoint,), None) if isinstance(endpoint, str) else ((), endpoint)
    priced = price_per_mtok is not None
    price_per_mtok = price_per_mtok or (0.0, 0.0)
    return TierConfig(
        name=name,
        base_urls=urls,
        service=service,
        served_model=served_model,
        model=model,
        api_key=api_key,
        input_price_per_mtok=price_per_mtok[0],
        output_price_per_mtok=price_per_mtok[1],
        priced=priced,
        modalities=modalities,
        hold_when_empty_s=hold_when_empty_s,
        scales_to_zero=scales_to_zero,
    )


def check_base_url(url: str, where: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"{where}: {url!r} is not an http(s) URL")
    if not parsed.path.rstrip("/").endswith("/v1"):
        raise ConfigError(f"{where}: {url!r} must be an OpenAI-compatible base URL ending in /v1")
