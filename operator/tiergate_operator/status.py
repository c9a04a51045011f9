"""Pure status computation: the policy plus its children's observed state -> `.status` (conditions, not phases).

Ready      True when every deployed component has all desired replicas updated and ready.
Progressing True while a component is being created or rolled out and nothing is known to be wrong.
Degraded   True when a component cannot become ready without outside help: pods the scheduler cannot place
           (no node with enough GPUs, no node in the pool), image pulls failing, crash loops, a rollout past its
           progress deadline. Reason and message name the component and quote the cluster's own words.

MixDrift   (once the routers' /metrics have been read: observed_mix.py) True when the most expensive tier's share
           of the requests answered in the window leaves spec.observedMix's band around the predicted share; Unknown
           without a prediction, without enough requests, or when no router answered.

RewardModelReady (only with spec.bestOfN) True while the reward model has a ready replica: it says whether best-of-N
           is in effect, not whether the policy serves. Without a ready reward replica the router answers best-of-N
           prompts from the reference tier, so the reason (RewardModelUnavailable) and message name the reward model
           rather than leaving it to be found in Ready's list.

AutoscalerReady (only with a tier in autoscaling mode HPA or KEDA) whether the autoscalers the operator owns can
           scale, from their own conditions (autoscaler_status.py): False, with the autoscaler's reason (e.g.
           FailedGetExternalMetric) and message, when one cannot read its metrics or the scale; Unknown until each has
           reported. A failing one also keeps Ready False: a tier that cannot scale is not what the policy asks for.

A spec the operator refuses (refused_status) is not applied at all, so its children stay as the last good spec
made them, and all three conditions say why with the field: InvalidSpec (the typed model rejects what the CRD let
through, e.g. under an older CRD), MissingReference (a ConfigMap the pods would read does not exist) or
KedaNotInstalled (a tier's autoscaling mode is KEDA and the API server serves no ScaledObjects).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tiergate.api import naming
from tiergate.api.errors import FieldError
from tiergate.api.policy import RoutingPolicy

from .autoscaler_status import AUTOSCALER_READY, autoscaler_verdict
from .external import ExternalCheck, models_url
from .observed_mix import MIX_DRIFT, MixReport

Obj = Mapping[str, Any]

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED)
REWARD_MODEL_READY = "RewardModelReady"
# Reasons of RewardModelReady.
REWARD_MODEL_AVAILABLE = "RewardModelAvailable"
REWARD_MODEL_UNAVAILABLE = "RewardModelUnavailable"

# An external tier whose endpoint does not answer (external.probe), and one not checked yet.
EXTERNAL_UNREACHABLE = "ExternalTierUnreachable"
EXTERNAL_CHECKING = "CheckingExternalTier"

# Reasons of a refused spec (SpecProblem.reason).
INVALID_SPEC = "InvalidSpec"
MISSING_REFERENCE = "MissingReference"
# A tier asks for autoscaling mode KEDA where the API server serves no ScaledObjects (autoscaling.keda_unavailable).
KEDA_NOT_INSTALLED = "KedaNotInstalled"
_REFUSAL_WORDS = {INVALID_SPEC: "invalid spec", MISSING_REFERENCE: "missing reference", KEDA_NOT_INSTALLED: "KEDA"}

# Container waiting reasons that will not fix themselves.
_STUCK_WAITING = {
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
}
# Messages can be long (one line per node group); status stays readable and well under etcd's limits.
_MAX_MESSAGE = 1024


@dataclass(frozen=True)
class Component:
    """One deployed part of the policy: a tier's model server, the router or the reward model."""

    label: str  # how messages name it: "tier large", "router", "reward model <model>"
    deployment: str
    component: str
    tier: str | None
    desired: int | None  # None: an autoscaler owns the count; read it from the Deployment
    # An external tier (`endpoint.url`): nothing deployed; its state is the operator's last check of this URL.
    external_url: str | None = None


