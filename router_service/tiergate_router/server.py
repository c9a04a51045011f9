"""Running a router: the HTTP and gRPC front ends, policy hot reload and endpoint discovery, one lifecycle.

Graceful shutdown: health turns NOT_SERVING, the listeners stop accepting, requests in flight get `grace_s` to
finish, then background tasks and upstream connections are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tiergate_router.classifier import Classifier
from tiergate_router.config import RouterConfig
from tiergate_router.http_api import build_app
from tiergate_router.openai_server import HTTPServer
from tiergate_router.policy_watch import PolicyWatcher
from tiergate_router.router import Router

if TYPE_CHECKING:
    import grpc
    from grpc_health.v1 import health

    from tiergate_router.discovery import EndpointSliceDiscovery

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    # None: no gRPC listener; 0: a free port.
    grpc_port: int | None = None
    policy_file: Path | None = None
    policy_loader: Callable[[Path], RouterConfig] | None = None
    grace_s: float = 10.0
    # Discover tier pods through EndpointSlices (needs Kubernetes credentials).
    discovery: bool = False
    # A kubernetes.client.ApiClient to discover with (passed through unopened); None: in-cluster credentials, else
    # KUBECONFIG.
    kube_api_client: object | None = None


class RouterServer:
    def __init__(
        self,
        config: RouterConfig,
        classifier: Classifier,
        options: ServeOptions,
        *,
        canary_classifier: Classifier | None = None,
    ) -> None:
        self.options = options
        self.router = Router(config, classifier, canary_classifier=canary_classifier)
        self._http: HTTPServer | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.http_port = 0
        self.grpc_port = 0
        self.watcher: PolicyWatcher | None = None
        self._discovery: EndpointSliceDiscovery | None = None
        # Set when the endpoints may have changed; `_follow_readiness` then publishes `router.ready` to gRPC health.
        self._endpoints_changed = asyncio.Event()

    async def start(self) -> None:
        await self.router.start()
        # Requests in flight get grace_s to finish on stop; a client that disconnects cancels its handler, which
        # closes the upstream request, which is how the tier (vLLM) learns to abort the generation.
        self._http = HTTPServer(
            build_app(self.router), self.options.host, self.options.port, shutdown_timeout=self.options.grace_s
        )
        self.http_port = await self._http.start()
        if self.options.grpc_port is not None:
            from tiergate_router.grpc_api import start_grpc

            self._grpc, self.grpc_port, self._health = await start_grpc(
                self.router, self.options.host, self.options.grpc_port
            )
        loop = asyncio.get_running_loop()
        if self._health is not None:
            self._tasks.append(loop.create_task(self._follow_readiness(self._health)))
        if self.options.policy_file is not None and self.options.policy_loader is not None:
            self.watcher = PolicyWatcher(
                self.options.policy_file,
                self.options.policy_loader,
                self._apply,
                on_result=lambda r: self.router.metrics.policy_reloads.labels(r).inc(),
            )
            self.watcher.prime()
            self._tasks.append(loop.create_task(self.watcher.run()))
        if self.options.discovery:
            from tiergate_router.discovery import EndpointSliceDiscovery

            self._discovery = EndpointSliceDiscovery(self.set_discovered, api_client=self.options.kube_api_client)
            self._discovery.watch(self.router.config)
        log.info(
            "router serving OpenAI HTTP on %s:%d%s",
            self.options.host,
            self.http_port,
            f", gRPC on {self.grpc_port}" if self._grpc else "",
        )

    def _apply(self, config: RouterConfig) -> None:
        self.router.apply_config(config)
        self._endpoints_changed.set()
        if self._discovery is not None:
            self._discovery.watch(config)

    def set_discovered(self, tier: str, urls: list[str]) -> None:
        """A tier's discovered endpoints (what EndpointSlice discovery publishes, on the event loop)."""
        self.router.dispatcher.set_discovered(tier, urls)
        self._endpoints_changed.set()

    async def _follow_readiness(self, servicer: health.aio.HealthServicer) -> None:
        """Keep gRPC health equal to `router.ready` (HTTP /ready reads it on every request). One task publishes
        the latest state, so a burst of endpoint changes cannot reach the servicer out of order."""
        from tiergate_router.grpc_api import set_readiness

        while True:
            await self._endpoints_changed.wait()
            self._endpoints_changed.clear()
            await set_readiness(servicer, self.router.ready)

    async def stop(self) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(self.options.grace_s)
        if self._http is not None:
            await self._http.stop()
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._discovery is not None:
            await self._discovery.aclose()
        await self.router.aclose()
