"""The work queue between kopf's watch events and `reconcile`: one reconcile per policy at a time, bursts coalesced.

Why a queue of our own instead of kopf daemons or timers: those require a finalizer on every RoutingPolicy,
which makes deleting a policy hang whenever the operator is down. Here kopf watches the policies and
watches.py the children (by label); every event just marks its policy dirty, and workers reconcile dirty
policies from the latest policy body kopf delivered and the children's cache, so a reconcile reads nothing from
the API server and writes only what changed. A resync loop re-reads every known policy now and then and
reconciles it (children applied where the cache shows they differ from what the policy says), which bounds how
long any drift, or a missed event, can survive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tiergate.api.errors import PolicyValidationError
from tiergate.api.policy import KIND

from .cache import ChildCache
from .config import OperatorConfig
from .errors import KubeError
from .external import ExternalChecks
from .kube import Kube
from .reconcile import Outcome, PolicyMemory, describe_keys, event_body, needs_apply, reconcile, refuse_invalid
from .references import configmaps_named
from .status import DEGRADED, INVALID_SPEC, READY, REWARD_MODEL_READY, invalid_spec

log = logging.getLogger(__name__)

PolicyKey = tuple[str, str]  # (namespace, name)

# Retry delays for failed reconciles: quick first (a conflict or a throttled request clears in a second),
# capped so a broken API server is not hammered.
_BACKOFF_START = 0.5
_BACKOFF_MAX = 60.0


class Controller:
    def __init__(
        self,
        cfg: OperatorConfig,
        kube: Kube,
        cache: ChildCache,
        clock: Callable[[], float] = time.monotonic,
        external: ExternalChecks | None = None,
    ) -> None:
        self.cfg = cfg
        self.kube = kube
        self.cache = cache
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="reconcile")
        # Applies of one reconcile run concurrently in their own pool (never the reconcile pool: a reconcile
        # waiting on applies queued behind other reconciles would deadlock).
        self._apply_pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="apply")
        self._need_apply: set[PolicyKey] = set()
        self._resync_due: set[PolicyKey] = set()  # re-read from the API server on the next reconcile
        self._bodies: dict[PolicyKey, dict[str, Any]] = {}  # the latest policy body kopf delivered
        # Which policy names which ConfigMap (its classifier, its tiers' environment): (namespace, ConfigMap) ->
        # policy names.
        self._sources: dict[tuple[str, str], set[str]] = {}
        self._source_of: dict[PolicyKey, set[str]] = {}
        self._queue: asyncio.Queue[PolicyKey] | None = None
        self._queued: set[PolicyKey] = set()
        self._active: set[PolicyKey] = set()
        self._again: set[PolicyKey] = set()
        self._memory: dict[PolicyKey, PolicyMemory] = {}
        self._failures: dict[PolicyKey, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # External tiers' endpoints, checked by a loop of their own (run), read by reconciles without I/O.
        self.external = external or ExternalChecks(
            interval_s=cfg.external_check_seconds, timeout_s=cfg.external_check_timeout_seconds
        )
        # Probes wait on the network, not on the API server: a pool of their own, so a hanging endpoint never
        # holds a reconcile thread.
        self._probe_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="external-check")
        self.reconciles = 0  # counters, for logs and the benchmark
        self.errors = 0

    def policy_bodies(self) -> list[dict[str, Any]]:
        """The latest body of every policy kopf delivered (for readers beside the reconciler: the spend reporter)."""
        return list(self._bodies.values())

    # --- event side (called from kopf handlers, on the event loop) -------------------------------------------

    def enqueue(self, key: PolicyKey, delay: float = 0.0, *, apply: bool = True) -> None:
        """apply=False: only the children's status changed; refresh the policy's status without re-applying.

        The settle delay is waited here (a timer), not in a worker: a worker sleeping off a status refresh would
        hold one of the few slots that a burst of new policies needs."""
        if apply:
            self._need_apply.add(key)
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.enqueue, key)
            return
        if key in self._active:
            self._again.add(key)  # running now: run once more afterwards, with whatever changed meanwhile
            return
        if key in self._queued:
            return  # waiting already; it will see whatever changed
        self._queued.add(key)
        if self._queue is None:
            return  # before start(): remembered, queued when the workers start
        # Coalesce bursts: pods and Deployments report in bursts (a rollout emits dozens of events), and one
        # refresh after the burst says the same as one per event.
        settle = self.cfg.settle_seconds if key in self._need_apply else self.cfg.status_settle_seconds
        asyncio.get_running_loop().call_later(settle, self._queue.put_nowait, key)

    def policy_event(
        self,
        namespace: str,
        name: str,
        generation: int | None,
        deleted: bool,
        body: dict[str, Any] | None = None,
    ) -> None:
        key = (namespace, name)
        if deleted:
            # Garbage collection removes the children (owner references); nothing to do but forget.
            self._memory.pop(key, None)
            self._failures.pop(key, None)
            self._bodies.pop(key, None)
            self._index_source(key, set())
            return
        if body is not None:
            self._bodies[key] = body
            self._index_source(key, configmaps_named(body))
        mem = self._memory.get(key)
        # Our own status writes come back as events too; only a new generation (or a policy we have not
        # reconciled yet) needs work.
        if mem is None or mem.reconciled_generation != generation:
            self.enqueue(key)

    def _index_source(self, key: PolicyKey, names: set[str]) -> None:
        for old in self._source_of.pop(key, set()):
            users = self._sources.get((key[0], old), set())
            users.discard(key[1])
            if not users:
                self._sources.pop((key[0], old), None)
        if names:
            self._source_of[key] = set(names)
        for name in names:
            self._sources.setdefault((key[0], name), set()).add(key[1])

    def source_event(self, namespace: str, name: str) -> None:
        """A ConfigMap changed, appeared or went (watches.SourceWatch): re-apply the policies that name it."""
        for policy in sorted(self._sources.get((namespace, name), ())):
            self.enqueue((namespace, policy))

    def child_event(
        self,
        namespace: str,
        policy_name: str | None,
        kind: str,
        name: str,
        deleted: bool,
        generation: int | None,
        resource_version: str | None = None,
    ) -> None:
        """A child changed. Deleted, or changed in what we set (its spec: a generation we did not write; our labels,
        annotations, owner reference): re-apply. Only its status changed (pods starting, replicas becoming ready),
        or someone else's metadata: refresh status only, which costs no request unless the status changed."""
        if not policy_name:
            return
        key = (namespace, policy_name)
        mem = self._memory.get(key)
        if deleted or mem is None:
            self.enqueue(key)
            return
        if kind == "Pod":
            self.enqueue(key, apply=False)
            return
        last = mem.applied.get((kind, name))
        # The watch thread updated the cache before delivering this event: the cache is at least this new.
        seen = self.cache.get(key, (kind, name))
        self.enqueue(key, apply=needs_apply(last.intent if last else "", last, seen))

    def kind_available(self, kind: str) -> None:
        """An optional kind (KEDA's ScaledObject) can be listed now: apply every policy again, so that one refused
        for want of it (reconcile: KedaNotInstalled) is applied without waiting for the resync."""
        for key in sorted(self._bodies):
            self.enqueue(key)

    # --- worker side ----------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Workers plus the resync loop, until `stop` is set."""
        self._queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        # Until every kind has been listed, an absent child proves nothing (it would be re-created, and a child
        # of a removed tier would escape pruning): wait for the cache as informer-based controllers do.
        while not stop.is_set() and not await self._loop.run_in_executor(None, self.cache.wait_synced, 1.0):
            pass
        for key in sorted(self._queued):
            self._queue.put_nowait(key)
        workers = [asyncio.create_task(self._worker(), name=f"reconcile-worker-{i}") for i in range(self.cfg.workers)]
        resync = asyncio.create_task(self._resync(), name="resync")
        checks = asyncio.create_task(self.external.run(self._probe_pool, self._external_changed), name="external")
        try:
            await stop.wait()
        finally:
            for t in [*workers, resync, checks]:
                t.cancel()
            await asyncio.gather(*workers, resync, checks, return_exceptions=True)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._apply_pool.shutdown(wait=False, cancel_futures=True)
            self._probe_pool.shutdown(wait=False, cancel_futures=True)

    def _external_changed(self, url: str) -> None:
        """A check of `url` came out differently: refresh the status of every policy whose tiers name it."""
        for key, body in list(self._bodies.items()):
            tiers = (body.get("spec") or {}).get("tiers") or []
            if any(isinstance(t, dict) and (t.get("endpoint") or {}).get("url") == url for t in tiers):
                self.enqueue(key, apply=False)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.resync_seconds)
            for key in list(self._memory):
                self._resync_due.add(key)
                self.enqueue(key)

    async def _worker(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._active.add(key)
            try:
                await loop.run_in_executor(self._executor, self._reconcile_blocking, key)
            except Exception:  # never let one policy's failure kill a worker
                log.exception("reconcile of %s/%s crashed", *key)
            finally:
                self._active.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self.enqueue(key)

    def _reconcile_blocking(self, key: PolicyKey) -> None:
        ns, name = key
        resync = key in self._resync_due
        self._resync_due.discard(key)
        body = None if resync else self._bodies.get(key)
        if body is None:
            # Not delivered by kopf yet, or the resync: read it (and trust its status over what we remember).
            try:
                body = self.kube.get(KIND, ns, name)
            except KubeError as e:
                if resync:
                    self._resync_due.add(key)
                self._retry(key, f"reading the policy failed: {e}")
                return
            if body is not None and key in self._memory:
                self._memory[key].status = None
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            self._memory.pop(key, None)
            self._bodies.pop(key, None)
            return
        mem = self._memory.setdefault(key, PolicyMemory())
        generation = body.get("metadata", {}).get("generation")
        apply = resync or key in self._need_apply or mem.reconciled_generation != generation
        self._need_apply.discard(key)
        self.reconciles += 1
        try:
            out = reconcile(
                self.kube, body, self.cfg, mem, self.cache, apply=apply, pool=self._apply_pool, external=self.external
            )
        except PolicyValidationError as e:
            # The CRD's schema should have refused this; an older CRD may not have. Retrying will not help, the
            # next spec change will. Nothing was applied; the status says so, naming the field.
            self.errors += 1
            mem.reconciled_generation = generation
            problem = invalid_spec(e.errors)
            try:
                written = refuse_invalid(self.kube, body, mem, problem)
            except KubeError as ke:
                self._retry(key, f"writing the status of an invalid policy failed: {ke}")
                return
            if written:  # once per change, not on every resync
                log.error("policy %s/%s is invalid: %s", ns, name, e)
                self._post(body, INVALID_SPEC, problem.message, warning=True)
            return
        except KubeError as e:
            self.errors += 1
            if apply:
                self._need_apply.add(key)
            if e.retryable:
                self._retry(key, str(e))
            else:
                log.error("reconcile of %s/%s failed: %s", ns, name, e)
                self._post(body, "ApplyFailed", str(e), warning=True)
                self._retry(key, str(e), floor=_BACKOFF_MAX / 2)
            return
        self._failures.pop(key, None)
        self._report(body, out)

    def _retry(self, key: PolicyKey, why: str, floor: float = 0.0) -> None:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = max(floor, min(_BACKOFF_MAX, _BACKOFF_START * 2**n))
        log.warning("reconcile of %s/%s failed (%s); retrying in %.1fs", *key, why, delay)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.enqueue, key, delay)

    def _report(self, body: dict[str, Any], out: Outcome) -> None:
        """Events for what changed, and for condition flips (so `kubectl describe` tells the story)."""
        if out.created:
            self._post(body, "Created", f"created {describe_keys(out.created)}")
        if out.updated:
            self._post(body, "Updated", f"updated {describe_keys(out.updated)}")
        if out.deleted:
            self._post(body, "Deleted", f"deleted {describe_keys(out.deleted)} (no longer in the spec)")
        before = {c.get("type"): (c.get("status"), c.get("reason")) for c in out.previous_conditions}
        for c in out.status.get("conditions", []):
            if before.get(c["type"]) == (c["status"], c["reason"]):
                continue
            if c["type"] == READY and c["status"] == "True":
                self._post(body, "Ready", c["message"])
            elif c["type"] == DEGRADED and c["status"] == "True":
                self._post(body, c["reason"], c["message"], warning=True)
            elif c["type"] == REWARD_MODEL_READY and (c["status"] == "True" or c["type"] in before):
                # Losing it is a warning (best-of-N is off until it is back); a new policy's reward model that is not
                # ready yet is only being created, which Progressing already says.
                self._post(body, c["reason"], c["message"], warning=c["status"] != "True")
        if not (out.created or out.updated or out.deleted or out.status_written):
            return
        log.info(
            "reconciled %s/%s gen %s: +%d ~%d -%d =%d, %s",
            out.policy.namespace,
            out.policy.name,
            out.policy.metadata.generation,
            len(out.created),
            len(out.updated),
            len(out.deleted),
            out.skipped,
            ", ".join(f"{c['type']}={c['status']}" for c in out.status.get("conditions", [])),
        )

    def _post(self, body: dict[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
        try:
            self.kube.create(event_body(body, reason, message, warning=warning))
        except Exception as e:  # an Event is best effort; never fail a reconcile over it
            log.debug("event %s not posted: %s", reason, e)
