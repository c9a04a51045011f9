"""The typed RoutingPolicy model (tiergate.io/v1alpha1), shared by the operator and the router.

The CRD schema in `crd.yaml` is what the API server enforces; this model is what our code reads. A unit test
walks both and fails when they disagree (field names, types, required fields, bounds, enums, defaults), so a
policy the API server accepts always loads here and the other way round. Cross-field rules (unique tier names,
tier references, min <= max, ...) live in both places too: CEL in the CRD, validators here, because the router
also loads policies from files that never went through an API server.

Python attributes are snake_case; the manifest spelling (camelCase) is the alias, and `to_manifest()` writes it.
No floats anywhere: prices are integers or quoted decimal strings, shares and thresholds are basis points,
durations are integer seconds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from .errors import FieldError, PolicyParseError, PolicyValidationError

GROUP = "tiergate.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RoutingPolicy"
PLURAL = "routingpolicies"

# Child objects are named `<policy>-tier-<tier>`, `<policy>-router`, `<policy>-reward`; Service names are
# DNS-1035 labels of at most 63 characters, so 36 + len("-tier-") + 20 = 62 always fits.
MAX_POLICY_NAME = 36
MAX_TIER_NAME = 20
MAX_TIERS = 16
MAX_BEST_OF_N = 16
BASIS_POINTS = 10_000

DEFAULT_ENGINE_IMAGE = "vllm/vllm-openai:v0.11.0"
DEFAULT_ENGINE_PORT = 8000
DEFAULT_ROUTER_IMAGE = "ghcr.io/tiergate/router:0.1.0"
DEFAULT_REWARD_IMAGE = "vllm/vllm-openai:v0.11.0"

DNS_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Non-negative decimal with at most 9 fractional digits (nano-dollar precision is plenty for prices).
PRICE_PATTERN = r"^[0-9]+(\.[0-9]{1,9})?$"
# The Kubernetes resource.Quantity grammar (the same pattern controller-gen emits for Quantity fields).
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
URL_PATTERN = r"^https?://[^\s/$.?#][^\s]*$"
# A decimal that may be negative (reward scores: each reward model has its own scale), as a quoted string.
SIGNED_DECIMAL_PATTERN = r"^-?[0-9]+(\.[0-9]{1,9})?$"

_PRICE_RE = re.compile(PRICE_PATTERN)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


# --- scalar types ---------------------------------------------------------------------------------------------


# 20 integer digits, a point and 9 decimals: far beyond any price, and a bound the CRD's CEL cost estimate needs.
PRICE_MAX_CHARS = 30


def _parse_price(value: object) -> Decimal:
    # bool is an int subclass and float is exactly what the API forbids: reject both by type, before anything else.
    if isinstance(value, (bool, float)):
        raise ValueError(
            f'prices are integers or quoted decimal strings (e.g. "0.15"), not {type(value).__name__} {value!r}'
        )
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"price must not be negative, got {value}")
        return Decimal(value)
    if isinstance(value, Decimal):
        if not value.is_finite() or value < 0:
            raise ValueError(f"price must be a finite non-negative decimal, got {value}")
        return value
    if isinstance(value, str):
        if len(value) > PRICE_MAX_CHARS:
            raise ValueError(f"price {value[:40]!r}... is longer than {PRICE_MAX_CHARS} characters")
        if not _PRICE_RE.fullmatch(value):
            raise ValueError(f'price {value!r} is not a non-negative decimal such as "0.15" (at most 9 decimals)')
        return Decimal(value)
    raise ValueError(f"prices are integers or quoted decimal strings, not {type(value).__name__}")


def _dump_price(value: Decimal) -> str | int:
    return int(value) if value == value.to_integral_value() and "." not in str(value) else str(value)


Price = Annotated[
    Decimal,
    PlainValidator(_parse_price),
    PlainSerializer(_dump_price),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "pattern": PRICE_PATTERN,
            # Bounds the CEL rule's estimated cost: unbounded, the API server prices each evaluation at the largest
            # string a request can hold, and 256 tenants' budgets then exceed the CRD's cost limit.
            "maxLength": PRICE_MAX_CHARS,
            "x-kubernetes-validations": [
                {"rule": "type(self) == string || self >= 0", "message": "price must not be negative"}
            ],
        }
    ),
]
"""Money per million tokens (any currency, consistently). Decimal, so sums and ratios are exact."""


def _parse_quantity(value: object) -> str:
    if isinstance(value, (bool, float)):
        raise ValueError(f'quantities are integers or quoted strings such as "500m" or "16Gi", not {value!r}')
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"quantity must not be negative, got {value}")
        return str(value)
    if isinstance(value, str) and _QUANTITY_RE.fullmatch(value):
        return value
    raise ValueError(f'{value!r} is not a Kubernetes quantity such as "4", "500m" or "16Gi"')


Quantity = Annotated[
    str,
    PlainValidator(_parse_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "pattern": QUANTITY_PATTERN,
        }
    ),
]
"""A Kubernetes resource quantity, kept in its string form (the API server does the arithmetic)."""

DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
TierName = Annotated[str, Field(min_length=1, max_length=MAX_TIER_NAME, pattern=DNS_LABEL_PATTERN)]
BasisPoints = Annotated[int, Field(ge=0, le=BASIS_POINTS, strict=True)]


class _Model(BaseModel):
    """camelCase aliases on the wire, snake_case in Python; unknown fields are errors (the API server prunes them,
    a file loaded directly would otherwise silently ignore a typo)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_enum_values=False,
        # Field docstrings become the CRD's descriptions (what `kubectl explain routingpolicy.spec` prints).
        use_attribute_docstrings=True,
    )


# --- placement --------------------------------------------------------------------------------------------------


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(_Model):
    """core/v1 Toleration, same fields and meaning."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                    "message": "a toleration with operator Exists must not set value",
                }
            ]
        }
    )

    key: Annotated[str, Field(max_length=316)] | None = None
    operator: TolerationOperator = TolerationOperator.EQUAL
    value: Annotated[str, Field(max_length=63)] | None = None
    effect: TaintEffect | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> Toleration:
        if self.operator is TolerationOperator.EXISTS and self.value:
            raise ValueError("a toleration with operator Exists must not set value")
        return self


class Placement(_Model):
    """Where pods go. `pool` is shorthand for the nodeSelector `tiergate.io/pool: <pool>`; an explicit nodeSelector
    entry for the same key wins. Pods that ask for GPUs also tolerate the conventional `nvidia.com/gpu` taint."""

    pool: DnsLabel | None = None
    """Node pool: shorthand for the nodeSelector `tiergate.io/pool: <pool>` (e.g. gpu-small, gpu-large, reward, cpu)."""
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict)
    """Extra node labels the pods require; merged over the pool's label (an entry here wins)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Added to the pods' tolerations (GPU pods always tolerate `nvidia.com/gpu`)."""
    # Kept untyped on purpose: the affinity API is large and we add nothing to it; the pod's validation applies.
    affinity: dict[str, Any] | None = None
    """core/v1 Affinity, passed to the pods unchanged."""


# --- tiers ------------------------------------------------------------------------------------------------------


class SecretKeyRef(_Model):
    name: DnsLabel
    key: Annotated[str, Field(min_length=1, max_length=253)]


class EnvVarSource(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.secretKeyRef) != has(self.configMapKeyRef)",
                    "message": "valueFrom needs exactly one of secretKeyRef, configMapKeyRef",
                }
            ]
        }
    )

    secret_key_ref: SecretKeyRef | None = None
    config_map_key_ref: SecretKeyRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("valueFrom needs exactly one of secretKeyRef, configMapKeyRef")
        return self


class EnvVar(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "!(has(self.value) && has(self.valueFrom))", "message": "set value or valueFrom, not both"}
            ]
        }
    )

    name: Annotated[str, Field(min_length=1, max_length=256, pattern=ENV_NAME_PATTERN)]
    value: Annotated[str, Field(max_length=32768)] | None = None
    value_from: EnvVarSource | None = None

    @model_validator(mode="after")
    def _not_both(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("set value or valueFrom, not both")
        return self


class Engine(_Model):
    """The model server. vLLM's OpenAI-compatible server by default; `args` are appended to the operator's own
    (`--model`, `--served-model-name`, `--port`)."""

    image: Annotated[str, Field(min_length=1, max_length=512)] = DEFAULT_ENGINE_IMAGE
    """Container image of the model server."""
    args: list[Annotated[str, Field(max_length=4096)]] = Field(default_factory=list, max_length=128)
    """Extra command-line arguments for the server, after the ones the operator sets."""
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Extra environment variables (e.g. HF_TOKEN from a Secret)."""
    port: Annotated[int, Field(ge=1, le=65535)] = DEFAULT_ENGINE_PORT
    """Port of the OpenAI-compatible HTTP server (health on /health, metrics on /metrics)."""


