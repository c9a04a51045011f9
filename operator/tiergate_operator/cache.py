"""What the child watches have seen: every child of every policy, by policy, kept current by list+watch.

The operator's reads come from here instead of the API server (controller-runtime's informer cache, in small):
status is computed from the cached Deployments and Pods, pruning scans the cached children, and a reconcile
skips the server-side apply of a child whose cached state is exactly what the last apply returned. Profiling a
burst of 200 new policies showed reads (a GET of the policy, lists of Deployments and Pods for every status
refresh, lists of seven kinds on every resync) as most of the operator's requests; here they cost a dict lookup.

Thread-safe: the watch threads write, the reconcile threads read. Readers get copies of the per-policy maps,
never a live view.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tiergate.api import naming

Obj = dict[str, Any]
PolicyKey = tuple[str, str]  # (namespace, policy name)
ChildKey = tuple[str, str]  # (kind, name)

# Kinds whose spec/status are kept (status is computed from them); of the others only identity and version.
FULL_OBJECT_KINDS = frozenset({"Deployment", "Pod"})


@dataclass(frozen=True)
class Seen:
    """One child as last seen: identity, the versions that say whether it changed, and its owners."""

    uid: str
    resource_version: str
    generation: int | None
    owner_uids: frozenset[str]
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    obj: Obj | None = None  # for FULL_OBJECT_KINDS only: the fields status is computed from

    @classmethod
    def of(cls, kind: str, obj: Mapping[str, Any]) -> Seen:
        md = obj.get("metadata", {}) or {}
        return cls(
            uid=str(md.get("uid", "")),
            resource_version=str(md.get("resourceVersion", "")),
            generation=md.get("generation"),
            owner_uids=frozenset(str(r.get("uid")) for r in md.get("ownerReferences") or []),
            labels=dict(md.get("labels") or {}),
            annotations=dict(md.get("annotations") or {}),
            obj=_slim(kind, obj) if kind in FULL_OBJECT_KINDS else None,
        )


def _slim(kind: str, obj: Mapping[str, Any]) -> Obj:
    """Only what status.py reads: a whole Deployment (pod template, managedFields) is ten times larger, and the
    cache holds every one of them."""
    md = obj.get("metadata", {}) or {}
    meta = {k: md[k] for k in ("name", "namespace", "labels", "generation", "deletionTimestamp") if k in md}
    status = obj.get("status") or {}
    if kind == "Deployment":
        spec = {k: v for k, v in (obj.get("spec") or {}).items() if k == "replicas"}
        return {"metadata": meta, "spec": spec, "status": status}
    return {"metadata": meta, "status": {k: status[k] for k in ("conditions", "containerStatuses") if k in status}}


def _where(obj: Mapping[str, Any]) -> tuple[PolicyKey, str] | None:
    md = obj.get("metadata", {}) or {}
    policy = (md.get("labels") or {}).get(naming.POLICY_LABEL)
    ns, name = md.get("namespace"), md.get("name")
    if not (policy and ns and name):
        return None
    return (ns, policy), name


class ChildCache:
    def __init__(self, kinds: Iterable[str]) -> None:
        self.kinds = frozenset(kinds)
        self._lock = threading.Lock()
        self._by_policy: dict[PolicyKey, dict[ChildKey, Seen]] = {}
        self._where: dict[tuple[str, str, str], PolicyKey] = {}  # (kind, ns, name) -> policy
        self._synced: set[str] = set()
        self._all_synced = threading.Event()
        # Kinds the API server does not serve us (KEDA's ScaledObject where KEDA is not installed, or not readable
        # with the operator's role): kind -> why. Such a kind counts as listed, empty.
        self._absent: dict[str, str] = {}

    # --- writers (watch threads) ------------------------------------------------------------------------------

    def replace(self, kind: str, items: Iterable[Mapping[str, Any]]) -> None:
        """A fresh list of `kind`: forget every cached object of that kind (deletions missed while the watch was
        down included), then add the listed ones."""
        with self._lock:
            for pk, children in self._by_policy.items():
                for ck in [ck for ck in children if ck[0] == kind]:
                    del children[ck]
                    self._where.pop((kind, pk[0], ck[1]), None)
            for obj in items:
                self._put(kind, obj)
            self._absent.pop(kind, None)
            self._synced.add(kind)
            if self._synced >= self.kinds:
                self._all_synced.set()

    def mark_absent(self, kind: str, why: str) -> None:
        """`kind` cannot be listed (not served, or forbidden): none of it exists for us, and `why` says so."""
        self.replace(kind, [])
        with self._lock:
            self._absent[kind] = why

    def upsert(self, kind: str, obj: Mapping[str, Any]) -> None:
        with self._lock:
            self._put(kind, obj)

    def remove(self, kind: str, obj: Mapping[str, Any]) -> None:
        md = obj.get("metadata", {}) or {}
        with self._lock:
            self._drop(kind, md.get("namespace", ""), md.get("name", ""))

    def _put(self, kind: str, obj: Mapping[str, Any]) -> None:
        md = obj.get("metadata", {}) or {}
        ns, name = md.get("namespace", ""), md.get("name", "")
        # A relabelled child may move to another policy (or out of our selector): drop the old entry first.
        self._drop(kind, ns, name)
        where = _where(obj)
        if where is None:
            return
        pk, name = where
        self._by_policy.setdefault(pk, {})[(kind, name)] = Seen.of(kind, obj)
        self._where[(kind, ns, name)] = pk

    def _drop(self, kind: str, ns: str, name: str) -> None:
        pk = self._where.pop((kind, ns, name), None)
        if pk is None:
            return
        children = self._by_policy.get(pk)
        if children is not None:
            children.pop((kind, name), None)
            if not children:
                del self._by_policy[pk]

    # --- readers (reconcile threads) --------------------------------------------------------------------------

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once every kind has been listed at least once: before that, an absent child proves nothing."""
        return self._all_synced.wait(timeout)

    @property
    def synced(self) -> bool:
        return self._all_synced.is_set()

    def absent(self, kind: str) -> str | None:
        """Why `kind` cannot be listed (mark_absent), None when it can."""
        with self._lock:
            return self._absent.get(kind)

    def children(self, pk: PolicyKey) -> dict[ChildKey, Seen]:
        with self._lock:
            return dict(self._by_policy.get(pk, {}))

    def get(self, pk: PolicyKey, ck: ChildKey) -> Seen | None:
        with self._lock:
            return self._by_policy.get(pk, {}).get(ck)

    def deployments(self, pk: PolicyKey) -> dict[str, Obj]:
        with self._lock:
            return {
                name: s.obj
                for (kind, name), s in self._by_policy.get(pk, {}).items()
                if kind == "Deployment" and s.obj is not None
            }

    def pods(self, pk: PolicyKey) -> list[Obj]:
        with self._lock:
            return [s.obj for (kind, _), s in self._by_policy.get(pk, {}).items() if kind == "Pod" and s.obj]

    def size(self) -> int:
        with self._lock:
            return sum(len(c) for c in self._by_policy.values())
