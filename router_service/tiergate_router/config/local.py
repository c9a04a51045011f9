"""What `tiergate serve`'s flags change: `--tier NAME=BASE_URL` tiers (alone, or on top of a policy's),
`--threshold-bp` / `--cost-weight-bp`, best-of-N (`--best-of-n TIER=N --reward-url URL` and its details), the
dispatch limits (`DISPATCH_FLAGS`: deadline, per-try timeout, retries,
retry budget, backoff, breaker, saturation) and where to listen (`--host`, `--port`, `--grpc-port`).

Argument parsing itself stays in `tiergate_router.cmd_serve`; this module gives the flags their meaning, as pure
functions over typed values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tiergate_router.config.knobs import (
    DEFAULT_THRESHOLD_BP,
    MultiTierSource,
    candidate_routing_for,
    multi_tier_for,
    two_tier_thresholds,
)
from tiergate_router.config.personalization import PersonalizationFlags, apply_personalization
from tiergate_router.config.shadow import ShadowFlags, apply_shadow
from tiergate_router.config.types import (
    MAX_SAMPLES,
    BestOfNConfig,
    RouterConfig,
    TierConfig,
    check_base_url,
    tier_at,
)
from tiergate_router.errors import ConfigError
from tiergate_router.modality import parse_modalities

if TYPE_CHECKING:
    from tiergate.api.policy import RoutingPolicy

TierFlag = tuple[str, str]
# `--tier-modalities NAME=text,image`: (tier name, its modalities).
ModalitiesFlag = tuple[str, frozenset[str]]
# A dispatch limit set on the command line: (RouterConfig field, value in the field's unit).
DispatchSetting = tuple[str, float | int]


@dataclass(frozen=True)
class DispatchFlag:
    """A `tiergate serve` flag for one dispatch limit. Integers in the policy's units (seconds, milliseconds,
    percent), like the policy field named in `policy_field`; `scale` turns them into the config's unit (None: kept an
    integer)."""

    flag: str
    field: str
    policy_field: str
    minimum: int
    scale: float | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


# Each overrides the policy field it names (spec.router.<policy_field>) or the built-in default.
DISPATCH_FLAGS = (
    DispatchFlag("--request-timeout-seconds", "request_timeout_s", "timeouts.requestSeconds", 1, 1.0),
    DispatchFlag("--per-try-timeout-seconds", "per_try_timeout_s", "timeouts.perTrySeconds", 1, 1.0),
    DispatchFlag("--connect-timeout-seconds", "connect_timeout_s", "timeouts.connectSeconds", 1, 1.0),
    DispatchFlag("--attempts-per-tier", "max_attempts_per_tier", "retries.attemptsPerTier", 1),
    DispatchFlag("--retry-budget-percent", "retry_budget_percent", "retries.budgetPercent", 0),
    DispatchFlag("--min-retry-concurrency", "min_retry_concurrency", "retries.minRetryConcurrency", 0),
    DispatchFlag("--backoff-base-milliseconds", "backoff_base_s", "retries.backoffBaseMilliseconds", 1, 0.001),
    DispatchFlag("--backoff-max-milliseconds", "backoff_max_s", "retries.backoffMaxMilliseconds", 1, 0.001),
    DispatchFlag("--breaker-failures", "breaker_failures", "circuitBreaker.consecutiveFailures", 1),
    DispatchFlag("--breaker-open-seconds", "breaker_open_s", "circuitBreaker.openSeconds", 1, 1.0),
    DispatchFlag(
        "--max-in-flight-per-endpoint", "max_outstanding_per_endpoint", "saturation.maxInFlightPerEndpoint", 0
    ),
    DispatchFlag("--saturation-queued-requests", "saturation_waiting", "saturation.queuedRequests", 0),
)


def dispatch_settings(given: Mapping[str, int | None]) -> tuple[DispatchSetting, ...]:
    """The dispatch flags given (`given`: argparse dest -> value, None when absent), in the config's units.
    ConfigError names a flag below its minimum; cross-field rules (per-try <= request, base <= max) are the config's
    own (`types.validate`)."""
    out: list[DispatchSetting] = []
    for f in DISPATCH_FLAGS:
        value = given.get(f.dest)
        if value is None:
            continue
        if value < f.minimum:
            raise ConfigError(f"{f.flag}: {value} is below the minimum {f.minimum}")
        out.append((f.field, value if f.scale is None else value * f.scale))
    return tuple(out)


@dataclass(frozen=True)
class BestOfNFlags:
    """`tiergate serve --best-of-n TIER=N --reward-url URL [--reward-model M] [--reward-timeout-ms MS]
    [--min-reward R] [--reference-tier T]`: best-of-N without a policy, or over the policy's spec.bestOfN (each flag
    replaces its field). None means "not given"."""

    # (tier, N) from `--best-of-n TIER=N`.
    tier_n: tuple[str, int] | None = None
    reward_url: str | None = None
    reward_model: str | None = None
    timeout_ms: int | None = None
    min_reward: float | None = None
    reference_tier: str | None = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))


def parse_best_of_n_flag(value: str) -> tuple[str, int]:
    """`TIER=N` from `tiergate serve --best-of-n` -> (tier, N), N in 1..16."""
    tier, sep, n = value.partition("=")
    if not sep or not tier or not n.isascii() or not n.isdigit() or not 1 <= int(n) <= MAX_SAMPLES:
        raise ConfigError(f"--best-of-n {value!r}: expected TIER=N with N in 1..{MAX_SAMPLES}, e.g. small=4")
    return tier, int(n)


def parse_reward_url(value: str) -> str:
    """`--reward-url`: the reward server's root (`http://host:port`; the router posts to `{url}/pooling`)."""
    url = value.rstrip("/")
    if url.endswith("/v1") or url.endswith("/pooling"):
        raise ConfigError(f"--reward-url {value!r}: give the server's root, e.g. http://127.0.0.1:8090")
    return url


