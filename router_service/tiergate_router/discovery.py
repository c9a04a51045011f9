"""Endpoint discovery from Kubernetes EndpointSlices: the pods behind each tier's Service.

Per-pod endpoints (rather than the Service's ClusterIP) let the router balance by least outstanding requests and
trip a breaker on one bad pod, as production LLM routers do. One watch per tier Service, on a worker thread
(the kubernetes client is synchronous); each change publishes the tier's ready endpoint URLs to the event loop.
Only endpoints whose `ready` condition is not false and that are not terminating are used (the API says an unset
`ready` means unknown, to be treated as ready).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from tiergate_router.config import RouterConfig, ServiceRef

log = logging.getLogger(__name__)

# Server-side watch timeout: the worker re-checks its stop flag at least this often.
WATCH_TIMEOUT_S = 5


def slice_urls(slices: Iterable[object], ref: ServiceRef) -> list[str]:
    """Ready endpoint URLs from EndpointSlice objects (kubernetes client models or equivalent, read by attribute
    name: the client's models are untyped and their fields optional). Pure."""
    urls: set[str] = set()
    for s in slices:
        ports = list(getattr(s, "ports", None) or [])
        port = next((p.port for p in ports if p.port == ref.port), None)
        if port is None:
            if len(ports) == 1 and ports[0].port:
                port = ports[0].port
            else:
                continue
        for ep in getattr(s, "endpoints", None) or []:
            cond = getattr(ep, "conditions", None)
            ready = getattr(cond, "ready", None) if cond is not None else None
            terminating = getattr(cond, "terminating", None) if cond is not None else None
            if ready is False or terminating is True:
                continue
            for addr in getattr(ep, "addresses", None) or []:
                host = f"[{addr}]" if ":" in addr else addr
                urls.add(f"{ref.scheme}://{host}:{port}{ref.path}")
    return sorted(urls)


class _SliceWatch:
    def __init__(
        self, tier: str, ref: ServiceRef, api_client: object, publish: Callable[[str, list[str]], None]
    ) -> None:
        self.tier = tier
        self.ref = ref
        self._api_client = api_client
        self._publish = publish
        self._stop = threading.Event()
        self._last: list[str] | None = None
        self._thread = threading.Thread(target=self._run, name=f"slices-{tier}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _emit(self, slices: dict[str, object]) -> None:
        urls = slice_urls(slices.values(), self.ref)
        if urls != self._last:
            self._last = urls
            log.info("tier %s endpoints: %s", self.tier, ", ".join(urls) or "none")
            self._publish(self.tier, urls)

    def _run(self) -> None:
        import kubernetes
        from kubernetes.client.exceptions import ApiException

        # The client's generated types are partial (untyped watch, Optional metadata everywhere): use it as Any.
        k8s: Any = kubernetes
        api = k8s.client.DiscoveryV1Api(self._api_client)
        selector = f"kubernetes.io/service-name={self.ref.name}"
        backoff = 0.5
        while not self._stop.is_set():
            try:
                listed = api.list_namespaced_endpoint_slice(self.ref.namespace, label_selector=selector)
                slices = {s.metadata.name: s for s in listed.items}
                self._emit(slices)
                rv = listed.metadata.resource_version
                while not self._stop.is_set():
                    w = k8s.watch.Watch()
                    for ev in w.stream(
                        api.list_namespaced_endpoint_slice,
                        self.ref.namespace,
                        label_selector=selector,
                        resource_version=rv,
                        timeout_seconds=WATCH_TIMEOUT_S,
                        allow_watch_bookmarks=True,
                    ):
                        obj = ev["object"]
                        if ev["type"] == "ERROR":
                            raise ApiException(
                                status=getattr(obj, "code", 410) if not isinstance(obj, dict) else obj.get("code", 410)
                            )
                        rv = event_resource_version(obj) or rv
                        if ev["type"] == "DELETED":
                            slices.pop(obj.metadata.name, None)
                        elif ev["type"] in ("ADDED", "MODIFIED"):
                            slices[obj.metadata.name] = obj
                        else:
                            continue
                        self._emit(slices)
                        if self._stop.is_set():
                            w.stop()
                            break
                backoff = 0.5
            except ApiException as e:
                # 410 Gone: our resourceVersion is too old; relist at once. Anything else: back off.
                if e.status != 410:
                    log.warning("EndpointSlice watch for tier %s failed: %s", self.tier, e)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
            except Exception as e:  # network errors: keep the last known endpoints and retry
                log.warning("EndpointSlice watch for tier %s failed: %r", self.tier, e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)


def event_resource_version(obj: Any) -> str | None:
    """A watch event's resourceVersion. The client turns event objects into models, except a BOOKMARK's (only
    metadata.resourceVersion is set, which fails the model's required-field checks), which stays a dict: reading
    `.metadata` off it broke the watch at every bookmark, and each break backed off longer before relisting, so
    new pods went unseen for up to 10 s at a time."""
    if isinstance(obj, dict):
        rv = obj.get("metadata", {}).get("resourceVersion")
        return str(rv) if rv else None
    meta = getattr(obj, "metadata", None)
    rv = getattr(meta, "resource_version", None)
    return str(rv) if rv else None


class EndpointSliceDiscovery:
    """Keeps one watch per tier that names a Service; `watch(config)` after each policy change."""

    def __init__(
        self,
        on_change: Callable[[str, list[str]], None],
        *,
        api_client: object | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._on_change = on_change
        self._api_client = api_client
        self._loop = loop or asyncio.get_running_loop()
        self._watches: dict[str, _SliceWatch] = {}

    def _client(self) -> object:
        if self._api_client is None:
            import kubernetes

            k8s: Any = kubernetes
            try:
                k8s.config.load_incluster_config()
            except k8s.config.ConfigException:
                k8s.config.load_kube_config()
            self._api_client = k8s.client.ApiClient()
        return self._api_client

    def _publish(self, tier: str, urls: list[str]) -> None:
        self._loop.call_soon_threadsafe(self._on_change, tier, urls)

    def watch(self, config: RouterConfig) -> None:
        wanted = {t.name: t.service for t in config.tiers if t.service is not None}
        for tier, w in list(self._watches.items()):
            if wanted.get(tier) != w.ref:
                w.stop()
                del self._watches[tier]
        for tier, ref in wanted.items():
            if ref is not None and tier not in self._watches:
                self._watches[tier] = _SliceWatch(tier, ref, self._client(), self._publish)

    async def aclose(self) -> None:
        for w in self._watches.values():
            w.stop()
        for w in self._watches.values():
            await asyncio.to_thread(w.join, WATCH_TIMEOUT_S + 2)
        self._watches.clear()
