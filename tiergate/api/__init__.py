"""The RoutingPolicy API (tiergate.io/v1alpha1): typed model, loading, and the CRD's source of truth."""

from .errors import FieldError, PolicyError, PolicyParseError, PolicyValidationError
from .policy import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    RoutingPolicy,
    RoutingPolicySpec,
    RoutingPolicyStatus,
    Tier,
    load_policy,
    parse_policy,
    parse_spec,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "FieldError",
    "PolicyError",
    "PolicyParseError",
    "PolicyValidationError",
    "RoutingPolicy",
    "RoutingPolicySpec",
    "RoutingPolicyStatus",
    "Tier",
    "load_policy",
    "parse_policy",
    "parse_spec",
]