class Resources(_Model):
    """Per replica. GPUs are whole devices (`nvidia.com/gpu`), requested and limited alike."""

    gpus: Annotated[int, Field(ge=0, le=64, strict=True)] = 0
    """Whole GPUs per replica (`nvidia.com/gpu`)."""
    cpu: Quantity | None = None
    """CPU request per replica (also the limit)."""
    memory: Quantity | None = None
    """Memory request and limit per replica."""


# `replicas.managedBy` (v1alpha1 before autoscaling modes) is refused rather than silently pruned, with its
# replacement in the message, so a manifest written for the old field fails loudly instead of changing meaning.
MANAGED_BY_REFUSED = (
    "replicas.managedBy was replaced by autoscaling.mode: use autoscaling.mode External for the old Autoscaler "
    "(the operator never writes replicas), or leave autoscaling out for the old Operator (kept at replicas.min)"
)


class Replicas(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.max) || !has(self.min) || self.min <= self.max",
                    "message": "replicas.min must not exceed replicas.max",
                },
                {
                    "rule": "!has(self.managedBy)",
                    "message": MANAGED_BY_REFUSED,
                    "fieldPath": ".managedBy",
                    "reason": "FieldValueForbidden",
                },
            ]
        }
    )

    min: Annotated[int, Field(ge=0, le=1000, strict=True)] = 1
    """Replicas the operator runs (no autoscaling), or the floor the autoscaler keeps (autoscaling.mode)."""
    max: Annotated[int, Field(ge=0, le=1000, strict=True)] | None = None
    """Ceiling for the autoscaler (required with autoscaling.mode HPA or KEDA); absent means equal to min."""
    managed_by: Annotated[str, Field(max_length=64)] | None = None
    """Removed: refused with a message naming its replacement, spec.tiers[].autoscaling.mode."""

    @model_validator(mode="after")
    def _min_le_max(self) -> Replicas:
        if self.managed_by is not None:
            raise _At("managedBy", MANAGED_BY_REFUSED)
        if self.max is not None and self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) must not exceed replicas.max ({self.max})")
        return self

    @property
    def effective_max(self) -> int:
        return self.min if self.max is None else self.max


class AutoscalingMode(StrEnum):
    """Who scales a deployed tier between replicas.min and replicas.max. HPA: an autoscaling/v2
    HorizontalPodAutoscaler the operator creates and owns. KEDA: a keda.sh/v1alpha1 ScaledObject instead (KEDA must
    be installed; it can scale to zero). External: something else (a person, your own autoscaler) scales the
    Deployment; the operator never writes its replicas."""

    HPA = "HPA"
    KEDA = "KEDA"
    EXTERNAL = "External"


# Targets are per replica, so the autoscaler divides the tier's total by them: an integer of at least 1 (a zero
# target would ask for infinitely many replicas, and the CRD must carry no floats).
AutoscalingTarget = Annotated[int, Field(ge=1, le=100_000, strict=True)]


class AutoscalingTargets(_Model):
    """Per-replica targets, each an integer of at least 1. With both, the autoscaler takes whichever asks for more
    replicas (the HPA's rule for several metrics)."""

    router_demand_per_replica: AutoscalingTarget | None = None
    """Requests the router has routed to this tier and not yet finished (metric tiergate_router_tier_demand, summed
    over the policy's router replicas) per tier replica. Leads the tier's own queue: the router counts a request
    when it chooses the tier, also while the tier has no replica and the request is served by a fallback, so it
    wakes a tier scaled to zero."""
    vllm_waiting_per_replica: AutoscalingTarget | None = None
    """vLLM's waiting requests (vllm:num_requests_waiting) per tier replica, averaged over the tier's pods."""


# Seconds are bounded like the HPA's own field (stabilizationWindowSeconds: at most one hour).
StabilizationSeconds = Annotated[int, Field(ge=0, le=3600, strict=True)]


class AutoscalingBehavior(_Model):
    """How fast the autoscaler moves: the HPA's stabilization windows (KEDA passes them to the HPA it makes)."""

    scale_up_stabilization_seconds: StabilizationSeconds = 0
    """Scale up to the lowest count recommended over this window (0: at once, the HPA's default)."""
    scale_down_stabilization_seconds: StabilizationSeconds = 300
    """Scale down to the highest count recommended over this window (the HPA's default, 5 minutes): a short lull
    does not drop replicas that take minutes to load a model. Mode KEDA: also the ScaledObject's cooldownPeriod, the
    time since the triggers were last active before KEDA scales the tier from its last replica to zero (KEDA's
    default is the same 5 minutes)."""


AUTOSCALING_TARGETS_NEEDED = (
    "autoscaling.targets needs routerDemandPerReplica or vllmWaitingPerReplica for mode HPA or KEDA"
)
AUTOSCALING_EXTERNAL_ONLY_MODE = (
    "autoscaling mode External takes no targets, behavior or prometheusServerAddress (nothing the operator makes "
    "would read them)"
)
HOLD_SECONDS_WITH_HOLD = "autoscaling.maxHoldSeconds is required with whenScaledToZero Hold and only used by it"
POLLING_INTERVAL_KEDA_ONLY = (
    "autoscaling.pollingIntervalSeconds is only used with mode KEDA (how often KEDA's operator queries Prometheus to "
    "wake the tier from zero)"
)
PROMETHEUS_ADDRESS_KEDA_ONLY = (
    "autoscaling.prometheusServerAddress is required with mode KEDA and only used by it (the HPA reads the "
    "Kubernetes metrics APIs)"
)


class WhenScaledToZero(StrEnum):
    """What the router does with a request routed to the tier while the tier has no ready endpoint (scaled to
    zero, or waking up). Fallback: the next tier of the fallback chain answers at once. Hold: the request waits for
    an endpoint (the router's EndpointSlice discovery) up to maxHoldSeconds or its deadline, whichever ends first,
    then falls back as with Fallback. Either way it counts in the tier's demand meanwhile, which wakes the tier."""

    FALLBACK = "Fallback"
    HOLD = "Hold"


class Autoscaling(_Model):
    """Per-tier autoscaling. Bounds are replicas.min and replicas.max; the HPA or ScaledObject is owned by the policy
    and targets the tier's Deployment. Absent: the operator keeps the tier at replicas.min."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.mode == 'External' || (has(self.targets) && "
                    "(has(self.targets.routerDemandPerReplica) || has(self.targets.vllmWaitingPerReplica)))",
                    "message": AUTOSCALING_TARGETS_NEEDED,
                    "fieldPath": ".targets",
                    "reason": "FieldValueRequired",
                },
                {
                    "rule": "self.mode != 'External' || "
                    "(!has(self.targets) && !has(self.behavior) && !has(self.prometheusServerAddress))",
                    "message": AUTOSCALING_EXTERNAL_ONLY_MODE,
                    "reason": "FieldValueForbidden",
                },
                {
                    "rule": "has(self.whenScaledToZero) && self.whenScaledToZero == 'Hold' ? has(self.maxHoldSeconds) "
                    ": !has(self.maxHoldSeconds)",
                    "message": HOLD_SECONDS_WITH_HOLD,
                    "fieldPath": ".maxHoldSeconds",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "self.mode == 'KEDA' || !has(self.pollingIntervalSeconds)",
                    "message": POLLING_INTERVAL_KEDA_ONLY,
                    "fieldPath": ".pollingIntervalSeconds",
                    "reason": "FieldValueForbidden",
                },
                {
                    "rule": "(self.mode == 'KEDA') == has(self.prometheusServerAddress) || self.mode == 'External'",
                    "message": PROMETHEUS_ADDRESS_KEDA_ONLY,
                    "fieldPath": ".prometheusServerAddress",
                    "reason": "FieldValueInvalid",
                },
            ]
        }
    )

    mode: AutoscalingMode
    """HPA, KEDA or External."""
    targets: AutoscalingTargets | None = None
    """HPA and KEDA: at least one per-replica target."""
    behavior: AutoscalingBehavior | None = None
    """HPA and KEDA: stabilization windows (absent: scale up at once, down after 5 minutes)."""
    prometheus_server_address: Annotated[str, Field(pattern=URL_PATTERN, max_length=2048)] | None = None
    """KEDA only (required): the Prometheus that scrapes the router and the tier pods, e.g.
    http://prometheus.monitoring.svc:9090; KEDA's prometheus triggers query it."""
    polling_interval_seconds: Annotated[int, Field(ge=1, le=3600, strict=True)] | None = None
    """KEDA only: how often KEDA's operator queries Prometheus for the tier's triggers, the ScaledObject's
    pollingInterval (absent: KEDA's default, 30 s). It bounds how soon demand wakes a tier at zero (one scrape of the
    router plus one poll), so keep it under maxHoldSeconds when requests are held."""
    when_scaled_to_zero: WhenScaledToZero | None = None
    """Mode KEDA or External with replicas.min 0: what the router does with the tier's requests while it has no
    ready endpoint. Fallback (absent means Fallback) or Hold (wait up to maxHoldSeconds, then fall back)."""
    max_hold_seconds: Annotated[int, Field(ge=1, le=3600, strict=True)] | None = None
    """whenScaledToZero Hold only (required): the longest a request waits for an endpoint of the tier; the request's
    own deadline (spec.router.timeouts.requestSeconds, or the client's) still applies, and ends it with 504."""

    @model_validator(mode="after")
    def _mode_fields(self) -> Autoscaling:
        if (self.when_scaled_to_zero is WhenScaledToZero.HOLD) != (self.max_hold_seconds is not None):
            raise _At("maxHoldSeconds", HOLD_SECONDS_WITH_HOLD)
        if self.mode is not AutoscalingMode.KEDA and self.polling_interval_seconds is not None:
            raise _At("pollingIntervalSeconds", POLLING_INTERVAL_KEDA_ONLY)
        if self.mode is AutoscalingMode.EXTERNAL:
            if self.targets is not None or self.behavior is not None or self.prometheus_server_address is not None:
                raise ValueError(AUTOSCALING_EXTERNAL_ONLY_MODE)
            return self
        t = self.targets
        if t is None or (t.router_demand_per_replica is None and t.vllm_waiting_per_replica is None):
            raise _At("targets", AUTOSCALING_TARGETS_NEEDED)
        if (self.mode is AutoscalingMode.KEDA) != (self.prometheus_server_address is not None):
            raise _At("prometheusServerAddress", PROMETHEUS_ADDRESS_KEDA_ONLY)
        return self

    @property
    def scales(self) -> bool:
        """Whether the operator makes an autoscaler object (HPA or KEDA), rather than leaving it to someone else."""
        return self.mode is not AutoscalingMode.EXTERNAL

    @property
    def hold_seconds(self) -> int | None:
        """How long the router holds the tier's requests while it has no endpoint; None: it falls back at once."""
        return self.max_hold_seconds if self.when_scaled_to_zero is WhenScaledToZero.HOLD else None