@dataclass(frozen=True)
class ComponentState:
    component: Component
    desired: int
    ready: int
    updated: int
    exists: bool
    rolled_out: bool  # the Deployment controller has seen the latest spec and finished the rollout
    problem: tuple[str, str] | None  # (reason, message) when Degraded

    @property
    def is_ready(self) -> bool:
        return self.exists and self.rolled_out and self.ready >= self.desired and self.problem is None


def components(policy: RoutingPolicy) -> list[Component]:
    out: list[Component] = []
    for t in policy.spec.tiers:
        if t.external:
            continue
        desired = None if t.autoscaled else t.replicas.min
        out.append(
            Component(f"tier {t.name}", naming.tier_name(policy.name, t.name), naming.COMPONENT_TIER, t.name, desired)
        )
    out.append(
        Component("router", naming.router_name(policy.name), naming.COMPONENT_ROUTER, None, policy.spec.router.replicas)
    )
    if policy.spec.best_of_n is not None:
        rm = policy.spec.best_of_n.reward_model
        # Named by its model too: "reward model" alone says nothing to someone reading Ready's list of components.
        out.append(
            Component(
                f"reward model {rm.model}", naming.reward_name(policy.name), naming.COMPONENT_REWARD, None, rm.replicas
            )
        )
    return out


def external_state(tier: str, url: str, check: ExternalCheck | None) -> ComponentState:
    """An external tier as a component: ready when the last check got an answer, Degraded when it did not, waiting
    (not ready, no problem) until the first check is in."""
    c = Component(f"tier {tier} (external)", "", "external", tier, 1, external_url=url)
    if check is None:
        return ComponentState(c, 1, 0, 0, True, False, None)
    problem = None if check.ok else (EXTERNAL_UNREACHABLE, check.message)
    return ComponentState(c, 1, int(check.ok), 1, True, True, problem)


def _pods_of(c: Component, pods: Iterable[Obj]) -> list[Obj]:
    out = []
    for p in pods:
        labels = p.get("metadata", {}).get("labels", {}) or {}
        if labels.get(naming.COMPONENT_LABEL) != c.component:
            continue
        if c.tier is not None and labels.get(naming.TIER_LABEL) != c.tier:
            continue
        if p.get("metadata", {}).get("deletionTimestamp"):
            continue  # terminating pods of an old ReplicaSet say nothing about the new one
        out.append(p)
    return out


def pod_problem(pod: Obj) -> tuple[str, str] | None:
    """(reason, message) when this pod is stuck: unschedulable, or a container that cannot start."""
    status = pod.get("status", {}) or {}
    name = pod.get("metadata", {}).get("name", "?")
    for cond in status.get("conditions", []) or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return "Unschedulable", f"pod {name} cannot be scheduled: {cond.get('message', '').strip()}"
    for cs in status.get("containerStatuses", []) or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _STUCK_WAITING:
            msg = (waiting.get("message") or "").strip()
            return waiting["reason"], f"pod {name} container {cs.get('name')}: {waiting['reason']}" + (
                f": {msg}" if msg else ""
            )
    return None


def component_state(c: Component, deployment: Obj | None, pods: Sequence[Obj]) -> ComponentState:
    if deployment is None:
        return ComponentState(c, c.desired or 0, 0, 0, False, False, None)
    spec = deployment.get("spec", {}) or {}
    st = deployment.get("status", {}) or {}
    desired = c.desired if c.desired is not None else int(spec.get("replicas", 1))
    ready = int(st.get("readyReplicas", 0) or 0)
    updated = int(st.get("updatedReplicas", 0) or 0)
    replicas = int(st.get("replicas", 0) or 0)
    generation = deployment.get("metadata", {}).get("generation", 0)
    seen = int(st.get("observedGeneration", 0) or 0) >= int(generation or 0)
    # Rolled out: the controller saw this spec, every replica runs it, and no old pods linger.
    rolled_out = seen and updated >= desired and replicas <= desired
    problem: tuple[str, str] | None = None
    for p in _pods_of(c, pods):
        prob = pod_problem(p)
        if prob is not None:
            problem = prob
            break
    if problem is None:
        for cond in st.get("conditions", []) or []:
            if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
                problem = ("ProgressDeadlineExceeded", cond.get("message", "rollout exceeded its progress deadline"))
            if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
                problem = (cond.get("reason") or "ReplicaFailure", cond.get("message", ""))
    return ComponentState(c, desired, ready, updated, True, rolled_out, problem)


