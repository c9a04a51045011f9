"""Watches of the children, filtered by label on the API server, feeding the cache and the controller's queue.

Why not kopf for these: kopf watches every object of a kind (all Pods, all Deployments of the cluster) and filters
by label in the operator, running its full per-event machinery for each; profiling a burst of policies showed that
as most of the operator's CPU. A plain list+watch with `labelSelector=tiergate.io/policy` asks the API server for
our children only, and each event costs a dictionary lookup. kopf still watches the RoutingPolicies themselves.

Every kind the operator creates is watched (and Pods, for status): the cache they fill is what reconciles read,
and a change to any child, PDBs and RBAC included, is seen at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from tiergate.api import naming

from .builders import KIND_ORDER
from .cache import ChildCache
from .kube import METADATA_LIST, METADATA_WATCH, Kube, resource_path

log = logging.getLogger(__name__)

# Every kind of child, plus the Pods status is computed from.
WATCHED_KINDS = (*KIND_ORDER, "Pod")
# Kinds of a CRD that may not be installed (KEDA's). A list answered 404 (not served) or 403 (the operator's role
# lacks it) marks the kind absent in the cache, listed and empty, instead of holding up the cache's sync: the
# operator runs without KEDA, and a policy that asks for it is refused with a condition (reconcile.py). The list is
# retried every _ABSENT_RECHECK_SECONDS, so installing KEDA is noticed without a restart.
OPTIONAL_KINDS = frozenset({"ScaledObject"})
_ABSENT_RECHECK_SECONDS = 20.0
# Server-side watch timeout: the API server ends the stream after this; we resume from the last resourceVersion.
_WATCH_SECONDS = 300
# After an error (API server restarting, 410 Gone), wait this long before listing again, doubling while the
# errors go on (a missing RBAC verb fails every time: no reason to list once a second forever).
_RETRY_SECONDS = 1.0
_RETRY_MAX_SECONDS = 30.0

OnEvent = Callable[[str, str, str, str, bool, int | None, str | None], None]
OnAvailable = Callable[[str], None]


class KindAbsentError(RuntimeError):
    """A list of an optional kind answered 404 or 403: the kind is not served to us."""


class ChildWatches:
    """One thread per kind: list, then watch from the list's resourceVersion; on any error list again."""

    def __init__(
        self,
        kube: Kube,
        namespace: str | None,
        loop: asyncio.AbstractEventLoop,
        on_event: OnEvent,
        cache: ChildCache,
        on_available: OnAvailable | None = None,
    ) -> None:
        self.kube = kube
        self.cache = cache
        # Called (on the loop) when an optional kind that was absent can be listed again (KEDA installed).
        self.on_available = on_available
        self.namespace = namespace
        self.loop = loop
        self.on_event = on_event
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for kind in WATCHED_KINDS:
            t = threading.Thread(target=self._run, args=(kind,), name=f"watch-{kind}", daemon=True)
            t.start()
            self.threads.append(t)

    def close(self) -> None:
        self.stop.set()

    def _deliver(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        md = obj.get("metadata", {})
        ns = md.get("namespace")
        policy = (md.get("labels") or {}).get(naming.POLICY_LABEL)
        if not ns or not policy:
            return
        self.loop.call_soon_threadsafe(
            self.on_event,
            ns,
            policy,
            kind,
            md.get("name", ""),
            event_type == "DELETED",
            md.get("generation"),
            md.get("resourceVersion"),
        )

    def _run(self, kind: str) -> None:
        list_and_watch(
            self.kube,
            kind,
            resource_path(kind, self.namespace),
            {"labelSelector": naming.POLICY_LABEL},
            self.stop,
            on_list=lambda items: self._listed(kind, items),
            on_event=lambda etype, obj: self._on_event(kind, etype, obj),
            on_absent=(lambda why: self.cache.mark_absent(kind, why)) if kind in OPTIONAL_KINDS else None,
        )

    def _listed(self, kind: str, items: list[dict[str, Any]]) -> None:
        was_absent = self.cache.absent(kind) is not None
        self.cache.replace(kind, items)
        if was_absent and self.on_available is not None:
            log.info("%s can be listed now: policies that asked for it are applied again", kind)
            self.loop.call_soon_threadsafe(self.on_available, kind)

    def _on_event(self, kind: str, etype: str, obj: dict[str, Any]) -> None:
        if etype == "DELETED":
            self.cache.remove(kind, obj)
        else:
            self.cache.upsert(kind, obj)
        self._deliver(kind, etype, obj)


OnSourceEvent = Callable[[str, str], None]


class SourceWatch:
    """The ConfigMaps that policies name as classifiers are the user's, without our label, so the child watches do
    not see them. One metadata-only watch of every ConfigMap (names and resourceVersions, not the data) tells the
    controller when one changes or goes; the controller knows which policies name it, and their reconciles read it.
    Cheap where it matters: a ConfigMap's data can be 1 MiB, its metadata is a few hundred bytes."""

    def __init__(
        self, kube: Kube, namespace: str | None, loop: asyncio.AbstractEventLoop, on_event: OnSourceEvent
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.loop = loop
        self.on_event = on_event
        self.stop = threading.Event()
        self.versions: dict[tuple[str, str], str] = {}  # (namespace, name) -> resourceVersion
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="watch-classifier-sources", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()

    def _run(self) -> None:
        list_and_watch(
            self.kube,
            "ConfigMap metadata",
            resource_path("ConfigMap", self.namespace),
            {},
            self.stop,
            on_list=self.relisted,
            on_event=self.changed,
            accept=(METADATA_LIST, METADATA_WATCH),
        )

    def relisted(self, items: list[dict[str, Any]]) -> None:
        """After a (re)list, report what changed while no watch was running: versions that moved, and deletions."""
        now = {_ns_name(o): str(o.get("metadata", {}).get("resourceVersion", "")) for o in items}
        first = not self.versions
        changed = [k for k, rv in now.items() if self.versions.get(k) not in (None, rv)]
        gone = [k for k in self.versions if k not in now]
        self.versions = now
        if not first:
            for ns, name in [*changed, *gone]:
                self.loop.call_soon_threadsafe(self.on_event, ns, name)

    def changed(self, etype: str, obj: dict[str, Any]) -> None:
        key = _ns_name(obj)
        if etype == "DELETED":
            self.versions.pop(key, None)
        else:
            self.versions[key] = str(obj.get("metadata", {}).get("resourceVersion", ""))
        self.loop.call_soon_threadsafe(self.on_event, *key)


def _ns_name(obj: dict[str, Any]) -> tuple[str, str]:
    md = obj.get("metadata", {}) or {}
    return str(md.get("namespace", "")), str(md.get("name", ""))


def list_and_watch(
    kube: Kube,
    what: str,
    path: str,
    query: dict[str, str],
    stop: threading.Event,
    *,
    on_list: Callable[[list[dict[str, Any]]], None],
    on_event: Callable[[str, dict[str, Any]], None],
    accept: tuple[str, str] = ("application/json", "application/json"),
    on_absent: Callable[[str], None] | None = None,
) -> None:
    """List, then watch from the list's resourceVersion; on any error list again, until `stop`. `accept`: the
    Accept headers of the list and of the watch (kube.METADATA_LIST, METADATA_WATCH for metadata only).
    `on_absent(why)`: for a kind that may not be served (OPTIONAL_KINDS), called when a list answers 404 or 403;
    the list is then tried again every _ABSENT_RECHECK_SECONDS, quietly."""
    delay = _RETRY_SECONDS
    while not stop.is_set():
        try:
            status, listed = kube.request("GET", path, query=query or None, accept=accept[0])
            if on_absent is not None and status in (403, 404):
                raise KindAbsentError(f"list {what}: {status} {listed.get('reason', '')}: {listed.get('message')}")
            if status >= 300:
                raise RuntimeError(f"list {what}: {status} {listed.get('message')}")
            on_list(listed.get("items") or [])
            rv = listed.get("metadata", {}).get("resourceVersion", "")
            while not stop.is_set():
                rv = _watch_once(kube, path, query, rv, stop, on_event, accept[1])
                delay = _RETRY_SECONDS  # a watch that ran and ended normally: all is well
        except KindAbsentError as e:
            assert on_absent is not None
            on_absent(str(e))
            log.debug("%s; listing again in %.0fs", e, _ABSENT_RECHECK_SECONDS)
            stop.wait(_ABSENT_RECHECK_SECONDS)
        except Exception as e:  # any failure: start over from a fresh list
            if not stop.is_set():
                # 410 Gone is routine (the watch fell behind etcd's compaction); anything else is worth seeing.
                level = logging.DEBUG if "410" in str(e) or "Expired" in str(e) else logging.WARNING
                log.log(level, "watch of %s failed (%s); listing again in %.0fs", what, e, delay)
                stop.wait(delay)
                delay = min(delay * 2, _RETRY_MAX_SECONDS)


def _watch_once(
    kube: Kube,
    path: str,
    query: dict[str, str],
    rv: str,
    stop: threading.Event,
    on_event: Callable[[str, dict[str, Any]], None],
    accept: str,
) -> str:
    watch_query = {
        **query,
        "watch": "true",
        "resourceVersion": rv,
        "allowWatchBookmarks": "true",
        "timeoutSeconds": str(_WATCH_SECONDS),
    }
    for line in kube.stream_lines(path, watch_query, read_timeout=_WATCH_SECONDS + 30, accept=accept):
        if stop.is_set():
            break
        event = json.loads(line)
        etype, obj = event.get("type"), event.get("object") or {}
        if etype == "ERROR":
            raise RuntimeError(f"watch error: {obj.get('message')}")  # e.g. 410 Gone: list again
        rv = obj.get("metadata", {}).get("resourceVersion", rv)
        if etype in ("ADDED", "MODIFIED", "DELETED"):
            on_event(etype, obj)
        # BOOKMARK: only the resourceVersion moves
    return rv