class TierPrice(_Model):
    """Price per million tokens as an integer or a quoted decimal string ("0.15"); never a float. With an N-tier
    classifier the router weighs input + output against each tier's predicted quality (the artifact's calibrated
    cost weight and budgetPerMillion hold only for prices in the artifact's ratios; other prices need
    costWeightBasisPoints); it also prices the estimated-cost metric."""

    input_per_million: Price
    output_per_million: Price


class ModelVolume(_Model):
    """A PersistentVolumeClaim holding model weights, for `model` given as a path on it."""

    claim_name: DnsLabel
    mount_path: Annotated[str, Field(pattern=r"^/.*")] = "/models"
    read_only: bool = True


class ExternalEndpoint(_Model):
    """An OpenAI-compatible backend the operator does not deploy (a hosted API or a server elsewhere)."""

    url: Annotated[str, Field(pattern=URL_PATTERN, max_length=2048)]
    api_key_secret_ref: SecretKeyRef | None = None


HPA_NEEDS_MIN = (
    "autoscaling mode HPA needs replicas.min of at least 1: the HPA cannot scale to zero (its HPAScaleToZero "
    "feature gate is alpha and off by default); use mode KEDA to scale an idle tier to zero"
)
AUTOSCALER_NEEDS_MAX = "autoscaling mode HPA or KEDA needs replicas.max (the ceiling, at least 1)"
ZERO_NEEDS_DEMAND = (
    "autoscaling mode KEDA with replicas.min 0 needs autoscaling.targets.routerDemandPerReplica: vLLM's waiting "
    "requests come from the tier's own pods, and a tier at zero has none to wake it"
)
SCALED_TO_ZERO_NEEDS_ZERO = (
    "autoscaling.whenScaledToZero applies to a tier that may scale to zero: mode KEDA or External with replicas.min 0"
)
EXTERNAL_TIER_AUTOSCALING = "autoscaling applies to deployed tiers; a tier with endpoint deploys nothing to scale"


def _autoscaling_rule(rule: str, message: str, path: str) -> JsonDict:
    # has(): mode is required inside autoscaling, replicas has a default; every rule holds without autoscaling.
    return {"rule": f"!has(self.autoscaling) || {rule}", "message": message, "fieldPath": path}


class Modality(StrEnum):
    """An input modality a tier accepts in a chat request: text, images (`image_url` parts), audio (`input_audio`
    parts). Lower-case: these are the words of the OpenAI content-part types, and scripts spell them so."""

    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"


MODALITIES_MESSAGE = "modalities must include text (every tier answers a chat request in text) and not repeat one"


class Tier(Placement):
    """One model tier. Tiers are listed cheapest first; the last tier is the strongest."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _autoscaling_rule(
                    "self.autoscaling.mode != 'HPA' || !has(self.replicas.min) || self.replicas.min >= 1",
                    HPA_NEEDS_MIN,
                    ".replicas.min",
                ),
                _autoscaling_rule(
                    "self.autoscaling.mode == 'External' || (has(self.replicas.max) && self.replicas.max >= 1)",
                    AUTOSCALER_NEEDS_MAX,
                    ".replicas.max",
                ),
                _autoscaling_rule(
                    "self.autoscaling.mode != 'KEDA' || (has(self.replicas.min) && self.replicas.min >= 1) || "
                    "(has(self.autoscaling.targets) && has(self.autoscaling.targets.routerDemandPerReplica))",
                    ZERO_NEEDS_DEMAND,
                    ".autoscaling.targets",
                ),
                _autoscaling_rule(
                    "!has(self.autoscaling.whenScaledToZero) || (self.autoscaling.mode != 'HPA' && "
                    "has(self.replicas.min) && self.replicas.min == 0)",
                    SCALED_TO_ZERO_NEEDS_ZERO,
                    ".autoscaling.whenScaledToZero",
                ),
                _autoscaling_rule("!has(self.endpoint)", EXTERNAL_TIER_AUTOSCALING, ".autoscaling"),
                {
                    "rule": "!has(self.modalities) || 'text' in self.modalities",
                    "message": MODALITIES_MESSAGE,
                    "fieldPath": ".modalities",
                    "reason": "FieldValueInvalid",
                },
            ]
        }
    )

    name: TierName
    """Tier name (DNS label, at most 20 characters); children are named `<policy>-tier-<name>`."""
    model: Annotated[str, Field(min_length=1, max_length=512)]
    """What the engine serves: a model id or a path on modelVolume."""
    served_model_name: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """Model name clients and the router use; defaults to the tier name."""
    engine: Engine = Field(default_factory=Engine, json_schema_extra={"default": {}})
    resources: Resources = Field(default_factory=Resources, json_schema_extra={"default": {}})
    replicas: Replicas = Field(default_factory=Replicas, json_schema_extra={"default": {}})
    price: TierPrice
    model_volume: ModelVolume | None = None
    endpoint: ExternalEndpoint | None = None
    """An external OpenAI-compatible backend; when set the operator deploys nothing for this tier."""
    autoscaling: Autoscaling | None = None
    """Who scales the tier between replicas.min and replicas.max: mode HPA, KEDA or External. Absent: the operator
    keeps the tier at replicas.min."""

    @model_validator(mode="after")
    def _autoscaling_fits(self) -> Tier:
        a = self.autoscaling
        if a is None:
            return self
        if self.endpoint is not None:
            raise _At("autoscaling", EXTERNAL_TIER_AUTOSCALING)
        if a.mode is AutoscalingMode.HPA and self.replicas.min < 1:
            raise _At("replicas.min", HPA_NEEDS_MIN)
        if a.scales and (self.replicas.max is None or self.replicas.max < 1):
            raise _At("replicas.max", AUTOSCALER_NEEDS_MAX)
        demand = a.targets.router_demand_per_replica if a.targets is not None else None
        if a.mode is AutoscalingMode.KEDA and self.replicas.min < 1 and demand is None:
            raise _At("autoscaling.targets", ZERO_NEEDS_DEMAND)
        if a.when_scaled_to_zero is not None and not self.scales_to_zero:
            raise _At("autoscaling.whenScaledToZero", SCALED_TO_ZERO_NEEDS_ZERO)
        return self

    modalities: list[Modality] = Field(
        default_factory=lambda: [Modality.TEXT],
        min_length=1,
        max_length=len(Modality),
        json_schema_extra={"x-kubernetes-list-type": "set", "default": ["text"]},
    )
    """Input modalities the tier's model accepts (text, image, audio; always text). The router sends a request with
    images or audio only to a tier that accepts them all, or describes/transcribes the parts on tiers that accept
    them and lets the chosen tier answer from the text (docs/router.md, "Multimodal requests")."""

    @model_validator(mode="after")
    def _text_modality(self) -> Tier:
        if Modality.TEXT not in self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise _At("modalities", MODALITIES_MESSAGE)
        return self

    @property
    def external(self) -> bool:
        return self.endpoint is not None

    @property
    def autoscaled(self) -> bool:
        """Whether something other than the operator owns the Deployment's replica count (any autoscaling mode)."""
        return self.autoscaling is not None

    @property
    def scales_to_zero(self) -> bool:
        """Whether the tier may have no replica: an autoscaler (KEDA, or an External one) allowed down to 0."""
        a = self.autoscaling
        return a is not None and a.mode is not AutoscalingMode.HPA and self.replicas.min == 0

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.name


