"""One reconcile of one RoutingPolicy: apply what the builders say, prune what they no longer say, report status.

Blocking (runs in a worker thread). Idempotent: running it twice, or after a crash half-way, converges to the
same objects, because children have deterministic names, are applied with server-side apply, and pruning is
by label + owner UID. That is what makes "kill the operator mid-reconcile" safe. Reads come from the child
watches' cache (cache.py), so a reconcile's only requests are the writes it needs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from tiergate.api import naming
from tiergate.api.policy import API_VERSION, KIND, RoutingPolicy, parse_policy

from .autoscaler_status import KEDA_KIND
from .autoscaling import keda_unavailable
from .builders import KIND_ORDER, build_children, child_key
from .cache import ChildCache, Seen
from .classifier import (
    CANARY_CONFIGMAP,
    ClassifierCopy,
    ClassifierProblem,
    canary_copy_name,
    canary_source_ref,
    copy_name,
    read_canary_source,
    read_copy,
    read_source,
    source_ref,
)
from .config import OperatorConfig
from .external import ExternalCheck, ExternalChecks
from .kube import Kube
from .observed_mix import MixReport
from .references import missing_references, unservable_tiers
from .status import INVALID_SPEC, SpecProblem, compute_status, refused_status, status_changed

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]  # (kind, name)


@dataclass(frozen=True)
class Applied:
    """What the last server-side apply of one child sent and got back."""

    intent: str  # digest of the object we sent
    uid: str
    resource_version: str
    marker: str  # see _marker
    # The metadata we set, which no generation tracks: compared with the cache to see hand edits.
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    owners: frozenset[str] = frozenset()

    @classmethod
    def of(cls, sent: Mapping[str, Any], intent: str, returned: Mapping[str, Any]) -> Applied:
        md, want = returned.get("metadata", {}) or {}, sent.get("metadata", {}) or {}
        return cls(
            intent,
            str(md.get("uid")),
            str(md.get("resourceVersion")),
            _marker(md),
            dict(want.get("labels") or {}),
            dict(want.get("annotations") or {}),
            frozenset(str(r.get("uid")) for r in want.get("ownerReferences") or []),
        )


@dataclass
class PolicyMemory:
    """What the operator remembers about one policy between reconciles (in memory only; a restart re-lists)."""

    uid: str | None = None
    applied: dict[Key, Applied] = field(default_factory=dict)
    reconciled_generation: int | None = None
    status: Obj | None = None  # the status we last wrote; None: trust the policy body's
    # The last good classifier artifact (what the operator's copy holds), and why the current one is not served.
    classifier: ClassifierCopy | None = None
    classifier_problem: ClassifierProblem | None = None
    # The same for a canary artifact given as a ConfigMap (spec.router.canary.classifier.configMap).
    canary: ClassifierCopy | None = None
    canary_problem: ClassifierProblem | None = None
    # Why the current generation is refused (a missing reference, tiers the default classifier cannot serve); None
    # once it applied. Kept so that a status-only refresh (pods changing) does not paper over the refusal.
    refused: SpecProblem | None = None


@dataclass
class Outcome:
    policy: RoutingPolicy
    created: list[Key] = field(default_factory=list)
    updated: list[Key] = field(default_factory=list)
    deleted: list[Key] = field(default_factory=list)
    skipped: int = 0  # children whose apply was skipped: cached state is what the last apply returned
    status: Obj = field(default_factory=dict)
    status_written: bool = False
    previous_conditions: list[Obj] = field(default_factory=list)


def selector(policy_name: str) -> str:
    return f"{naming.POLICY_LABEL}={policy_name},{naming.MANAGED_BY_LABEL}={naming.MANAGED_BY}"


def _marker(md: Mapping[str, Any]) -> str:
    """Changes of a child's spec: the generation where the kind has one, else the resourceVersion. Deployments'
    and PDBs' resourceVersions also move on every status update, which is not a change to undo."""
    if md.get("generation") is not None:
        return f"g{md['generation']}"
    return f"r{md.get('resourceVersion')}"