def _condition(
    type_: str,
    status: bool | str | None,
    reason: str,
    message: str,
    generation: int | None,
    previous: Mapping[str, Obj],
    now: str,
) -> dict[str, Any]:
    """metav1.Condition; `status` a bool, None for "Unknown", or the string itself ("Unknown")."""
    value = "Unknown" if status is None else status if isinstance(status, str) else ("True" if status else "False")
    prev = previous.get(type_)
    # lastTransitionTime moves only when the status flips (Kubernetes API conventions).
    since = prev.get("lastTransitionTime") if prev and prev.get("status") == value else None
    cond: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:_MAX_MESSAGE],
        "lastTransitionTime": since or now,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def compute_status(
    policy: RoutingPolicy,
    deployments: Mapping[str, Obj],
    pods: Sequence[Obj],
    previous_conditions: Sequence[Obj] = (),
    now: str = "1970-01-01T00:00:00Z",
    router_problem: tuple[str, str] | None = None,
    external: Mapping[str, ExternalCheck | None] | None = None,
    mix: MixReport | None = None,
    autoscalers: Mapping[tuple[str, str], Obj] | None = None,
) -> dict[str, Any]:
    """The whole `.status`. `deployments` maps Deployment name -> object; `pods` are the policy's pods.
    `mix`: the last observed-mix report of the policy's routers (observed_mix.py; None before the first read:
    observedMix and MixDrift are then left out).
    `external` maps an external tier's name to the last check of its endpoint (`external.ExternalChecks`; absent or
    None: not checked yet, so the tier is not counted ready).
    `router_problem` (reason, message): what keeps the router from serving what the policy says, seen by the
    operator rather than in a pod (a classifier artifact it refused). It is the router's problem before any of its
    pods' (a pod waiting for a classifier that never came is the symptom), so the policy is Degraded, not
    RollingOut forever.
    `autoscalers`: the policy's HPAs and ScaledObjects by (kind, name), as cached (None: not observed, and no
    AutoscalerReady condition)."""
    gen = policy.metadata.generation
    previous = {c.get("type", ""): c for c in previous_conditions}
    states = [component_state(c, deployments.get(c.deployment), pods) for c in components(policy)]
    if router_problem is not None:
        states = [
            dataclasses.replace(s, problem=router_problem) if s.component.component == naming.COMPONENT_ROUTER else s
            for s in states
        ]
    for t in policy.spec.tiers:
        if t.endpoint is not None:
            states.append(external_state(t.name, t.endpoint.url, (external or {}).get(t.name)))
    by_tier = {s.component.tier: s for s in states if s.component.tier is not None}

    tiers: list[dict[str, Any]] = []
    ready_tiers = 0
    for t in policy.spec.tiers:
        s = by_tier[t.name]
        if t.endpoint is not None:
            ready_tiers += s.is_ready
            check = (external or {}).get(t.name)
            entry: dict[str, Any] = {
                "name": t.name,
                "desiredReplicas": 0,
                "readyReplicas": 0,
                "endpoint": t.endpoint.url,
            }
            if check is not None:
                entry.update(reachable=check.ok, message=check.message)
            tiers.append(entry)
            continue
        ready_tiers += s.is_ready
        tiers.append(
            {
                "name": t.name,
                "desiredReplicas": s.desired,
                "readyReplicas": s.ready,
                "endpoint": naming.tier_service_url(policy.name, policy.namespace or "default", t.name, t.engine.port),
            }
        )

    degraded = [s for s in states if s.problem is not None]
    waiting = [s for s in states if not s.is_ready and s.problem is None]
    autoscaling = autoscaler_verdict(policy, autoscalers) if autoscalers is not None else None
    blind = list(autoscaling.blind) if autoscaling is not None else []
    conds: list[dict[str, Any]] = []
    if not degraded and not waiting and autoscaling is not None and blind:
        conds.append(_condition(READY, False, autoscaling.reason, "; ".join(blind), gen, previous, now))
    elif not degraded and not waiting:
        conds.append(_condition(READY, True, "AllComponentsReady", _ready_summary(states), gen, previous, now))
    else:
        first = (degraded or waiting)[0]
        reason = first.problem[0] if first.problem else ("Creating" if not first.exists else "RollingOut")
        if first.problem is None and first.component.external_url is not None:
            reason = EXTERNAL_CHECKING
        msg = "; ".join([_describe(s) for s in degraded + waiting] + blind)
        conds.append(_condition(READY, False, reason, msg, gen, previous, now))
    if waiting:
        reason = "Creating" if any(not s.exists for s in waiting) else "RollingOut"
        if all(s.component.external_url is not None for s in waiting):
            reason = EXTERNAL_CHECKING
        conds.append(
            _condition(PROGRESSING, True, reason, "; ".join(_describe(s) for s in waiting), gen, previous, now)
        )
    else:
        conds.append(_condition(PROGRESSING, False, "Stable", "no rollout in progress", gen, previous, now))
    if degraded:
        d = degraded[0]
        assert d.problem is not None
        msg = "; ".join(_describe(s) for s in degraded)
        conds.append(_condition(DEGRADED, True, d.problem[0], msg, gen, previous, now))
    else:
        conds.append(_condition(DEGRADED, False, "Healthy", "no component is stuck", gen, previous, now))

    reward = next((s for s in states if s.component.component == naming.COMPONENT_REWARD), None)
    if reward is not None:
        conds.append(_reward_condition(reward, gen, previous, now))
    if mix is not None:
        drift = mix.drift
        conds.append(_condition(MIX_DRIFT, drift.status, drift.reason, drift.message, gen, previous, now))
    if autoscaling is not None:
        a = autoscaling
        conds.append(_condition(AUTOSCALER_READY, a.status, a.reason, a.message, gen, previous, now))

    status: dict[str, Any] = {
        "conditions": conds,
        "tiers": tiers,
        "tierNames": ",".join(t.name for t in policy.spec.tiers),
        "readyTiers": f"{ready_tiers}/{len(policy.spec.tiers)}",
        "routerEndpoint": f"http://{naming.router_name(policy.name)}.{policy.namespace}.svc:"
        f"{policy.spec.router.http_port}/v1",
    }
    if reward is not None:
        status["rewardModel"] = reward_model_status(policy, reward)
    if mix is not None:
        status["observedMix"] = mix.observed_mix()
        status["observedMixWindow"] = mix.observed_mix_window()
        shadow = mix.shadow_status()
        if shadow is not None:
            status["shadow"] = shadow
    if policy.spec.shadow is not None:
        status["shadowMode"] = policy.spec.shadow.mode.value
    if gen is not None:
        status["observedGeneration"] = gen
    return status