# --- router -----------------------------------------------------------------------------------------------------


class ConfigMapKeyRef(_Model):
    name: DnsLabel
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]


class ClassifierRef(_Model):
    """Where the router finds the artifact `tiergate train` wrote: a ConfigMap key, or a path inside the router
    container (its image or a volume). Exactly one. The router reads the artifact only at start: the operator checks
    a ConfigMap's artifact, copies a good one into a ConfigMap of its own that the router mounts, and rolls the
    router when the artifact or this reference changes. A broken or missing artifact is refused (condition Degraded,
    reason ClassifierInvalid or ClassifierMissing, and a Warning Event) and the last good one keeps serving."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.configMap) != has(self.path)", "message": "set exactly one of configMap, path"}
            ]
        }
    )

    config_map: ConfigMapKeyRef | None = None
    path: Annotated[str, Field(pattern=r"^/.*")] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ClassifierRef:
        if (self.config_map is None) == (self.path is None):
            raise ValueError("classifier needs exactly one of configMap, path")
        return self


class RouterCanary(_Model):
    """A second classifier artifact that decides a share of the routed requests (a canary of a new router): which
    artifact decides is a pure function of the request id (`x-request-id`, a fresh one when the client sends none),
    so a retried request with the same id is decided alike. Both artifacts' decisions and shadow judgements are
    reported side by side (the metrics' `artifact` label: primary, canary). It must serve the same tiers, and is
    read at start like spec.router.classifier. The policy's decision knob applies to both artifacts where it can;
    a knob of the other artifact kind is refused, naming it."""

    classifier: ClassifierRef
    """The canary artifact: a `path` inside the router container (its image or a volume), or a `configMap` key the
    operator checks and copies like spec.router.classifier's and mounts beside it (a missing or unfit one refuses
    the generation, naming spec.router.canary.classifier.configMap)."""
    share_basis_points: BasisPoints
    """Share of routed requests (0..10000) the canary artifact decides."""


class Timeouts(_Model):
    """Envoy's route timeout and per-try timeout. `requestSeconds` is the overall deadline of one client request:
    every try on every tier of the fallback chain, and the backoff between them, fit inside it; when it passes the
    client gets HTTP 504 (gRPC DEADLINE_EXCEEDED). For a streaming request it covers the time to the first byte;
    after that only the idle timeout applies. A client may ask for a shorter deadline, never a longer one."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    # has(): the API server also checks these rules against the `default: {}` itself.
                    "rule": "!has(self.perTrySeconds) || !has(self.requestSeconds) || "
                    "self.perTrySeconds <= self.requestSeconds",
                    "message": "perTrySeconds must not exceed requestSeconds",
                    "fieldPath": ".perTrySeconds",
                }
            ]
        }
    )

    connect_seconds: Annotated[int, Field(ge=1, le=300, strict=True)] = 5
    """Connecting to a tier."""
    request_seconds: Annotated[int, Field(ge=1, le=3600, strict=True)] = 120
    """Overall deadline of a request across all tries and fallbacks (streaming: until the first byte)."""
    per_try_seconds: Annotated[int, Field(ge=1, le=3600, strict=True)] | None = None
    """Deadline of one try on one endpoint (at most requestSeconds); a try that passes it counts as a failure of the
    endpoint and the request moves on (another endpoint, then the next tier). Unset: a try may use whatever is left
    of requestSeconds, so a tier that hangs ends in 504 instead of a fallback."""

    @model_validator(mode="after")
    def _per_try_within_request(self) -> Timeouts:
        if self.per_try_seconds is not None and self.per_try_seconds > self.request_seconds:
            raise _At("perTrySeconds", "perTrySeconds must not exceed requestSeconds")
        return self


class Retries(_Model):
    """Retries after a failed try (connection error, HTTP 5xx, per-try timeout), like Envoy's retry policy with a
    retry budget. Moving on because a tier is saturated (HTTP 429, in-flight or queue limit) is load shedding, not a
    retry: it is bounded by the fallback chain only."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.backoffBaseMilliseconds) || !has(self.backoffMaxMilliseconds) || "
                    "self.backoffBaseMilliseconds <= self.backoffMaxMilliseconds",
                    "message": "backoffBaseMilliseconds must not exceed backoffMaxMilliseconds",
                    "fieldPath": ".backoffMaxMilliseconds",
                }
            ]
        }
    )

    attempts_per_tier: Annotated[int, Field(ge=1, le=20, strict=True)] = 3
    """Tries per tier, each on another endpoint, before the next tier in the fallback order."""
    budget_percent: Annotated[int, Field(ge=0, le=100, strict=True)] = 20
    """Retries in flight at once, as a percentage of the requests in flight through this router (Envoy's
    retry_budget.budget_percent). A failed try over budget is not retried: the client gets the error (HTTP 503)."""
    min_retry_concurrency: Annotated[int, Field(ge=0, le=10000, strict=True)] = 3
    """Retries always allowed in flight, whatever the percentage gives (Envoy's min_retry_concurrency)."""
    backoff_base_milliseconds: Annotated[int, Field(ge=1, le=60000, strict=True)] = 25
    """Backoff before the n-th retry on the same tier: a random time (full jitter) up to base x 2^(n-1), capped at
    backoffMaxMilliseconds and at what is left of the deadline. None before the first try of the next tier."""
    backoff_max_milliseconds: Annotated[int, Field(ge=1, le=600000, strict=True)] = 250
    """The cap of the backoff."""

    @model_validator(mode="after")
    def _base_below_max(self) -> Retries:
        if self.backoff_base_milliseconds > self.backoff_max_milliseconds:
            raise _At("backoffMaxMilliseconds", "backoffBaseMilliseconds must not exceed backoffMaxMilliseconds")
        return self


class CircuitBreaker(_Model):
    """Per endpoint: consecutive failed tries open it (no traffic), then after openSeconds one probe decides."""

    consecutive_failures: Annotated[int, Field(ge=1, le=1000, strict=True)] = 3
    open_seconds: Annotated[int, Field(ge=1, le=3600, strict=True)] = 5


class Saturation(_Model):
    """When a tier counts as saturated and requests move on to the next tier without trying it. 0 = no limit."""

    max_in_flight_per_endpoint: Annotated[int, Field(ge=0, le=100000, strict=True)] = 0
    """Requests in flight through this router replica per endpoint; a tier is saturated when every endpoint has
    this many."""
    queued_requests: Annotated[int, Field(ge=0, le=100000, strict=True)] = 0
    """Requests waiting in an endpoint's queue (vLLM's num_requests_waiting, read from its /metrics every second);
    a tier is saturated when every endpoint reports at least this many."""


class ClassifierCache(_Model):
    """The router's cache of classifier verdicts. It keys on a 16-byte digest of the part of a prompt the encoder
    reads, so its memory depends only on these bounds, never on prompt sizes. Unset: the router's defaults."""

    max_entries: Annotated[int, Field(ge=0, le=10_000_000, strict=True)] | None = None
    """Verdicts kept at most (0 turns the cache off)."""
    max_bytes: Annotated[int, Field(ge=0, le=1 << 34, strict=True)] | None = None
    """Bytes the cache may hold at most, each entry counted with its bookkeeping (0 turns the cache off)."""


class BodyLimits(_Model):
    """How much of request and answer bodies the router holds. Unset: the router's defaults (docs/router.md,
    "Memory")."""

    max_in_flight_request_bytes: Annotated[int, Field(ge=4 * 1024 * 1024, le=1 << 36, strict=True)] | None = None
    """Bytes of request bodies (HTTP and gRPC) held at once; a request that does not fit waits its turn (HTTP 503
    after requestSeconds). At least one maximal body (4 MiB); default 64 MiB."""
    max_response_bytes: Annotated[int, Field(ge=1024, le=1 << 30, strict=True)] | None = None
    """Largest non-streaming answer read from a tier; a larger one is HTTP 502 (gRPC UNAVAILABLE) naming the tier.
    Default 16 MiB."""


class SpecialistFailure(StrEnum):
    """What a decomposed request does when a specialist tier cannot describe or transcribe a part (it failed, or
    ran out of its share of the deadline). Annotate: the answering tier is told which part could not be read and
    answers anyway. Fail: the request fails (HTTP 502, 504 for a timeout) with a message naming the part."""

    ANNOTATE = "Annotate"
    FAIL = "Fail"


class MixedRequests(StrEnum):
    """How a request with images or audio is served. RouteToCapableTier: the classifier chooses among the tiers
    that accept every modality present; only when none does, the parts the chosen tier cannot take are decomposed.
    Decompose: the classifier chooses among all tiers by the text alone, and the parts that tier cannot take are
    decomposed (sent to a tier that accepts them for a description or a transcript)."""

    ROUTE_TO_CAPABLE_TIER = "RouteToCapableTier"
    DECOMPOSE = "Decompose"


# A hostname, or `*.` and a domain (its subdomains only): the forms of spec.router.attachments.allowedHosts.
ALLOWED_HOST_PATTERN = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class Attachments(_Model):
    """Images and audio in chat requests. Inline data (data: URLs, input_audio) is limited in count and size; a
    part that points at a URL is passed to a tier (which fetches it) only when its host is allowed here: the router
    never fetches one itself, and never lets a client make a tier fetch from an arbitrary host."""

    allowed_hosts: list[Annotated[str, Field(max_length=253, pattern=ALLOWED_HOST_PATTERN)]] = Field(
        default_factory=list, max_length=64, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Hosts an http(s) image or audio URL may name (`cdn.example.com`, or `*.example.com` for its subdomains).
    Empty: every URL is refused with HTTP 400 naming its host; inline data is unaffected."""
    max_count: Annotated[int, Field(ge=0, le=64, strict=True)] = 8
    """Images and audio parts per request at most (HTTP 400 beyond)."""
    max_bytes: Annotated[int, Field(ge=1024, le=1 << 30, strict=True)] = 4 * 1024 * 1024
    """Decoded bytes of one inline attachment at most (HTTP 413 beyond). The request body limit also applies."""
    on_specialist_failure: SpecialistFailure = SpecialistFailure.ANNOTATE
    mixed_requests: MixedRequests = MixedRequests.ROUTE_TO_CAPABLE_TIER


DECISION_LOG_PROMPTS_MESSAGE = "includePrompts needs enabled: true (there is no log to write prompts to)"


class DecisionLog(_Model):
    """The router's decision log: one JSON object per request on the router's stdout (the cluster's log collector
    ships it), with feedback records joined on `request_id`; `tiergate calibrate --data` reads it. Reloaded
    without a restart."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.includePrompts) || !self.includePrompts || (has(self.enabled) && self.enabled)",
                    "message": DECISION_LOG_PROMPTS_MESSAGE,
                }
            ]
        }
    )

    enabled: bool = False
    """Write the log (the router's stdout)."""
    include_prompts: bool = False
    """Also write each prompt's text; otherwise only its sha256 digest. Prompts may hold personal data: turn this on
    only where the data's policy allows it."""

    @model_validator(mode="after")
    def _prompts_need_a_log(self) -> DecisionLog:
        if self.include_prompts and not self.enabled:
            raise ValueError(DECISION_LOG_PROMPTS_MESSAGE)
        return self