def seen_marker(seen: Seen) -> str:
    return _marker({"generation": seen.generation, "resourceVersion": seen.resource_version})


def intent_digest(obj: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def needs_apply(intent: str, last: Applied | None, seen: Seen | None) -> bool:
    """Whether a child the builders want (digest `intent`) must be (re-)applied. Skipping is safe only when the
    cache shows what the last apply left: a deleted child is absent, a re-created one has another UID, a
    spec edit moves the marker (the generation; the resourceVersion for kinds without one). Metadata edits do not
    move a generation, so the labels, annotations and owner reference we set are compared one by one; other
    managers' labels and annotations (the Deployment controller's revision) and status updates are not ours to
    undo and cost nothing."""
    if last is None or seen is None or last.intent != intent or seen.uid != last.uid:
        return True
    if seen_marker(seen) != last.marker:
        return True
    for want, have in ((last.labels, seen.labels), (last.annotations, seen.annotations)):
        if any(have.get(k) != v for k, v in want.items()):
            return True
    return not last.owners <= seen.owner_uids


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def reconcile(
    kube: Kube,
    body: Mapping[str, Any],
    cfg: OperatorConfig,
    memory: PolicyMemory,
    cache: ChildCache,
    *,
    apply: bool = True,
    pool: Executor | None = None,
    external: ExternalChecks | None = None,
    mix: MixReport | None = None,
) -> Outcome:
    """`mix`: the policy's last observed-mix report (observed_mix.MixObserver), folded into the status.

    Raises PolicyValidationError (spec unusable; retrying will not help) or KubeError (retryable or not).

    Reads come from `cache` (the child watches), writes go to the API server. apply=False only refreshes status
    (a child's status changed, nothing of ours did). apply=True applies the children that need it (needs_apply),
    and prunes cached children the spec no longer asks for. `pool` applies the children of one wave concurrently:
    the API server, not this process, is where the time goes."""
    policy = parse_policy(body)
    ns = policy.namespace or "default"
    uid = policy.metadata.uid or ""
    pk = (ns, policy.name)
    if memory.uid != uid:
        # A new incarnation of the same name: nothing remembered applies to it.
        memory.uid, memory.applied, memory.status = uid, {}, None
        memory.classifier, memory.classifier_problem, memory.refused = None, None, None
        memory.canary, memory.canary_problem = None, None
    out = Outcome(policy)
    deployments = cache.deployments(pk)
    if apply:
        # Before anything is built or applied: a refused generation changes no child (bad input loses nothing).
        memory.refused = (
            unservable_tiers(policy)
            or keda_unavailable(policy, cache.absent(KEDA_KIND))
            or missing_references(policy, lambda name: kube.get("ConfigMap", ns, name))
        )
        if memory.refused is None:
            memory.refused = canary_refusal(policy, resolve_canary(kube, policy, memory), memory.canary_problem)
    if not apply or memory.refused is not None:
        return _finish(kube, body, policy, memory, cache, out, deployments, external, mix)

    desired = build_children(policy, resolve_classifier(kube, policy, memory), memory.canary)
    wanted = {child_key(o) for o in desired}
    seen = cache.children(pk)
    started = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=1)
    todo: list[tuple[Obj, str]] = []
    for obj in desired:
        intent = intent_digest(obj)
        key = child_key(obj)
        if needs_apply(intent, memory.applied.get(key), seen.get(key)):
            todo.append((obj, intent))
        else:
            out.skipped += 1
    # Two waves: everything the pods refer to (ServiceAccount, Role, ConfigMap) and the Services and PDBs first, then
    # the Deployments and their autoscalers, so a new pod never starts before what it mounts or runs as exists. The
    # RoleBinding goes with the second wave: the API server checks that whoever binds a Role holds its permissions,
    # by reading that Role, so without the `bind` verb (least privilege) binding a Role applied in the same wave
    # fails with 404.
    second_wave = ("Deployment", "RoleBinding", "HorizontalPodAutoscaler", "ScaledObject")
    waves = [[t for t in todo if t[0]["kind"] not in second_wave], [t for t in todo if t[0]["kind"] in second_wave]]
    for wave in waves:
        if pool is not None and len(wave) > 1:
            results = list(pool.map(lambda t: kube.apply(t[0], cfg.field_manager), wave))
        else:
            results = [kube.apply(t[0], cfg.field_manager) for t in wave]
        for (obj, intent), applied in zip(wave, results, strict=True):
            key = child_key(obj)
            new = Applied.of(obj, intent, applied)
            before = memory.applied.get(key)
            cached = seen.get(key)
            prev_uid = before.uid if before else (cached.uid if cached else None)
            prev_marker = before.marker if before else (seen_marker(cached) if cached else None)
            if prev_uid is None:
                # Unknown before (a brand-new policy, or a restart): new if the API server created it just now.
                if _created_since(applied, started):
                    out.created.append(key)
            elif prev_uid != new.uid:
                out.created.append(key)
            elif prev_marker != new.marker:
                out.updated.append(key)
            memory.applied[key] = new
            if obj["kind"] == "Deployment":
                deployments[obj["metadata"]["name"]] = applied  # fresher than the cache

    for key, child in seen.items():
        if key in wanted or key[0] not in KIND_ORDER or uid not in child.owner_uids:
            continue
        if kube.delete(key[0], ns, key[1], uid=child.uid):
            out.deleted.append(key)
        memory.applied.pop(key, None)
        if key[0] == "Deployment":
            deployments.pop(key[1], None)

    return _finish(kube, body, policy, memory, cache, out, deployments, external, mix)