def parse_min_reward(value: str) -> float:
    """`--min-reward`: a decimal, possibly negative (reward scales differ per model)."""
    try:
        out = float(value)
    except ValueError as e:
        raise ConfigError(f"--min-reward {value!r}: not a number") from e
    if not math.isfinite(out):
        raise ConfigError(f"--min-reward {value!r}: must be finite")
    return out


def apply_best_of_n(cfg: RouterConfig, flags: BestOfNFlags) -> RouterConfig:
    """`cfg` with the best-of-N flags applied over its `best_of_n` (the policy's spec.bestOfN), or best-of-N turned
    on by `--best-of-n TIER=N --reward-url URL` (the reference tier defaults to the strongest, the last, tier)."""
    if not flags.given:
        return cfg
    base = cfg.best_of_n
    if base is None:
        if flags.tier_n is None or flags.reward_url is None:
            raise ConfigError(
                "best-of-N flags: without spec.bestOfN in a policy, give both --best-of-n TIER=N and --reward-url URL"
            )
        base = BestOfNConfig(
            tier=flags.tier_n[0],
            max_samples=flags.tier_n[1],
            reward_url=flags.reward_url,
            reward_model=None,
            reference_tier=cfg.tiers[-1].name,
        )
    changes: dict[str, Any] = {}
    if flags.tier_n is not None:
        changes["tier"], changes["max_samples"] = flags.tier_n
    if flags.timeout_ms is not None:
        if flags.timeout_ms < 1:
            raise ConfigError(f"--reward-timeout-ms: {flags.timeout_ms} must be at least 1")
        changes["timeout_s"] = flags.timeout_ms / 1000
    for name in ("reward_url", "reward_model", "min_reward", "reference_tier"):
        value = getattr(flags, name)
        if value is not None:
            changes[name] = value
    try:
        return dataclasses.replace(cfg, best_of_n=dataclasses.replace(base, **changes))
    except ConfigError as e:
        raise ConfigError(f"command line: {e}") from e


DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8080
DEFAULT_GRPC_PORT = 50051