# spec.router.personalization bounds (the router checks `tiergate serve`'s flags against them too).
MIN_PROFILE_USERS = 16
MAX_PROFILE_USERS = 1_000_000
MAX_PRIOR_STRENGTH = 10_000
PERSONALIZATION_NEEDS_N_TIER = (
    "router.personalization.enabled needs an N-tier (multi_tier) classifier artifact in router.classifier and at "
    "least two tiers: only the N-tier choice is adjusted per user (two-tier thresholds were not measured)"
)


class Personalization(_Model):
    """Per-user routing profiles: a returning user's own ratings (POST /v1/feedback, and re-asked prompts as -1)
    adjust the N-tier artifact's predicted quality of each tier for that user before the cost-weighted choice; a
    first-time user, or a request without the OpenAI `user` field, gets the policy's decision. Needs an N-tier
    classifier artifact. State is per router replica and bounded (docs/routing.md, "Per-user profiles")."""

    enabled: bool = False
    """Adjust decisions per user (the request's `user` field, scoped by tenant)."""
    max_users: Annotated[int, Field(ge=MIN_PROFILE_USERS, le=MAX_PROFILE_USERS, strict=True)] = 100_000
    """Users one router replica holds profiles for (least recently used replaced first): the table is fixed,
    about 8 x (artifact tiers) + 16 bytes per user (100,000 users of 9 tiers: 8.4 MiB)."""
    prior_strength: Annotated[int, Field(ge=1, le=MAX_PRIOR_STRENGTH, strict=True)] = 50
    """Ratings before a user's own outcomes weigh as much as the artifact's prediction (the shrinkage k): larger
    moves users less. 50 was chosen on simulated users."""


class RouterResources(_Model):
    cpu: Quantity | None = None
    memory: Quantity | None = None


DECISION_KNOBS_MESSAGE = (
    "set at most one of thresholdBasisPoints, targetStrongShareBasisPoints, costWeightBasisPoints, budgetPerMillion"
)


