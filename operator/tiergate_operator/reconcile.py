"""One reconcile of one RoutingPolicy: apply what the builders say, prune what they no longer say, report status.

Blocking (runs in a worker thread). Idempotent: running it twice, or after a crash half-way, converges to the
same objects, because children have deterministic names, are applied with server-side apply, and pruning is
by label + owner UID. That is what makes "kill the operator mid-reconcile" safe.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from tiergate.api import naming
from tiergate.api.policy import API_VERSION, KIND, RoutingPolicy, parse_policy

from .builders import KIND_ORDER, build_children, child_key
from .config import OperatorConfig
from .kube import Kube
from .status import compute_status, status_changed

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]  # (kind, name)


@dataclass
class PolicyMemory:
    """What the operator remembers about one policy between reconciles (in memory only; a restart re-lists)."""

    uid: str | None = None
    known: dict[Key, tuple[str, str]] = field(default_factory=dict)  # child -> (uid, change marker)
    pruned_generation: int | None = None
    reconciled_generation: int | None = None
    last_pruned_at: float = 0.0  # monotonic


@dataclass
class Outcome:
    policy: RoutingPolicy
    created: list[Key] = field(default_factory=list)
    updated: list[Key] = field(default_factory=list)
    deleted: list[Key] = field(default_factory=list)
    status: Obj = field(default_factory=dict)
    status_written: bool = False
    previous_conditions: list[Obj] = field(default_factory=list)


def selector(policy_name: str) -> str:
    return f"{naming.POLICY_LABEL}={policy_name},{naming.MANAGED_BY_LABEL}={naming.MANAGED_BY}"


def _marker(obj: Mapping[str, Any]) -> str:
    """Changes we did (or undid): the spec generation where the kind has one, else the resourceVersion. Deployments'
    and PDBs' resourceVersions also move on every status update, which is not a change of ours."""
    md = obj.get("metadata", {})
    if md.get("generation") is not None:
        return f"g{md['generation']}"
    return f"r{md.get('resourceVersion')}"


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj.get("metadata", {}).get("ownerReferences", []) or [])


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def reconcile(
    kube: Kube,
    body: Mapping[str, Any],
    cfg: OperatorConfig,
    memory: PolicyMemory,
    *,
    prune: bool,
    apply: bool = True,
    pool: Executor | None = None,
) -> Outcome:
    """Raises PolicyValidationError (spec unusable; retrying will not help) or KubeError (retryable or not).

    apply=False only refreshes status (a child's status changed, nothing of ours did). `pool` applies the children
    of one wave concurrently: the API server, not this process, is where the time goes."""
    policy = parse_policy(body)
    ns = policy.namespace or "default"
    uid = policy.metadata.uid or ""
    if memory.uid != uid:
        # A new incarnation of the same name: nothing remembered applies to it.
        memory.uid, memory.known, memory.pruned_generation = uid, {}, None
    out = Outcome(policy)
    desired = build_children(policy)
    wanted = {child_key(o) for o in desired}
    sel = selector(policy.name)

    existing: dict[Key, Obj] = {}
    if not apply:
        listed = {d["metadata"]["name"]: d for d in kube.list("Deployment", ns, sel)}
        return _finish(kube, body, policy, memory, out, listed)
    if prune:
        for kind in KIND_ORDER:
            for o in kube.list(kind, ns, sel):
                o.setdefault("kind", kind)
                existing[(kind, o["metadata"]["name"])] = o
        memory.known = {k: (o["metadata"]["uid"], _marker(o)) for k, o in existing.items() if k in wanted}

    deployments: dict[str, Obj] = {}
    started = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=1)
    # Two waves: everything the pods refer to (ServiceAccount, RBAC, ConfigMap) and the Services and PDBs first,
    # then the Deployments, so a new pod never starts before what it mounts or runs as exists.
    waves = [[o for o in desired if o["kind"] != "Deployment"], [o for o in desired if o["kind"] == "Deployment"]]
    for wave in waves:
        if pool is not None and len(wave) > 1:
            applied_wave = list(pool.map(lambda o: kube.apply(o, cfg.field_manager), wave))
        else:
            applied_wave = [kube.apply(o, cfg.field_manager) for o in wave]
        for obj, applied in zip(wave, applied_wave, strict=True):
            key = child_key(obj)
            applied.setdefault("kind", obj["kind"])
            new = (applied["metadata"]["uid"], _marker(applied))
            old = memory.known.get(key)
            if old is None and not prune:
                # Not listed first (a brand-new policy): it is new if the API server created it just now.
                if _created_since(applied, started):
                    out.created.append(key)
            elif old is None or old[0] != new[0]:
                out.created.append(key)
            elif old[1] != new[1]:
                out.updated.append(key)
            memory.known[key] = new
            if obj["kind"] == "Deployment":
                deployments[obj["metadata"]["name"]] = applied

    if prune:
        for key, o in existing.items():
            if key in wanted or not _owned_by(o, uid):
                continue
            if kube.delete(key[0], ns, key[1], uid=o["metadata"]["uid"]):
                out.deleted.append(key)
            memory.known.pop(key, None)
        memory.pruned_generation = policy.metadata.generation

    return _finish(kube, body, policy, memory, out, deployments)


def _created_since(obj: Mapping[str, Any], since: dt.datetime) -> bool:
    raw = obj.get("metadata", {}).get("creationTimestamp")
    if not raw:
        return False
    return dt.datetime.strptime(raw, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC) >= since


def _finish(
    kube: Kube,
    body: Mapping[str, Any],
    policy: RoutingPolicy,
    memory: PolicyMemory,
    out: Outcome,
    deployments: dict[str, Obj],
) -> Outcome:
    ns = policy.namespace or "default"
    pods = kube.list("Pod", ns, f"{naming.POLICY_LABEL}={policy.name}")
    current = body.get("status") or {}
    out.previous_conditions = list(current.get("conditions") or [])
    status = compute_status(policy, deployments, pods, out.previous_conditions, now_rfc3339())
    out.status = status
    if status_changed(current, status):
        kube.patch_status(KIND, ns, policy.name, status)
        out.status_written = True
    memory.reconciled_generation = policy.metadata.generation
    return out


def event_body(
    body: Mapping[str, Any], reason: str, message: str, *, warning: bool = False, reporter: str = "tiergate-operator"
) -> Obj:
    """A core/v1 Event about the policy (what `kubectl describe routingpolicy` lists). Takes the raw object so
    that even a policy that fails validation can be told about it."""
    now = dt.datetime.now(dt.UTC)
    md = body.get("metadata", {})
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{md.get('name')}.", "namespace": md.get("namespace")},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": md.get("name"),
            "namespace": md.get("namespace"),
            "uid": md.get("uid"),
        },
        "reason": reason,
        "message": message[:1024],
        "type": "Warning" if warning else "Normal",
        "source": {"component": reporter},
        "reportingComponent": reporter,
        "reportingInstance": reporter,
        "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "count": 1,
    }


def describe_keys(keys: list[Key]) -> str:
    return ", ".join(f"{k} {n}" for k, n in keys)
