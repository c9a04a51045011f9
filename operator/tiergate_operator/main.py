"""Wiring: credentials, leader election, kopf's watches and the controller's workers, and a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

import kopf

from .cache import ChildCache
from .config import OperatorConfig
from .controller import Controller
from .errors import LeaseLost
from .handlers import configure_settings, login_handler, register
from .health import start_health_server
from .kube import Kube, load_api_client
from .leader import LeaderElector
from .tenant_spend import SpendReporter
from .watches import WATCHED_KINDS, ChildWatches, SourceWatch

log = logging.getLogger(__name__)


async def serve(cfg: OperatorConfig) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until leadership is lost (exit 1, so the pod restarts as a standby)."""
    api_client = load_api_client(cfg.kubeconfig, identity=cfg.identity)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    health = await start_health_server(cfg.health_port) if cfg.health_port else None
    try:
        return await _serve(cfg, api_client, stop, loop)
    finally:
        if health is not None:
            health.close()
        api_client.close()


async def _serve(cfg: OperatorConfig, api_client: Any, stop: asyncio.Event, loop: asyncio.AbstractEventLoop) -> int:
    if not cfg.leader_elect:
        return await _reconcile_until_stopped(cfg, api_client, Kube(api_client), None, stop, loop)
    # The elector's own client: short per-request timeouts, and no write guard (its writes are the lease's).
    t = cfg.lease_call_timeout_seconds
    elector = LeaderElector(Kube(api_client, timeout=(t, t)), cfg)
    try:
        log.info("waiting for lease %s/%s as %s", cfg.lease_namespace, cfg.lease_name, cfg.identity)
        if not await elector.acquire(stop):
            return 0
        # Every write of the reconciler goes through this client, and so through the elector's check.
        guarded = Kube(api_client, write_guard=elector.check_leader)
        return await _reconcile_until_stopped(cfg, api_client, guarded, elector, stop, loop)
    finally:
        elector.close()


async def _reconcile_until_stopped(
    cfg: OperatorConfig,
    api_client: Any,
    kube: Kube,
    elector: LeaderElector | None,
    stop: asyncio.Event,
    loop: asyncio.AbstractEventLoop,
) -> int:
    cache = ChildCache(WATCHED_KINDS)
    controller = Controller(cfg, kube, cache)
    registry = kopf.OperatorRegistry()
    settings = kopf.OperatorSettings()
    configure_settings(settings)
    register(registry, controller)
    login_handler(registry, api_client)
    scope = f"namespace {cfg.namespace}" if cfg.namespace else "all namespaces"
    log.info("tiergate operator %s: watching %s", cfg.identity, scope)

    kopf_task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=settings,
            standalone=True,
            clusterwide=cfg.namespace is None,
            namespaces=[cfg.namespace] if cfg.namespace else [],
            stop_flag=stop,
        ),
        name="kopf",
    )
    watches = ChildWatches(kube, cfg.namespace, loop, controller.child_event, cache, controller.kind_available)
    watches.start()
    sources = SourceWatch(kube, cfg.namespace, loop, controller.source_event)
    sources.start()
    tasks = [kopf_task, asyncio.create_task(controller.run(stop), name="controller")]
    # status.tenants (today's spend per tenant with a budget), written by the leader like every other status.
    tasks.append(asyncio.create_task(SpendReporter(kube, controller.policy_bodies).run(stop), name="tenant-spend"))
    lost = False
    if elector is not None:
        tasks.append(asyncio.create_task(elector.hold(stop), name="lease"))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            # A task cancelled from outside (kopf cancels stragglers when it stops) is a stop, not an error.
            exc = None if t.cancelled() else t.exception()
            if isinstance(exc, LeaseLost):
                log.error("%s: stopping", exc)
                lost = True
            elif exc is not None:
                raise exc
    finally:
        stop.set()
        watches.close()
        sources.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        if elector is not None and not lost:
            await loop.run_in_executor(None, elector.release)
        log.info("API requests: %s", kube.calls_summary())
    return 1 if lost else 0