class Router(Placement):
    """The router in front of the tiers. At most one decision knob. A two-tier artifact (one score per prompt) takes
    a fixed threshold on the score (basis points of probability that the strongest tier is needed) or a target
    share of traffic on the strongest tier. An N-tier artifact (predicted quality per tier, the choice maximises
    quality - weight x price) takes a cost weight or an average price budget. With no knob, the operating point
    calibrated into the artifact applies. A knob of the other artifact kind is refused when the router loads it."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.thresholdBasisPoints), has(self.targetStrongShareBasisPoints), "
                    "has(self.costWeightBasisPoints), has(self.budgetPerMillion)].filter(k, k).size() <= 1",
                    "message": DECISION_KNOBS_MESSAGE,
                },
                {
                    # has(): the API server also checks these rules against the `default: {}` itself.
                    "rule": "!has(self.httpPort) || !has(self.grpcPort) || self.httpPort != self.grpcPort",
                    "message": "httpPort and grpcPort must differ",
                },
            ]
        }
    )

    replicas: Annotated[int, Field(ge=0, le=100, strict=True)] = 2
    image: Annotated[str, Field(min_length=1, max_length=512)] = DEFAULT_ROUTER_IMAGE
    classifier: ClassifierRef | None = None
    canary: RouterCanary | None = None
    threshold_basis_points: BasisPoints | None = None
    """Route to the strongest tier when the classifier's score is at least this (0..10000)."""
    target_strong_share_basis_points: BasisPoints | None = None
    """Instead of a threshold: the share of traffic (0..10000) the strongest tier should get."""
    cost_weight_basis_points: BasisPoints | None = None
    """N-tier artifacts: the weight of price against predicted quality, in basis points of quality (0..1) per unit
    of price per million tokens (500 = 0.05: one dollar per Mtok more must buy 0.05 more expected quality)."""
    budget_per_million: Price | None = None
    """N-tier artifacts, instead of a cost weight: the highest average price per million tokens (input + output, as
    the tiers' prices) to spend; the router takes the calibrated cost weight with the best quality whose mean price
    fits it, as `tiergate calibrate --budget` prints. The calibration was measured at the artifact's tier prices:
    tier prices k times those are compared as budget / k; prices in other ratios are refused (set
    costWeightBasisPoints)."""
    fallback_order: list[TierName] = Field(
        default_factory=list, max_length=MAX_TIERS, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Tiers tried, in order, when the chosen tier fails; defaults to every tier, strongest first."""
    timeouts: Timeouts = Field(default_factory=Timeouts, json_schema_extra={"default": {}})
    retries: Retries = Field(default_factory=Retries, json_schema_extra={"default": {}})
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker, json_schema_extra={"default": {}})
    saturation: Saturation = Field(default_factory=Saturation, json_schema_extra={"default": {}})
    classifier_cache: ClassifierCache | None = None
    body_limits: BodyLimits | None = None
    attachments: Attachments | None = None
    """Images and audio in chat requests; absent: the defaults (no URL hosts allowed, 8 parts of 4 MiB at most)."""
    decision_log: DecisionLog | None = None
    personalization: Personalization | None = None
    resources: RouterResources = Field(default_factory=RouterResources, json_schema_extra={"default": {}})
    http_port: Annotated[int, Field(ge=1, le=65535)] = 8080
    """OpenAI-compatible HTTP port."""
    grpc_port: Annotated[int, Field(ge=1, le=65535)] = 50051

    @model_validator(mode="after")
    def _one_knob(self) -> Router:
        if len(self.decision_knobs()) > 1:
            raise ValueError(DECISION_KNOBS_MESSAGE)
        if len(set(self.fallback_order)) != len(self.fallback_order):
            raise ValueError("fallbackOrder must not repeat a tier")
        if self.http_port == self.grpc_port:
            raise ValueError("httpPort and grpcPort must differ")
        return self

    def decision_knobs(self) -> list[str]:
        """The decision knobs set, by their API names."""
        knobs = {
            "thresholdBasisPoints": self.threshold_basis_points,
            "targetStrongShareBasisPoints": self.target_strong_share_basis_points,
            "costWeightBasisPoints": self.cost_weight_basis_points,
            "budgetPerMillion": self.budget_per_million,
        }
        return [k for k, v in knobs.items() if v is not None]


# --- best-of-N and shadow ---------------------------------------------------------------------------------------


class RewardModel(Placement):
    """The reward model that scores best-of-N candidates, served by vLLM on its own pool."""

    model: Annotated[str, Field(min_length=1, max_length=512)]
    image: Annotated[str, Field(min_length=1, max_length=512)] = DEFAULT_REWARD_IMAGE
    gpus: Annotated[int, Field(ge=0, le=64, strict=True)] = 1
    replicas: Annotated[int, Field(ge=0, le=100, strict=True)] = 1
    args: list[Annotated[str, Field(max_length=4096)]] = Field(default_factory=list, max_length=128)
    port: Annotated[int, Field(ge=1, le=65535)] = DEFAULT_ENGINE_PORT


class BestOfN(_Model):
    """Sample up to n answers from one tier and return the one the reward model scores highest."""

    tier: TierName
    """The tier sampled from; must name a tier in spec.tiers."""
    # Not called `n`: kubectl's YAML 1.1 parser reads a bare `n:` key as the boolean false.
    max_samples: Annotated[int, Field(ge=1, le=MAX_BEST_OF_N, strict=True)]
    """Maximum number of candidates sampled per request: the N of best-of-N (1..16)."""
    reward_model: RewardModel
    reference_tier: TierName | None = None
    """The tier that answers (one sample) when the reward model is slow, down or answers garbage, or the best
    sample scores below minReward; must name a tier in spec.tiers. Unset: the last (strongest) tier."""
    reward_timeout_milliseconds: Annotated[int, Field(ge=1, le=600_000, strict=True)] = 3000
    """How long the router waits for the reward model's scores before the reference tier answers instead."""
    min_reward: Annotated[str, Field(pattern=SIGNED_DECIMAL_PATTERN, max_length=32)] | None = None
    """The lowest acceptable reward of the best sample, as a quoted decimal string (e.g. "-1.5": reward scales
    differ per model, so it may be negative); a best sample below it is replaced by the reference tier's answer.
    Unset: any score is accepted."""


class ShadowMode(StrEnum):
    """Baseline: every routed request is answered by the baseline tier while the router's decision is only logged
    (the safe first deployment). Mirror: the router's tier answers, and a sampled share of requests is also sent to
    the baseline tier in the background, both answers judged by the reward model."""

    BASELINE = "Baseline"
    MIRROR = "Mirror"


SHADOW_NEEDS_REWARD = (
    "spec.shadow: judging shadow answers (mode Mirror, or a sampleRateBasisPoints above 0) needs a reward model: set "
    "spec.shadow.rewardUrl or spec.bestOfN.rewardModel"
)
MAX_SHADOW_CONCURRENCY = 1024


class Shadow(_Model):
    """Shadow routing: compare the router's decisions with an all-baseline deployment on live traffic."""

    mode: ShadowMode
    """Baseline or Mirror (see ShadowMode)."""
    baseline_tier: TierName
    """The tier the router is compared against (usually the strongest); must name a tier in spec.tiers."""
    sample_rate_basis_points: BasisPoints
    """Share of routed requests (0..10000) whose answer is judged against a second one fetched in the background:
    Mirror, a request the router sent elsewhere also goes to the baseline tier; Baseline, a request the router would
    have sent elsewhere also goes to that tier. (Requests the router sends to the baseline tier itself are paired with
    the cheapest tier instead, which is what the estimated PGR needs.) Never delays the client."""
    max_concurrent: Annotated[int, Field(ge=1, le=MAX_SHADOW_CONCURRENCY, strict=True)] = 16
    """Background shadow calls in flight per router replica at most; a sampled request beyond it is dropped, not
    queued, and counted (tiergate_router_shadow_dropped_total)."""
    reward_url: Annotated[str, Field(max_length=2048, pattern=URL_PATTERN)] | None = None
    """Root URL of the reward server that judges (vLLM's pooling API or `tiergate reward-server`). Unset: the
    reward model of spec.bestOfN, when set."""


# --- tenants ----------------------------------------------------------------------------------------------------

# Tenant names become metric labels: a bounded list keeps the label cardinality bounded whatever clients send.
MAX_TENANTS = 256
# host:port of a Redis server (a DNS name or an IPv4 address; the port is required so that nothing is implied).
REDIS_ADDRESS_PATTERN = r"^[a-zA-Z0-9]([-.a-zA-Z0-9]*[a-zA-Z0-9])?:[0-9]{1,5}$"


class TenantLimits(_Model):
    """Per tenant, across every router replica (counted in the limit store; see spec.limitStore). Absent: no limit.
    A refused request gets HTTP 429 with Retry-After (gRPC RESOURCE_EXHAUSTED)."""

    requests_per_minute: Annotated[int, Field(ge=1, le=100_000_000, strict=True)] | None = None
    """Requests admitted per minute (a token bucket holding one minute's worth, refilled continuously)."""
    tokens_per_minute: Annotated[int, Field(ge=1, le=10_000_000_000, strict=True)] | None = None
    """Prompt + completion tokens per minute, as the tiers' `usage` reports them. Charged when a response ends; a
    request is admitted while the tenant's bucket is not empty, so one request may overdraw it by its own size."""


class BudgetSpent(StrEnum):
    """What happens when a tenant's daily budget is spent: refuse with 429 until the next UTC day, or serve from the
    cheapest tier the tenant may use only."""

    REFUSE = "Refuse"
    CHEAPEST_TIER = "CheapestTier"


class TenantBudget(_Model):
    """A daily spend budget in USD (the tiers' prices are read as USD per million tokens). The day is the UTC day.
    As the budget runs low the tenant is routed cheaper; when it is spent, `whenSpent` applies."""

    daily_usd: Price
    """USD per UTC day, an integer or a quoted decimal string ("25", "2.50")."""
    low_remaining_basis_points: BasisPoints = 2000
    """The budget is low when less than this share of it remains (2000 = the last 20 %)."""
    low_cost_weight_basis_points: BasisPoints | None = None
    """N-tier artifacts: the cost weight used while the budget is low (a tighter one than usual). Unset, or with a
    two-tier artifact: while low, each request is served one tier cheaper than the router chose."""
    when_spent: BudgetSpent = BudgetSpent.REFUSE
    """Refuse: HTTP 429 until the next UTC day. CheapestTier: the cheapest tier the tenant may use, only."""


class Tenant(_Model):
    """A client team: its API key, the tiers it may use, its limits and its daily budget."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.costWeightBasisPoints) && has(self.budgetPerMillion))",
                    "message": "set at most one of costWeightBasisPoints, budgetPerMillion",
                }
            ]
        }
    )

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
    """Tenant name (DNS label): the metric label, and in local mode the key's environment variable
    TIERGATE_TENANT_KEY_<NAME> (upper-cased, `-` as `_`)."""
    api_key_secret_ref: SecretKeyRef
    """The Secret key holding the tenant's API key (sent as `Authorization: Bearer KEY`). A new value in the
    Secret takes effect without a restart."""
    tiers: list[TierName] | None = Field(
        default=None, min_length=1, max_length=MAX_TIERS, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Tiers the tenant may use (absent: all). Routed requests choose among them; naming another one is 403."""
    cost_weight_basis_points: BasisPoints | None = None
    """N-tier artifacts: the tenant's own cost weight, instead of the policy's."""
    budget_per_million: Price | None = None
    """N-tier artifacts, instead of a cost weight: the tenant's own average price budget per million tokens (as the
    policy's spec.router.budgetPerMillion), instead of the policy's knob."""
    limits: TenantLimits = Field(default_factory=TenantLimits, json_schema_extra={"default": {}})
    budget: TenantBudget | None = None

    @model_validator(mode="after")
    def _one_knob(self) -> Tenant:
        if self.cost_weight_basis_points is not None and self.budget_per_million is not None:
            raise ValueError("set at most one of costWeightBasisPoints, budgetPerMillion")
        return self


class UnauthenticatedAccess(StrEnum):
    """Whether a request without an API key is served. Allow: served like before tenants existed (every tier, no
    limits), while a request that sends a key must send a valid one. Refuse: 401."""

    ALLOW = "Allow"
    REFUSE = "Refuse"


class LimitStoreUnavailable(StrEnum):
    """When the limit store cannot be reached. PerReplicaLimits: each replica enforces the limits divided by
    spec.router.replicas on its own (fail open, not unlimited). Refuse: every tenant request gets 503 (fail
    closed)."""

    PER_REPLICA_LIMITS = "PerReplicaLimits"
    REFUSE = "Refuse"


class LimitStore(_Model):
    """Where the tenants' limit and spend counters are shared between router replicas: a Redis server. Absent: each
    replica counts alone, at the limits divided by spec.router.replicas."""

    redis_address: Annotated[str, Field(max_length=260, pattern=REDIS_ADDRESS_PATTERN)]
    """host:port of a Redis server (e.g. tiergate-redis:6379)."""
    when_unavailable: LimitStoreUnavailable = LimitStoreUnavailable.PER_REPLICA_LIMITS


# --- observed mix ------------------------------------------------------------------------------------------------

# Defaults of spec.observedMix (the reasons are at the fields).
DEFAULT_MIX_WINDOW_SECONDS = 300
DEFAULT_MIX_DRIFT_BAND_PERCENTAGE_POINTS = 5
DEFAULT_MIX_MIN_REQUESTS = 100


class ObservedMixSettings(_Model):
    """How the operator reports the tier mix the routers served (status.observedMix) against the share the routers'
    operating point predicts, and when it calls the difference drift (condition MixDrift)."""

    window_seconds: Annotated[int, Field(ge=10, le=86_400, strict=True)] = DEFAULT_MIX_WINDOW_SECONDS
    """The recent window the observed shares cover. Five minutes: long enough that a few hundred requests make a
    share worth comparing, short enough that a change of traffic shows within minutes."""
    drift_band_percentage_points: Annotated[int, Field(ge=1, le=100, strict=True)] = (
        DEFAULT_MIX_DRIFT_BAND_PERCENTAGE_POINTS
    )
    """MixDrift turns True when the most expensive tier's observed share is more than this many percentage points
    away from its predicted share (5: what a few hundred requests measure reliably)."""
    min_requests: Annotated[int, Field(ge=1, le=1_000_000_000, strict=True)] = DEFAULT_MIX_MIN_REQUESTS
    """Requests the window must hold before MixDrift says True or False (fewer: Unknown, NotEnoughTraffic); 100
    keeps the sampling error of a share under about 5 percentage points."""


# --- spec and object --------------------------------------------------------------------------------------------


def _names_a_tier(field: str, path: str) -> JsonDict:
    return {
        "rule": f"!has(self.{path.split('.')[0]}) || self.tiers.exists(t, t.name == self.{path})",
        "message": f"{field} must name a tier in spec.tiers",
        "fieldPath": f".{path}",
        "reason": "FieldValueInvalid",
    }


class RoutingPolicySpec(_Model):
    """Desired state: the tiers to serve, the router in front of them, optional best-of-N and shadowing."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _names_a_tier("bestOfN.tier", "bestOfN.tier"),
                _names_a_tier("shadow.baselineTier", "shadow.baselineTier"),
                {
                    "rule": "!has(self.shadow) || has(self.shadow.rewardUrl) || has(self.bestOfN) || "
                    "(self.shadow.mode == 'Baseline' && self.shadow.sampleRateBasisPoints == 0)",
                    "message": SHADOW_NEEDS_REWARD,
                    "fieldPath": ".shadow",
                    "reason": "FieldValueRequired",
                },
                {
                    "rule": "!has(self.bestOfN) || !has(self.bestOfN.referenceTier) || "
                    "self.tiers.exists(t, t.name == self.bestOfN.referenceTier)",
                    "message": "bestOfN.referenceTier must name a tier in spec.tiers",
                    "fieldPath": ".bestOfN.referenceTier",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "!has(self.router) || !has(self.router.fallbackOrder) || "
                    "self.router.fallbackOrder.all(f, self.tiers.exists(t, t.name == f))",
                    "message": "every entry of router.fallbackOrder must name a tier in spec.tiers",
                    "fieldPath": ".router.fallbackOrder",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "!has(self.tenants) || self.tenants.all(n, !has(n.tiers) || "
                    "n.tiers.all(x, self.tiers.exists(t, t.name == x)))",
                    "message": "every entry of tenants[].tiers must name a tier in spec.tiers",
                    "fieldPath": ".tenants",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "!has(self.router) || !has(self.router.personalization) || "
                    "!has(self.router.personalization.enabled) || !self.router.personalization.enabled || "
                    "(has(self.router.classifier) && size(self.tiers) >= 2)",
                    "message": PERSONALIZATION_NEEDS_N_TIER,
                    "fieldPath": ".router.personalization.enabled",
                    "reason": "FieldValueInvalid",
                },
            ]
        }
    )

    tiers: list[Tier] = Field(
        min_length=1,
        max_length=MAX_TIERS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Model tiers, cheapest first; names are unique."""
    router: Router = Field(default_factory=Router, json_schema_extra={"default": {}})
    best_of_n: BestOfN | None = Field(default=None, alias="bestOfN")
    shadow: Shadow | None = None
    tenants: list[Tenant] = Field(
        default_factory=list,
        max_length=MAX_TENANTS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Client teams with API keys. With tenants, a request needs a tenant's key unless `unauthenticated` is Allow."""
    unauthenticated: UnauthenticatedAccess | None = None
    """Requests without an API key. Absent: Refuse when tenants are declared, Allow when none are."""
    limit_store: LimitStore | None = None
    observed_mix: ObservedMixSettings = Field(default_factory=ObservedMixSettings, json_schema_extra={"default": {}})
    """The observed tier mix in status and its drift condition (MixDrift)."""

    @model_validator(mode="after")
    def _cross_field(self) -> RoutingPolicySpec:
        names = [t.name for t in self.tiers]
        seen: set[str] = set()
        for i, n in enumerate(names):
            if n in seen:
                raise _At(f"tiers[{i}].name", f"duplicate tier name {n!r}")
            seen.add(n)
        for i, f in enumerate(self.router.fallback_order):
            if f not in seen:
                raise _At(f"router.fallbackOrder[{i}]", f"names no tier: {f!r} (tiers: {', '.join(names)})")
        if self.best_of_n is not None and self.best_of_n.tier not in seen:
            raise _At("bestOfN.tier", f"names no tier: {self.best_of_n.tier!r} (tiers: {', '.join(names)})")
        ref = self.best_of_n.reference_tier if self.best_of_n is not None else None
        if ref is not None and ref not in seen:
            raise _At("bestOfN.referenceTier", f"names no tier: {ref!r} (tiers: {', '.join(names)})")
        sh = self.shadow
        if sh is not None:
            if sh.baseline_tier not in seen:
                raise _At("shadow.baselineTier", f"names no tier: {sh.baseline_tier!r} (tiers: {', '.join(names)})")
            judged = sh.mode is ShadowMode.MIRROR or sh.sample_rate_basis_points > 0
            if judged and sh.reward_url is None and self.best_of_n is None:
                raise _At("shadow", SHADOW_NEEDS_REWARD)
        _check_tenants(self.tenants, names)
        p = self.router.personalization
        if p is not None and p.enabled and (self.router.classifier is None or len(names) < 2):
            raise _At("router.personalization.enabled", PERSONALIZATION_NEEDS_N_TIER)
        return self

    @property
    def unauthenticated_allowed(self) -> bool:
        """Whether a request without an API key is served (the default follows whether tenants are declared)."""
        if self.unauthenticated is None:
            return not self.tenants
        return self.unauthenticated is UnauthenticatedAccess.ALLOW

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def strongest(self) -> Tier:
        return self.tiers[-1]

    def effective_fallback_order(self) -> list[str]:
        return list(self.router.fallback_order) or [t.name for t in reversed(self.tiers)]


def _check_tenants(tenants: list[Tenant], tiers: list[str]) -> None:
    seen: set[str] = set()
    for i, t in enumerate(tenants):
        if t.name in seen:
            raise _At(f"tenants[{i}].name", f"duplicate tenant name {t.name!r}")
        seen.add(t.name)
        for j, tier in enumerate(t.tiers or []):
            if tier not in tiers:
                raise _At(f"tenants[{i}].tiers[{j}]", f"names no tier: {tier!r} (tiers: {', '.join(tiers)})")


class _At(ValueError):
    """A cross-field error that knows which field (relative to the model raising it) is wrong."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


class _Observed(BaseModel):
    """Base of what the API server reports (metadata, status): extra fields it adds are ignored, not errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
        use_attribute_docstrings=True,
    )


class ObjectMeta(_Observed):
    """The parts of metadata we read. Everything else the API server adds is ignored, not rejected."""

    name: Annotated[str, Field(min_length=1, max_length=MAX_POLICY_NAME, pattern=DNS_LABEL_PATTERN)]
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


# --- status -----------------------------------------------------------------------------------------------------


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Observed):
    """metav1.Condition."""

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    observed_generation: int | None = None
    last_transition_time: Annotated[str, Field(json_schema_extra={"format": "date-time"})] | None = None