def resolve_classifier(kube: Kube, policy: RoutingPolicy, memory: PolicyMemory) -> ClassifierCopy | None:
    """The artifact to serve for a policy that names a classifier ConfigMap: the one in it when it is good, else
    the last good one (memory, else the operator's copy in the cluster, after a restart), with the reason kept in
    `memory.classifier_problem` for the status. Reads the user's ConfigMap on every apply of such a policy: one GET,
    rather than caching every ConfigMap of the cluster (artifacts are up to 900 KiB each); the metadata-only
    watch (watches.SourceWatch) is what brings a change here."""
    memory.classifier, memory.classifier_problem = _resolve(
        kube, policy, source_ref(policy), read_source, copy_name(policy), memory.classifier, "classifier"
    )
    return memory.classifier


def resolve_canary(kube: Kube, policy: RoutingPolicy, memory: PolicyMemory) -> ClassifierCopy | None:
    """`resolve_classifier` for the canary artifact's ConfigMap: the good one in it, else the last good one (memory,
    else the operator's canary copy), with why the current one is not served in `memory.canary_problem`."""
    memory.canary, memory.canary_problem = _resolve(
        kube, policy, canary_source_ref(policy), read_canary_source, canary_copy_name(policy), memory.canary, "canary"
    )
    return memory.canary


def _resolve(
    kube: Kube,
    policy: RoutingPolicy,
    ref: tuple[str, str] | None,
    read: Callable[[RoutingPolicy, Obj | None], ClassifierCopy | ClassifierProblem | None],
    copy: str,
    last_good: ClassifierCopy | None,
    what: str,
) -> tuple[ClassifierCopy | None, ClassifierProblem | None]:
    """(the artifact to serve, why the source's is not served) for one artifact ConfigMap `ref`; `copy` names the
    operator's copy of it, read when `last_good` is None (after a restart)."""
    if ref is None:
        return None, None
    ns = policy.namespace or "default"
    found = read(policy, kube.get("ConfigMap", ns, ref[0]))
    if isinstance(found, ClassifierCopy):
        return found, None
    if last_good is None:
        last_good = read_copy(kube.get("ConfigMap", ns, copy))
    if found is not None:
        kept = f"; still serving {last_good.sha256[:12]}" if last_good else ""
        log.warning("policy %s/%s: %s refused: %s%s", ns, policy.name, what, found.message, kept)
    return last_good, found