@dataclass(frozen=True)
class LocalOverrides:
    """The `tiergate serve` flags that change the configuration or the listeners; None means "not given"."""

    # `--tier NAME=BASE_URL`, checked (parse_tier_flags), cheapest first.
    tiers: tuple[TierFlag, ...] = ()
    # `--tier-modalities NAME=text,image`, checked (parse_tier_modalities_flags).
    tier_modalities: tuple[ModalitiesFlag, ...] = ()
    threshold_bp: int | None = None
    cost_weight_bp: int | None = None
    host: str | None = None
    port: int | None = None
    # A negative port disables gRPC.
    grpc_port: int | None = None
    # Timeouts, retries, breaker and saturation limits (`DISPATCH_FLAGS`), replacing the policy's or the defaults.
    dispatch: tuple[DispatchSetting, ...] = ()
    # `--classifier-cache-entries` / `--classifier-cache-bytes`: over the policy's spec.router.classifierCache.
    cache_entries: int | None = None
    cache_bytes: int | None = None
    # `--max-inflight-body-bytes` / `--max-response-bytes`: over the policy's spec.router.bodyLimits.
    inflight_body_bytes: int | None = None
    response_bytes: int | None = None
    # `--best-of-n TIER=N --reward-url URL` and the other best-of-N flags.
    best_of_n: BestOfNFlags = BestOfNFlags()
    # `--shadow MODE=TIER` and the other shadow flags, `--canary-artifact PATH --canary-share-bp N`.
    shadow: ShadowFlags = dataclasses.field(default_factory=ShadowFlags)
    # `--decision-log FILE` ("-": stdout), over the policy's spec.router.decisionLog; `--decision-log-prompts`
    # writes prompts' text (False: as the policy says).
    decision_log: str | None = None
    decision_log_prompts: bool = False
    # `--personalization` and its settings, over the policy's spec.router.personalization.
    personalization: PersonalizationFlags = dataclasses.field(default_factory=PersonalizationFlags)


@dataclass(frozen=True)
class Listen:
    host: str
    port: int
    # None: no gRPC listener.
    grpc_port: int | None


def parse_tier_flag(value: str) -> TierFlag:
    """`NAME=BASE_URL` from `tiergate serve --tier` -> (name, url)."""
    name, sep, url = value.partition("=")
    if not sep or not name or not url:
        raise ConfigError(f"--tier {value!r}: expected NAME=BASE_URL, e.g. small=http://127.0.0.1:8001/v1")
    check_base_url(url, f"--tier {name}")
    return name, url.rstrip("/")


def parse_tier_flags(values: Sequence[str]) -> tuple[TierFlag, ...]:
    """All `--tier` flags, checked (ConfigError names the bad one, or a name given twice)."""
    flags = tuple(parse_tier_flag(v) for v in values)
    names = [n for n, _ in flags]
    if len(set(names)) != len(names):
        raise ConfigError(f"--tier: a tier name is given twice ({', '.join(names)})")
    return flags


def parse_tier_modalities_flags(values: Sequence[str]) -> tuple[ModalitiesFlag, ...]:
    """All `--tier-modalities NAME=text,image` flags, checked (ConfigError names the bad one, or a tier given
    twice)."""
    out: list[ModalitiesFlag] = []
    for value in values:
        name, sep, mods = value.partition("=")
        if not sep or not name or not mods:
            raise ConfigError(f"--tier-modalities {value!r}: expected NAME=MODALITIES, e.g. vision=text,image")
        out.append((name, parse_modalities(mods, f"--tier-modalities {name}")))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"--tier-modalities: a tier name is given twice ({', '.join(names)})")
    return tuple(out)


def apply_tier_modalities(cfg: RouterConfig, flags: Sequence[ModalitiesFlag]) -> RouterConfig:
    """`cfg` with each flag's modalities replacing its tier's (ConfigError names a flag for a tier not served)."""
    if not flags:
        return cfg
    given = dict(flags)
    unknown = [n for n in given if n not in cfg.tier_names]
    if unknown:
        raise ConfigError(f"--tier-modalities {unknown[0]}: no such tier (tiers: {', '.join(cfg.tier_names)})")
    tiers = tuple(dataclasses.replace(t, modalities=given.get(t.name, t.modalities)) for t in cfg.tiers)
    return dataclasses.replace(cfg, tiers=tiers)


def served_tier_names(policy: RoutingPolicy | None, flags: Sequence[TierFlag]) -> tuple[str, ...]:
    """The tiers a serve with this policy and these flags routes among (cheapest first, flag-only tiers last)."""
    names = [t.name for t in policy.spec.tiers] if policy is not None else []
    return tuple(dict.fromkeys([*names, *(n for n, _ in flags)]))


def merge_tier_flags(tiers: Sequence[TierConfig], flags: Sequence[TierFlag]) -> tuple[TierConfig, ...]:
    """`tiers` with each flag's URL replacing the endpoint of the tier of that name, or appended as a new tier."""
    merged = list(tiers)
    for name, url in flags:
        idx = next((i for i, t in enumerate(merged) if t.name == name), None)
        if idx is None:
            merged.append(tier_at(name, url))
        else:
            # The policy's API key belongs to the policy's endpoint: never send it to a URL from the command line.
            merged[idx] = dataclasses.replace(merged[idx], base_urls=(url,), service=None, api_key=None)
    return tuple(merged)