class TierStatus(_Observed):
    name: str
    desired_replicas: int = 0
    ready_replicas: int = 0
    endpoint: str | None = None
    reachable: bool | None = None
    """External tiers: whether `GET {endpoint}/models` got an answer below HTTP 500 at the operator's last check."""
    message: str | None = None
    """External tiers: what that check got (HTTP status, or the error)."""


class RewardModelStatus(_Observed):
    """The best-of-N reward model (present while spec.bestOfN is set)."""

    model: str
    """The model it serves, also its served model name (what the router names in its scoring calls)."""
    desired_replicas: int = 0
    ready_replicas: int = 0
    endpoint: str | None = None
    """In-cluster root URL of its server (the `<policy>-reward` Service), where the router posts `/pooling`."""


class MixEntry(_Observed):
    """One tier's share of the requests the routers answered in the window (spec.observedMix.windowSeconds)."""

    tier: str
    share_basis_points: int
    """Share of the requests answered in the window that this tier answered (0..10000)."""
    requests: int = 0
    """Requests this tier answered in the window, summed over the router replicas."""
    predicted_share_basis_points: int | None = None
    """The share of routed requests the routers' operating point predicts for this tier (the classifier artifact's
    calibration at the policy's knob); absent when the routers predict none."""


class ObservedMixWindow(_Observed):
    """What status.observedMix was computed from, and the rates of the same window."""

    window_seconds: int
    """How far back the window reaches (spec.observedMix.windowSeconds)."""
    requests: int
    """Requests the routers finished in the window (any outcome)."""
    fallback_basis_points: int
    """Moves to a fallback tier per request, in basis points (a request moved twice counts twice)."""
    escalation_basis_points: int
    """Best-of-N requests answered by the reference tier instead, per request, in basis points."""
    routers: int
    """Router pods whose /metrics the operator read in its last pass."""


