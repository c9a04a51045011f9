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
from .kube import Kube, resource_path

log = logging.getLogger(__name__)

# Every kind of child, plus the Pods status is computed from.
WATCHED_KINDS = (*KIND_ORDER, "Pod")
# Server-side watch timeout: the API server ends the stream after this; we resume from the last resourceVersion.
_WATCH_SECONDS = 300
# After an error (API server restarting, 410 Gone), wait this long before listing again, doubling while the
# errors go on (a missing RBAC verb fails every time: no reason to list once a second forever).
_RETRY_SECONDS = 1.0
_RETRY_MAX_SECONDS = 30.0

OnEvent = Callable[[str, str, str, str, bool, int | None, str | None], None]


class ChildWatches:
    """One thread per kind: list, then watch from the list's resourceVersion; on any error list again."""

    def __init__(
        self,
        kube: Kube,
        namespace: str | None,
        loop: asyncio.AbstractEventLoop,
        on_event: OnEvent,
        cache: ChildCache,
    ) -> None:
        self.kube = kube
        self.cache = cache
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
        path = resource_path(kind, self.namespace)
        selector = naming.POLICY_LABEL
        delay = _RETRY_SECONDS
        while not self.stop.is_set():
            try:
                status, listed = self.kube.request("GET", path, query={"labelSelector": selector})
                if status >= 300:
                    raise RuntimeError(f"list {kind}: {status} {listed.get('message')}")
                self.cache.replace(kind, listed.get("items") or [])
                rv = listed.get("metadata", {}).get("resourceVersion", "")
                while not self.stop.is_set():
                    rv = self._watch_once(kind, path, selector, rv)
                    delay = _RETRY_SECONDS  # a watch that ran and ended normally: all is well
            except Exception as e:  # any failure: start over from a fresh list
                if not self.stop.is_set():
                    # 410 Gone is routine (the watch fell behind etcd's compaction); anything else is worth seeing.
                    level = logging.DEBUG if "410" in str(e) or "Expired" in str(e) else logging.WARNING
                    log.log(level, "watch of %s failed (%s); listing again in %.0fs", kind, e, delay)
                    self.stop.wait(delay)
                    delay = min(delay * 2, _RETRY_MAX_SECONDS)

    def _watch_once(self, kind: str, path: str, selector: str, rv: str) -> str:
        query = {
            "labelSelector": selector,
            "watch": "true",
            "resourceVersion": rv,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(_WATCH_SECONDS),
        }
        for line in self.kube.stream_lines(path, query, read_timeout=_WATCH_SECONDS + 30):
            if self.stop.is_set():
                break
            event = json.loads(line)
            etype, obj = event.get("type"), event.get("object") or {}
            if etype == "ERROR":
                raise RuntimeError(f"watch error: {obj.get('message')}")  # e.g. 410 Gone: list again
            rv = obj.get("metadata", {}).get("resourceVersion", rv)
            if etype in ("ADDED", "MODIFIED"):
                self.cache.upsert(kind, obj)
            elif etype == "DELETED":
                self.cache.remove(kind, obj)
            else:
                continue  # BOOKMARK: only the resourceVersion moves
            self._deliver(kind, etype, obj)
        return rv