def reward_model_status(policy: RoutingPolicy, s: ComponentState) -> dict[str, Any]:
    """`.status.rewardModel`: the reward model's replicas and the URL the router scores at (`naming.reward_url`)."""
    assert policy.spec.best_of_n is not None
    rm = policy.spec.best_of_n.reward_model
    return {
        "model": rm.model,
        "desiredReplicas": s.desired,
        "readyReplicas": s.ready,
        "endpoint": naming.reward_url(policy.name, policy.namespace or "default", rm.port),
    }


def _reward_condition(
    s: ComponentState, generation: int | None, previous: Mapping[str, Obj], now: str
) -> dict[str, Any]:
    """RewardModelReady: one ready replica is enough to score (the Service balances over whichever are ready), so
    a rollout or a lost replica of several does not turn it False; none, or a count of zero asked for, does."""
    if s.exists and s.ready > 0:
        return _condition(REWARD_MODEL_READY, True, REWARD_MODEL_AVAILABLE, _describe(s), generation, previous, now)
    zero = f"{s.component.label}: 0 replicas asked for (spec.bestOfN.rewardModel.replicas)"
    why = zero if s.exists and s.desired == 0 else _describe(s)
    msg = f"{why}; until a replica is ready the router answers best-of-N prompts from the reference tier"
    return _condition(REWARD_MODEL_READY, False, REWARD_MODEL_UNAVAILABLE, msg, generation, previous, now)


