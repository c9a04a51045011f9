"""The router's one typed configuration object, and its conversion from a RoutingPolicy.

The router never works on the policy model directly: `from_policy` narrows a RoutingPolicy (the same schema as the
CRD spec, read from the file the operator mounts) to what the data plane needs, and the command line builds the
same object for local mode. Everything else in the router takes a `RouterConfig`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from tiergate_router.errors import ConfigError


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
    # Dollars per million tokens, used only for the estimated-cost metric.
    input_price_per_mtok: float = 0.0
    output_price_per_mtok: float = 0.0


@dataclass(frozen=True)
class MultiTier:
    """N-tier routing with a `multi_tier` artifact: the router picks argmax(quality - lambda * price) over the
    artifact tiers this config serves (tiergate.routing.operating_points.choose_tiers, lambda = bp / 10000)."""

    # The artifact (tiergate.routing.artifact.RouterArtifact): its tier prices are what the cost weight was
    # calibrated against, so the choice uses them, not the policy's prices (those feed the cost metric only).
    artifact: Any = field(compare=False, repr=False)
    # Per config tier (cheapest first), the index of the artifact tier it serves.
    columns: tuple[int, ...]
    cost_weight_bp: int


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
    # Seconds for a whole non-streaming upstream response, or for the first byte of a streaming one.
    request_timeout_s: float = 120.0
    # Seconds without data on an established stream before it is abandoned.
    stream_idle_timeout_s: float = 60.0
    # Endpoints tried per tier before falling back (connection failures and 5xx are retried; 4xx are not).
    max_attempts_per_tier: int = 3
    # Consecutive failures that open an endpoint's breaker, and how long it stays open before one probe.
    breaker_failures: int = 3
    breaker_open_s: float = 5.0
    # A tier counts as saturated when every endpoint has this many requests in flight through this router
    # (0 = no limit) or reports at least `saturation_waiting` queued requests (vLLM's num_requests_waiting).
    max_outstanding_per_endpoint: int = 0
    saturation_waiting: int = 0
    # Largest request body accepted; a 10 MB prompt is far beyond any served context and is refused with 413.
    max_body_bytes: int = 4 * 1024 * 1024
    # The model name clients use for routed requests; tier names also work as model names (forcing that tier).
    routed_model_name: str = "tiergate"
    # Set when the classifier artifact is an N-tier one: the tiers are chosen by cost weight, not thresholds.
    multi_tier: MultiTier | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

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

    def replace(self, **changes: Any) -> RouterConfig:
        return dataclasses.replace(self, **changes)


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
    if cfg.max_body_bytes < 1024:
        raise ConfigError("max_body_bytes: must be at least 1024")
    mt = cfg.multi_tier
    if mt is not None:
        if len(mt.columns) != len(cfg.tiers) or len(set(mt.columns)) != len(mt.columns):
            raise ConfigError("multi_tier.columns: one distinct artifact tier per tier")
        if isinstance(mt.cost_weight_bp, bool) or mt.cost_weight_bp < 0:
            raise ConfigError(f"cost weight: {mt.cost_weight_bp} bp must be a non-negative integer")


class MultiTierSource(Protocol):
    """What a loaded N-tier artifact tells the config (tiergate_router.artifact_classifier.LoadedClassifier)."""

    @property
    def source(self) -> Path: ...

    @property
    def artifact(self) -> Any: ...

    @property
    def tier_names(self) -> tuple[str, ...]: ...

    @property
    def default_cost_weight_bp(self) -> int: ...

    def cost_weight_for_budget_bp(self, budget: float) -> int: ...


def with_multi_tier(cfg: RouterConfig, source: MultiTierSource, cost_weight_bp: int | None = None) -> RouterConfig:
    """`cfg` routing by an N-tier artifact. Each tier maps to the artifact tier named like its name, else like
    its served model name, else like its model (tier names are DNS labels of at most 20 characters, artifact tiers
    are model names such as `llama-3.1-8b-instruct`). The tiers may be any subset of the artifact's; the choice is
    made among those served. ConfigError names a tier the artifact does not know, or two tiers on one."""
    known = source.tier_names
    columns: list[int] = []
    for i, t in enumerate(cfg.tiers):
        keys = [k for k in (t.name, t.served_model, t.model) if k]
        col = next((known.index(k) for k in keys if k in known), None)
        if col is None:
            raise ConfigError(
                f"tiers[{i}] ({t.name}): matches no tier of the N-tier artifact {source.source} by name, "
                f"servedModelName or model ({', '.join(map(repr, dict.fromkeys(keys)))}); its tiers: "
                f"{', '.join(known)}"
            )
        if col in columns:
            other = cfg.tiers[columns.index(col)].name
            raise ConfigError(f"tiers[{i}] ({t.name}): maps to artifact tier {known[col]!r}, as {other!r} does")
        columns.append(col)
    bp = source.default_cost_weight_bp if cost_weight_bp is None else cost_weight_bp
    return cfg.replace(multi_tier=MultiTier(source.artifact, tuple(columns), bp))


def check_base_url(url: str, where: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"{where}: {url!r} is not an http(s) URL")
    if not parsed.path.rstrip("/").endswith("/v1"):
        raise ConfigError(f"{where}: {url!r} must be an OpenAI-compatible base URL ending in /v1")


def parse_tier_flag(value: str) -> tuple[str, str]:
    """`NAME=BASE_URL` from `tiergate serve --tier` -> (name, url)."""
    name, sep, url = value.partition("=")
    if not sep or not name or not url:
        raise ConfigError(f"--tier {value!r}: expected NAME=BASE_URL, e.g. small=http://127.0.0.1:8001/v1")
    check_base_url(url, f"--tier {name}")
    return name, url.rstrip("/")


def local_config(
    tiers: Sequence[tuple[str, str]], *, base: RouterConfig | None = None, threshold_bp: int = 5000
) -> RouterConfig:
    """RouterConfig for `tiergate serve --tier NAME=URL ...` (cheapest first); `base` supplies everything else.

    With more than two tiers and no policy, thresholds split the score range evenly (a placeholder knob until a
    policy sets them; the shipped router is a two-tier router, so its score is the strong-tier probability).
    """
    if base is not None:
        merged = list(base.tiers)
        for name, url in tiers:
            idx = next((i for i, t in enumerate(merged) if t.name == name), None)
            if idx is None:
                merged.append(TierConfig(name=name, base_urls=(url,)))
            else:
                # The policy's API key belongs to the policy's endpoint: never send it to a URL from the command line.
                merged[idx] = dataclasses.replace(merged[idx], base_urls=(url,), service=None, api_key=None)
        n = len(merged)
        ths = base.thresholds_bp if len(base.thresholds_bp) == n - 1 else _even_thresholds(n, threshold_bp)
        # An N-tier mapping is per tier: the caller maps the merged tiers again (with_multi_tier).
        return base.replace(tiers=tuple(merged), thresholds_bp=ths, multi_tier=None)
    n = len(tiers)
    return RouterConfig(
        tiers=tuple(TierConfig(name=name, base_urls=(url,)) for name, url in tiers),
        thresholds_bp=_even_thresholds(n, threshold_bp),
    )


def _even_thresholds(n: int, two_tier_bp: int) -> tuple[int, ...]:
    if n <= 1:
        return ()
    if n == 2:
        return (two_tier_bp,)
    return tuple(round(10000 * i / n) for i in range(1, n))


# The knobs (API names) that act on a two-tier artifact's score; the others choose among N tiers.
TWO_TIER_KNOBS = ("thresholdBasisPoints", "targetStrongShareBasisPoints")


class ThresholdSource(Protocol):
    """What a loaded classifier artifact knows about thresholds (its calibration)."""

    @property
    def default_threshold_bp(self) -> int: ...

    def threshold_for_share_bp(self, share_bp: int) -> int: ...


def policy_classifier_path(policy: Any) -> Path | None:
    """The artifact path inside the router container that the policy names (None: the shipped default)."""
    from tiergate.api import naming

    ref = policy.spec.router.classifier
    if ref is None:
        return None
    if ref.path is not None:
        return Path(ref.path)
    return Path(naming.classifier_path(ref.config_map.key))


def from_policy(
    policy: Any,
    *,
    namespace: str | None = None,
    discovery: bool = False,
    thresholds: ThresholdSource | None = None,
    base: RouterConfig | None = None,
    multi: MultiTierSource | None = None,
    environ: Mapping[str, str] | None = None,
) -> RouterConfig:
    """Narrow a typed RoutingPolicy (`tiergate.api.policy.RoutingPolicy`) to a RouterConfig.

    Tiers with `endpoint` use that URL. Tiers the operator deploys are reached through their Service: with
    `discovery`, the pods behind it (EndpointSlices, for per-pod balancing); without, the Service's DNS name.
    The decision knob: `thresholdBasisPoints` as given; `targetStrongShareBasisPoints` or nothing needs the
    artifact's calibration (`thresholds`). With a two-tier artifact and more than two tiers the score separates the
    cheapest tier from the strongest, and the tiers between serve as fallbacks. With an N-tier artifact (`multi`)
    the tiers map to the artifact's (`with_multi_tier`) and the cost weight chooses: `costWeightBasisPoints` as
    given, `budgetPerMillion` through the artifact's calibration, else its calibrated default. A knob of the other
    artifact kind means nothing there and is refused, naming it. An external tier's `apiKeySecretRef` is read from the
    environment variable the operator fills from that Secret (`naming.api_key_env`; `environ`, default os.environ).
    """
    from tiergate.api import naming

    spec = policy.spec
    ns = policy.metadata.namespace or namespace or "default"
    tiers: list[TierConfig] = []
    for i, t in enumerate(spec.tiers):
        # Decimal in the policy (exact money); float here, where it only feeds an estimated-cost counter.
        pin, pout = float(t.price.input_per_million), float(t.price.output_per_million)
        if t.endpoint is not None:
            url = t.endpoint.url.rstrip("/")
            check_base_url(url, f"spec.tiers[{i}].endpoint.url")
            tiers.append(
                TierConfig(
                    name=t.name,
                    base_urls=(url,),
                    served_model=t.model_name,
                    model=t.model,
                    input_price_per_mtok=pin,
                    output_price_per_mtok=pout,
                    api_key=_api_key(t, i, environ),
                )
            )
        elif discovery:
            ref = ServiceRef(namespace=ns, name=naming.tier_name(policy.metadata.name, t.name), port=t.engine.port)
            tiers.append(
                TierConfig(
                    name=t.name,
                    service=ref,
                    served_model=t.model_name,
                    model=t.model,
                    input_price_per_mtok=pin,
                    output_price_per_mtok=pout,
                )
            )
        else:
            url = naming.tier_service_url(policy.metadata.name, ns, t.name, t.engine.port)
            tiers.append(
                TierConfig(
                    name=t.name,
                    base_urls=(url,),
                    served_model=t.model_name,
                    model=t.model,
                    input_price_per_mtok=pin,
                    output_price_per_mtok=pout,
                )
            )
    r = spec.router
    knob = next(iter(r.decision_knobs()), None)  # the policy model allows at most one
    cost_weight: int | None = None
    if multi is not None:
        if knob in TWO_TIER_KNOBS:
            raise ConfigError(
                f"policy {policy.metadata.name}: spec.router.{knob} is a two-tier knob, but {multi.source} is an "
                "N-tier artifact, which chooses by cost weight: set costWeightBasisPoints or budgetPerMillion "
                "instead, or neither for the artifact's calibrated default"
            )
        th = 5000  # unused: thresholds only apply to two-tier artifacts
        if r.cost_weight_basis_points is not None:
            cost_weight = int(r.cost_weight_basis_points)
        elif r.budget_per_million is not None:
            # Decimal in the policy; the calibration table holds float prices, and one budget comparison is all.
            cost_weight = multi.cost_weight_for_budget_bp(float(r.budget_per_million))
    elif knob is not None and knob not in TWO_TIER_KNOBS:
        where = "the shipped default router" if policy_classifier_path(policy) is None else "its classifier artifact"
        raise ConfigError(
            f"policy {policy.metadata.name}: spec.router.{knob} is an N-tier knob, but {where} is a two-tier one, "
            "which routes by a score threshold: set thresholdBasisPoints or targetStrongShareBasisPoints instead"
        )
    elif r.threshold_basis_points is not None:
        th = int(r.threshold_basis_points)
    elif thresholds is None:
        raise ConfigError(
            "spec.router: sets no thresholdBasisPoints, so the classifier artifact's calibration is "
            "needed to choose one"
        )
    elif r.target_strong_share_basis_points is not None:
        th = thresholds.threshold_for_share_bp(int(r.target_strong_share_basis_points))
    else:
        th = thresholds.default_threshold_bp
    n = len(tiers)
    fields: dict[str, Any] = dict(
        tiers=tuple(tiers),
        thresholds_bp=(th,) * (n - 1),
        fallback_order=tuple(spec.effective_fallback_order()),
        classifier_artifact=policy_classifier_path(policy),
        connect_timeout_s=float(r.timeouts.connect_seconds),
        request_timeout_s=float(r.timeouts.request_seconds),
    )
    try:
        cfg = base.replace(**fields) if base is not None else RouterConfig(**fields)
        return with_multi_tier(cfg, multi, cost_weight) if multi is not None else cfg
    except ConfigError as e:
        raise ConfigError(f"policy {policy.metadata.name}: {e}") from e


def unserved_sections(policy: Any) -> list[str]:
    """Parts of the policy this router version accepts but does not act on yet (logged, so nobody assumes they work):
    best-of-N sampling with reward reranking, and shadow traffic to a baseline tier. The operator still deploys the
    reward model they name."""
    spec = policy.spec
    out = []
    if spec.best_of_n is not None:
        out.append("spec.bestOfN (best-of-N with reward reranking)")
    if spec.shadow is not None:
        out.append("spec.shadow (shadow requests to a baseline tier)")
    return out


def _api_key(tier: Any, i: int, environ: Mapping[str, str] | None) -> str | None:
    from tiergate.api import naming

    ref = tier.endpoint.api_key_secret_ref
    if ref is None:
        return None
    var = naming.api_key_env(tier.name)
    key = (os.environ if environ is None else environ).get(var, "").strip()
    if not key:
        raise ConfigError(
            f"spec.tiers[{i}].endpoint.apiKeySecretRef: the key (Secret {ref.name}, key {ref.key}) is not in the "
            f"environment variable {var}; the operator sets it in the router pod, set it yourself elsewhere"
        )
    return key


def read_policy(path: Path) -> Any:
    """The typed RoutingPolicy in `path` (a manifest, as the operator mounts it); ConfigError naming the field."""
    from tiergate.api.errors import PolicyError
    from tiergate.api.policy import load_policy

    try:
        return load_policy(Path(path))
    except PolicyError as e:
        raise ConfigError(f"{path}: {e}") from e


def load_policy_file(path: Path, **kwargs: Any) -> RouterConfig:
    """Read the policy file the operator mounts into a RouterConfig (kwargs as for `from_policy`)."""
    return from_policy(read_policy(path), **kwargs)
