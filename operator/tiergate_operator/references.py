"""The objects a policy's pods would read that the operator does not create, checked before anything is applied.

A Deployment whose pods name a ConfigMap that does not exist rolls out pods that never start (the kubelet reports
CreateContainerConfigError, and only on a real node). Checking first lets the operator refuse the generation
instead (status MissingReference naming the field, children left as the last good spec made them) and apply it
as soon as the ConfigMap appears (the ConfigMap metadata watch brings the change; `configmaps_named` tells the
controller which policies to look at again).

Checked: `spec.tiers[].engine.env[].valueFrom.configMapKeyRef` and `spec.router.canary.classifier.configMap` (the
ConfigMap and its key; the canary's artifact itself is checked by classifier.py). The primary classifier
ConfigMap has its own handling (classifier.py: ClassifierMissing, the last good copy keeps serving). Not checked:
Secrets (`apiKeySecretRef`, `secretKeyRef`): any verb that reveals whether a Secret exists also returns its data,
and the operator is deliberately not allowed to read Secrets. A missing Secret shows when a pod fails to start
(Degraded, reason CreateContainerConfigError, quoting the kubelet).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tiergate.api.policy import RoutingPolicy

from .classifier import (
    CANARY_CONFIGMAP,
    DEFAULT_KIND,
    TWO_TIER_KNOBS,
    canary_source_of,
    canary_source_ref,
    source_of,
    two_tier_overflow,
)
from .status import INVALID_SPEC, MISSING_REFERENCE, SpecProblem

Obj = Mapping[str, Any]


def _config_map_refs(policy: RoutingPolicy) -> list[tuple[str, str, str]]:
    """(field, ConfigMap name, key) of every ConfigMap key a deployed tier's environment or the canary names."""
    out = []
    canary = canary_source_ref(policy)
    if canary is not None:
        out.append((CANARY_CONFIGMAP, *canary))
    for i, t in enumerate(policy.spec.tiers):
        if t.external:
            continue
        for j, e in enumerate(t.engine.env):
            ref = e.value_from.config_map_key_ref if e.value_from is not None else None
            if ref is not None:
                out.append((f"spec.tiers[{i}].engine.env[{j}].valueFrom.configMapKeyRef", ref.name, ref.key))
    return out


def missing_references(policy: RoutingPolicy, get_config_map: Callable[[str], Obj | None]) -> SpecProblem | None:
    """The first field naming a ConfigMap (or a key of one) that is absent, with every such field in the message;
    None when all exist. `get_config_map(name)` reads one ConfigMap of the policy's namespace (None: absent);
    each is read once."""
    ns = policy.namespace or "default"
    seen: dict[str, Obj | None] = {}
    problems: list[tuple[str, str]] = []
    for field, name, key in _config_map_refs(policy):
        if name not in seen:
            seen[name] = get_config_map(name)
        cm = seen[name]
        if cm is None:
            problems.append((field, f"ConfigMap {ns}/{name} does not exist"))
        elif key not in (cm.get("data") or {}) and key not in (cm.get("binaryData") or {}):
            problems.append((field, f"ConfigMap {ns}/{name} has no key {key!r}"))
    if not problems:
        return None
    return SpecProblem(MISSING_REFERENCE, problems[0][0], "; ".join(f"{f}: {m}" for f, m in problems))


def unservable_tiers(policy: RoutingPolicy) -> SpecProblem | None:
    """A policy that names no classifier gets the router's shipped two-tier default, which takes no N-tier knob and
    cannot choose among more than two tiers (`classifier.two_tier_overflow`): refused as an invalid spec naming the
    field, as the router would refuse it. (A classifier
    ConfigMap's artifact is checked with the artifact: ClassifierInvalid. A path inside the router image is the
    router's to check: it refuses the policy.)"""
    if policy.spec.router.classifier is not None:
        return None
    knob = next(iter(policy.spec.router.decision_knobs()), None)
    if knob is not None and knob not in TWO_TIER_KNOBS:
        field = f"spec.router.{knob}"
        kinds = "an N-tier knob, but the shipped default router (no spec.router.classifier) is a two-tier artifact"
        return SpecProblem(INVALID_SPEC, field, f"{field}: {kinds}")
    why = two_tier_overflow(policy, DEFAULT_KIND, "the shipped default router (no spec.router.classifier)")
    return None if why is None else SpecProblem(INVALID_SPEC, "spec.tiers", f"spec.tiers: {why}")


def configmaps_named(body: Obj) -> set[str]:
    """Every ConfigMap a raw policy body names (classifiers and tier environments), without validation: which
    policies a ConfigMap event concerns."""
    names = {n for n in [source_of(body), canary_source_of(body)] if n}
    for t in (body.get("spec") or {}).get("tiers") or []:
        if not isinstance(t, Mapping):
            continue
        for e in ((t.get("engine") or {}).get("env")) or []:
            ref = ((e.get("valueFrom") or {}).get("configMapKeyRef") or {}) if isinstance(e, Mapping) else {}
            name = ref.get("name") if isinstance(ref, Mapping) else None
            if isinstance(name, str) and name:
                names.add(name)
    return names