def canary_refusal(
    policy: RoutingPolicy, canary: ClassifierCopy | None, problem: ClassifierProblem | None
) -> SpecProblem | None:
    """A canary ConfigMap whose artifact was never good refuses the generation (InvalidSpec naming
    spec.router.canary.classifier.configMap): a router rolled to mount it would wait for it forever. Once one was
    good, a later bad one keeps the last good copy serving and only degrades the policy (`_finish`)."""
    if canary_source_ref(policy) is None or canary is not None:
        return None
    message = problem.message if problem is not None else f"{CANARY_CONFIGMAP}: no good canary artifact"
    return SpecProblem(INVALID_SPEC, CANARY_CONFIGMAP, message)


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
    cache: ChildCache,
    out: Outcome,
    deployments: dict[str, Obj],
    external: ExternalChecks | None,
    mix: MixReport | None = None,
) -> Outcome:
    pods = cache.pods((policy.namespace or "default", policy.name))
    # Our last write is newer than the body when the watch has not brought it back yet.
    current = memory.status if memory.status is not None else (body.get("status") or {})
    out.previous_conditions = list(current.get("conditions") or [])
    problem = memory.classifier_problem
    last_good = memory.classifier
    if problem is None and memory.canary_problem is not None:
        problem, last_good = memory.canary_problem, memory.canary
    if memory.refused is not None:
        status = refused_status(current, memory.refused, policy.metadata.generation, now_rfc3339())
    else:
        status = compute_status(
            policy,
            deployments,
            pods,
            out.previous_conditions,
            now_rfc3339(),
            router_problem=(problem.reason, _kept(problem, last_good)) if problem is not None else None,
            external=external_verdicts(policy, external),
            mix=mix,
            autoscalers=cache.autoscalers((policy.namespace or "default", policy.name)),
        )
    out.status = status
    out.status_written = _write_status(kube, body, memory, current, status)
    memory.reconciled_generation = policy.metadata.generation
    return out


def external_verdicts(policy: RoutingPolicy, checks: ExternalChecks | None) -> dict[str, ExternalCheck | None]:
    """The last check of each external tier's endpoint, by tier name (None: not checked yet), its URLs registered
    for checking. No I/O: the checks run in `ExternalChecks.run`."""
    urls = {t.name: t.endpoint.url for t in policy.spec.tiers if t.endpoint is not None}
    if checks is None:
        return dict.fromkeys(urls)
    checks.want(urls.values())
    return {name: checks.get(url) for name, url in urls.items()}


def _write_status(kube: Kube, body: Mapping[str, Any], memory: PolicyMemory, current: Obj, status: Obj) -> bool:
    """Patch the status when it changed (ignoring transition times); remember what the policy's status now is."""
    if status_changed(current, status):
        md = body.get("metadata") or {}
        kube.patch_status(KIND, md.get("namespace") or "default", str(md.get("name")), status)
        memory.status = status
        return True
    if memory.status is None:
        memory.status = dict(current)
    return False


def refuse_invalid(kube: Kube, body: Mapping[str, Any], memory: PolicyMemory, problem: SpecProblem) -> bool:
    """Status for a policy the typed model rejects (parse_policy raised): Ready and Degraded name the field, nothing
    is applied. True when the status was written (it said something else before), so the caller tells the story
    once per change rather than on every resync."""
    current = memory.status if memory.status is not None else (body.get("status") or {})
    generation = (body.get("metadata") or {}).get("generation")
    status = refused_status(current, problem, generation if isinstance(generation, int) else None, now_rfc3339())
    return _write_status(kube, body, memory, current, status)


def _kept(problem: ClassifierProblem, last_good: ClassifierCopy | None) -> str:
    if last_good is None:
        return f"{problem.message}; no good classifier artifact yet, the router waits for one"
    return f"{problem.message}; the router keeps the last good one (sha256 {last_good.sha256[:12]})"


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
