"""Pure: whether the autoscalers the operator owns can scale, from their own status -> the AutoscalerReady condition.

An HPA whose metrics cannot be read (no metrics adapter, a rule that serves no series, a selector that matches
nothing) still exists and still looks fine from the Deployment's side: the tier just never scales. The HPA controller
says so in the HPA's own conditions (`ScalingActive` False, reason `FailedGetExternalMetric`, `FailedGetPodsMetric`,
...; `AbleToScale` False when it cannot read or write the scale), and KEDA in its ScaledObject's `Ready` condition.
This module reads those, so the policy is not shown Ready while its autoscaling is blind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tiergate.api import naming
from tiergate.api.policy import AutoscalingMode, RoutingPolicy

Obj = Mapping[str, Any]

HPA_KIND = "HorizontalPodAutoscaler"
KEDA_KIND = "ScaledObject"
_KIND_OF_MODE = {AutoscalingMode.HPA: HPA_KIND, AutoscalingMode.KEDA: KEDA_KIND}
# The HPA conditions that say it cannot do its work when False (ScalingLimited True only says it hit a bound).
_HPA_WORKING = ("AbleToScale", "ScalingActive")

AUTOSCALER_READY = "AutoscalerReady"
# Reasons of AutoscalerReady when not failing (a failing one carries the autoscaler's own reason).
AUTOSCALERS_ACTIVE = "AutoscalersActive"
AUTOSCALER_PENDING = "AutoscalerPending"


@dataclass(frozen=True)
class AutoscalerVerdict:
    """AutoscalerReady: `status` True (all can scale), False (`blind` names those that cannot) or None (Unknown: some
    have not reported yet, none fails). `reason` is the first failing autoscaler's own reason."""

    status: bool | None
    reason: str
    message: str
    blind: tuple[str, ...] = ()


def _false_condition(obj: Obj | None, types: tuple[str, ...]) -> tuple[str, str, str] | None:
    """(type, reason, message) of the first condition of `types` that is False."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") in types and cond.get("status") == "False":
            return str(cond["type"]), str(cond.get("reason") or cond["type"]), str(cond.get("message") or "").strip()
    return None


def _reported(obj: Obj | None, types: tuple[str, ...]) -> bool:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") in types and c.get("status") in ("True", "False") for c in conds)


def autoscaler_verdict(policy: RoutingPolicy, autoscalers: Mapping[tuple[str, str], Obj]) -> AutoscalerVerdict | None:
    """AutoscalerReady from the HPAs and ScaledObjects of the policy (`autoscalers`, keyed (kind, name), as cached);
    None when no tier has an autoscaler the operator makes (mode HPA or KEDA)."""
    scaled = [
        (t.name, _KIND_OF_MODE[t.autoscaling.mode])
        for t in policy.spec.tiers
        if t.autoscaling is not None and t.autoscaling.mode in _KIND_OF_MODE
    ]
    if not scaled:
        return None
    blind: list[tuple[str, str]] = []  # (reason, description)
    pending: list[str] = []
    active: list[str] = []
    for tier, kind in scaled:
        name = naming.tier_name(policy.name, tier)
        obj = autoscalers.get((kind, name))
        types = _HPA_WORKING if kind == HPA_KIND else ("Ready",)
        what = f"tier {tier}: {kind} {name}"
        failed = _false_condition(obj, types)
        if obj is None:
            pending.append(f"{what} not created yet")
        elif failed is not None:
            ctype, reason, msg = failed
            blind.append((reason, f"{what} cannot scale ({ctype} False, {reason})" + (f": {msg}" if msg else "")))
        elif not _reported(obj, types):
            pending.append(f"{what} has not reported yet")
        else:
            active.append(f"{what} active")
    if blind:
        message = "; ".join([d for _, d in blind] + pending)
        return AutoscalerVerdict(False, blind[0][0], message, tuple(d for _, d in blind))
    if pending:
        return AutoscalerVerdict(None, AUTOSCALER_PENDING, "; ".join(pending + active))
    return AutoscalerVerdict(True, AUTOSCALERS_ACTIVE, "; ".join(active))