@dataclass(frozen=True)
class SpecProblem:
    """Why the operator refuses to apply the policy's current generation. `field` is the manifest path of the first
    problem (`spec.tiers[0].engine.env[1].valueFrom.configMapKeyRef`); `message` names it too, with the others."""

    reason: str  # INVALID_SPEC, MISSING_REFERENCE or KEDA_NOT_INSTALLED
    field: str
    message: str


def invalid_spec(errors: Sequence[FieldError]) -> SpecProblem:
    """The problem a PolicyValidationError reports: every field error, first field first."""
    first = errors[0].path if errors else "spec"
    return SpecProblem(INVALID_SPEC, first, "; ".join(str(e) for e in errors) or "the policy does not validate")


def refused_status(
    previous: Obj, problem: SpecProblem, generation: int | None, now: str = "1970-01-01T00:00:00Z"
) -> dict[str, Any]:
    """`.status` of a policy whose current generation is refused. Nothing was applied, so what the previous status
    says about the children (tiers, endpoints) still holds and is kept; the conditions say the spec is not in
    effect, why, and that the children were left alone. observedGeneration is the refused generation: the operator
    did look at it (a client waiting for observedGeneration to catch up sees the verdict instead of waiting)."""
    prev = {c.get("type", ""): c for c in previous.get("conditions") or []}
    what = _REFUSAL_WORDS.get(problem.reason, problem.reason)
    msg = f"{what}: {problem.message}; nothing applied, the children are left as they were"
    status = {k: v for k, v in previous.items() if k not in ("conditions", "observedGeneration")}
    status["conditions"] = [
        _condition(READY, False, problem.reason, msg, generation, prev, now),
        _condition(PROGRESSING, False, problem.reason, "waiting for the spec to be fixed", generation, prev, now),
        _condition(DEGRADED, True, problem.reason, msg, generation, prev, now),
        # What the others say about a child (RewardModelReady) still holds: the children were left alone.
        *(c for t, c in prev.items() if t not in CONDITION_TYPES),
    ]
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def _describe(s: ComponentState) -> str:
    c = s.component
    if c.external_url is not None:
        if s.problem is not None:
            return f"{c.label}: unreachable: {s.problem[1]}"
        return f"{c.label}: " + (f"reachable ({models_url(c.external_url)})" if s.is_ready else "not checked yet")
    if not s.exists:
        return f"{c.label}: Deployment {c.deployment} not created yet"
    base = f"{c.label}: {s.ready}/{s.desired} ready"
    if s.problem is not None:
        return f"{base}: {s.problem[1]}"
    if not s.rolled_out:
        return f"{base}, rollout in progress ({s.updated}/{s.desired} updated)"
    return base


def _ready_summary(states: Sequence[ComponentState]) -> str:
    return ", ".join(
        f"{s.component.label} reachable" if s.component.external_url else f"{s.component.label} {s.ready}/{s.desired}"
        for s in states
    )


def status_changed(old: Obj | None, new: Obj) -> bool:
    """Compare ignoring lastTransitionTime, so an unchanged status is not rewritten (and emits no watch event)."""

    def strip(st: Obj | None) -> dict[str, Any]:
        st = dict(st or {})
        st.pop("tenants", None)  # written by the spend reporter (tenant_spend.py), on its own clock
        st["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in (st.get("conditions") or [])
        ]
        return st

    return strip(old) != strip(new)