def local_config(
    flags: Sequence[TierFlag],
    *,
    threshold_bp: int = DEFAULT_THRESHOLD_BP,
    multi: MultiTierSource | None = None,
    cost_weight_bp: int | None = None,
    candidates: MultiTierSource | None = None,
) -> RouterConfig:
    """RouterConfig for `tiergate serve --tier NAME=URL ...` without a policy (cheapest first). A two-tier artifact
    serves at most two tiers (`knobs.two_tier_thresholds`); with an N-tier artifact (`multi`) the tiers map to its
    tiers, priced at its prices (a flag carries none), at `cost_weight_bp` or else its calibrated default; with a
    `candidates` artifact (`candidates`) the tiers serve its candidates' models, at the same weight."""
    tiers = merge_tier_flags((), flags)
    if multi is not None:
        mt = multi_tier_for(tiers, multi, cost_weight_bp)
        return RouterConfig(tiers=tiers, thresholds_bp=(threshold_bp,) * (len(tiers) - 1), multi_tier=mt)
    return RouterConfig(
        tiers=tiers,
        thresholds_bp=(threshold_bp,) * (len(tiers) - 1)
        if candidates is not None  # unused: a candidates artifact chooses by weight
        else two_tier_thresholds([t.name for t in tiers], threshold_bp, where="--tier"),
        candidates=candidate_routing_for(tiers, candidates, cost_weight_bp) if candidates is not None else None,
    )


def apply_overrides(cfg: RouterConfig, overrides: LocalOverrides) -> RouterConfig:
    """`--threshold-bp`, the dispatch flags, the classifier cache's bounds, the body budget and the best-of-N flags
    (`apply_best_of_n`) on a built config. (`--cost-weight-bp` is not here: the weight decides which prices the
    N-tier choice uses, so the config is built with it, `serve.serve_config`.)"""
    if overrides.dispatch:
        try:
            # Field names come from DISPATCH_FLAGS (a unit test sets every one), values in each field's type.
            changes: dict[str, Any] = dict(overrides.dispatch)
            cfg = dataclasses.replace(cfg, **changes)
        except ConfigError as e:
            raise ConfigError(f"command line: {e}") from e
    if overrides.threshold_bp is not None:
        cfg = dataclasses.replace(cfg, thresholds_bp=(overrides.threshold_bp,) * (len(cfg.tiers) - 1))
    if overrides.cache_entries is not None:
        cfg = dataclasses.replace(cfg, classifier_cache_entries=overrides.cache_entries)
    if overrides.cache_bytes is not None:
        cfg = dataclasses.replace(cfg, classifier_cache_bytes=overrides.cache_bytes)
    if overrides.inflight_body_bytes is not None:
        cfg = dataclasses.replace(cfg, max_inflight_body_bytes=overrides.inflight_body_bytes)
    if overrides.response_bytes is not None:
        cfg = dataclasses.replace(cfg, max_response_bytes=overrides.response_bytes)
    if overrides.decision_log is not None:
        cfg = dataclasses.replace(cfg, decision_log=overrides.decision_log)
    if overrides.decision_log_prompts:
        if cfg.decision_log is None:
            raise ConfigError("--decision-log-prompts: there is no decision log (give --decision-log FILE)")
        cfg = dataclasses.replace(cfg, decision_log_prompts=True)
    cfg = apply_best_of_n(cfg, overrides.best_of_n)
    cfg = apply_shadow(cfg, overrides.shadow)
    cfg = apply_personalization(cfg, overrides.personalization)
    return apply_tier_modalities(cfg, overrides.tier_modalities)


def listen(policy: RoutingPolicy | None, overrides: LocalOverrides) -> Listen:
    """Where to listen: the flags, else the policy's `httpPort` / `grpcPort`, else 8080 / 50051, on 127.0.0.1."""
    router = policy.spec.router if policy is not None else None
    port = overrides.port
    if port is None:
        port = router.http_port if router is not None else DEFAULT_HTTP_PORT
    grpc = overrides.grpc_port
    if grpc is None:
        grpc = router.grpc_port if router is not None else DEFAULT_GRPC_PORT
    return Listen(host=overrides.host or DEFAULT_HOST, port=port, grpc_port=None if grpc < 0 else grpc)