class ShadowArtifactStatus(_Observed):
    """One classifier artifact's shadow judging over the window (pairs its decisions led to)."""

    artifact: str
    """primary, or canary (spec.router.canary)."""
    judged: int
    """Pairs the reward model judged in the window, summed over the router replicas."""
    agreement_basis_points: int | None = None
    """Of the judged pairs where the router chose another tier than the baseline, the share whose answer scored at
    least as high as the baseline's (0..10000); absent without such pairs."""
    pgr_basis_points: int | None = None
    """The estimated performance gap recovered against the baseline tier (docs/router.md, "Estimated PGR"), in basis
    points (10000: every gap recovered; it can leave 0..10000 when rewards are noisy); absent until the window's
    gap sum is positive."""


class ShadowStatus(_Observed):
    """Shadow routing's figures over the recent window, read from the routers' counters like observedMix."""

    window_seconds: int
    """How far back the window reaches (spec.observedMix.windowSeconds)."""
    artifacts: list[ShadowArtifactStatus] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["artifact"]},
    )


class TenantSpendState(StrEnum):
    OK = "Ok"
    LOW = "Low"
    SPENT = "Spent"


class TenantStatus(_Observed):
    """A tenant's spend today (UTC), as the routers counted it in the limit store (tenants with a budget, policies
    with spec.limitStore only)."""

    name: str
    day: str
    """The UTC day, YYYY-MM-DD."""
    spent_usd: str
    """USD spent that day, a decimal string."""
    daily_usd: str
    """The tenant's daily budget, as in its spec."""
    state: TenantSpendState
    """Ok, Low (routed cheaper) or Spent."""


class RoutingPolicyStatus(_Observed):
    observed_generation: int | None = None
    """The spec generation this status describes."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Ready, Progressing and Degraded; reason and message name the child that is not ready and why. With bestOfN,
    also RewardModelReady (False: no ready reward replica, the router answers from the reference tier), and MixDrift
    (True: the most expensive tier's observed share left spec.observedMix's band around its predicted share)."""
    tiers: list[TierStatus] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Per tier: desired and ready replicas and the in-cluster endpoint."""
    router_endpoint: str | None = None
    """The router's in-cluster URL (OpenAI-compatible HTTP)."""
    reward_model: RewardModelStatus | None = None
    """The best-of-N reward model: replicas and endpoint (condition RewardModelReady says whether it can score)."""
    shadow_mode: ShadowMode | None = None
    """spec.shadow's mode while shadow routing is on (Baseline: the baseline tier answers everything)."""
    shadow: ShadowStatus | None = None
    """With spec.shadow: per artifact, pairs judged, agreement and the estimated PGR over the recent window."""
    tier_names: str | None = None
    """The tiers' names, comma-separated, cheapest first (for printing: a printer column shows one value only)."""
    ready_tiers: str | None = None
    """Ready tiers over all tiers, e.g. 2/3 (for printing)."""
    observed_mix: list[MixEntry] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["tier"]},
    )
    """Per tier, the share of requests the routers answered in the recent window, next to the share their operating
    point predicts (the operator reads the router pods' /metrics: docs/operator.md, "Observed mix")."""
    observed_mix_window: ObservedMixWindow | None = None
    """The window behind observedMix: its length, requests, fallback and best-of-N escalation rates."""
    tenants: list[TenantStatus] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Per tenant with a daily budget: today's spend (the operator reads it from the limit store every minute)."""


class RoutingPolicy(_Observed):
    """A whole RoutingPolicy object as the API server stores it (or as a manifest file holds it)."""

    api_version: Literal["tiergate.io/v1alpha1"]
    kind: Literal["RoutingPolicy"]
    metadata: ObjectMeta
    spec: RoutingPolicySpec
    status: RoutingPolicyStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str | None:
        return self.metadata.namespace

    def to_manifest(self, *, include_status: bool = False) -> dict[str, Any]:
        """The manifest form (camelCase, defaults filled in, no nulls): what the router's ConfigMap holds."""
        exclude = None if include_status else {"status"}
        out: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=exclude)
        return out


# --- loading ----------------------------------------------------------------------------------------------------


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-plain") or part.startswith(("function-", "constrained-")):
            continue  # pydantic's validator wrappers, not fields
        else:
            out += ("." if out else "") + part
    return out


def _field_errors(e: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[FieldError]:
    out: list[FieldError] = []
    for err in e.errors(include_url=False):
        loc = prefix + tuple(err["loc"])
        msg = err["msg"]
        ctx = err.get("ctx") or {}
        cause = ctx.get("error")
        if isinstance(cause, _At):
            loc = (*loc, *_split_path(cause.path))
            msg = cause.message
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append(FieldError(_loc_to_path(loc), msg))
    return out


def _split_path(path: str) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    for token in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        parts.append(int(token[1:-1]) if token.startswith("[") else token)
    return tuple(parts)


def parse_policy(obj: Mapping[str, Any], source: str | None = None) -> RoutingPolicy:
    """Validate a RoutingPolicy given as a mapping (a parsed manifest or the body the API server sent).

    Raises PolicyValidationError listing every problem with its field path (`spec.tiers[0].replicas`)."""
    if not isinstance(obj, Mapping):
        raise PolicyParseError(f"a RoutingPolicy is a mapping, got {type(obj).__name__}")
    try:
        return RoutingPolicy.model_validate(dict(obj))
    except ValidationError as e:
        raise PolicyValidationError(_field_errors(e), source) from e


def parse_spec(spec: Mapping[str, Any]) -> RoutingPolicySpec:
    """Validate only a spec (what a kopf handler receives as `spec`); paths start with `spec.`."""
    try:
        return RoutingPolicySpec.model_validate(dict(spec))
    except ValidationError as e:
        raise PolicyValidationError(_field_errors(e, ("spec",))) from e


def load_policy(path_or_text: str | Path) -> RoutingPolicy:
    """Load a RoutingPolicy manifest from a file path or from YAML/JSON text.

    A `Path`, or a string naming an existing file, is read; any other string is parsed as the manifest itself.
    A multi-document file must hold exactly one RoutingPolicy (other kinds are skipped, so a file that also
    carries the policy's ConfigMap loads)."""
    source: str | None = None
    if isinstance(path_or_text, Path) or ("\n" not in path_or_text and Path(path_or_text).is_file()):
        path = Path(path_or_text)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise PolicyParseError(f"cannot read {path}: {e}") from e
    else:
        text = str(path_or_text)
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise PolicyParseError(f"not valid YAML{' in ' + source if source else ''}: {e}") from e
    policies = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(docs) == 1 and not policies:
        return parse_policy(docs[0] if isinstance(docs[0], dict) else {"_": docs[0]}, source)
    if len(policies) != 1:
        raise PolicyParseError(
            f"expected exactly one {KIND} document{' in ' + source if source else ''}, found {len(policies)}"
        )
    return parse_policy(policies[0], source)


def dump_policy(policy: RoutingPolicy) -> str:
    """YAML of the manifest form; `load_policy(dump_policy(p)) == p`."""
    return yaml.safe_dump(policy.to_manifest(), sort_keys=False)


def policy_json(policy: RoutingPolicy) -> str:
    """Canonical JSON (sorted keys): stable bytes for hashing and for the router's ConfigMap."""
    return json.dumps(policy.to_manifest(), sort_keys=True, separators=(",", ":"))
