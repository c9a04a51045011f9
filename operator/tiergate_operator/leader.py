"""Leader election on a coordination.k8s.io/v1 Lease, with client-go's timing: lease duration > renew deadline >
retry period (15 s / 10 s / 2 s by default).

Two replicas run; the one holding the Lease reconciles, the other waits. Why not kopf's peering: it needs its
own cluster-scoped CRD and does not elect a single leader among equal-priority peers.

Why at most one replica writes, even when the leader is frozen (SIGSTOP, a stalled VM) or cut off from the API
server:
- A standby takes the lease over only when the lease record has not changed for a whole lease duration, judged
  by its own monotonic clock from the moment it first saw that record; never by comparing timestamps written by
  another machine, so clock skew between nodes plays no part.
- The leader writes only while its last successful renewal *started* less than a renew deadline ago, on its own
  monotonic clock (`check_leader`, called by kube.Kube before every write, in the writing thread). The record
  that renewal wrote reached the API server after that start, and a standby saw it later still, so the standby
  waits until at least start + lease duration: the leader's last write comes a margin (duration - deadline)
  earlier. A process resumed after a freeze reads its clock before its next write and finds the lease stale.
- Every request of the elector is bounded well inside the renew deadline, and the renew loop stops waiting for
  a hung one when the deadline passes: losing the lease is noticed within the deadline, not after a hung call.
What remains is a write already past the check when the process is frozen and sent when it resumes; the margin
covers a slow request, not a freeze in that instant (client-go has the same window; only fencing by the API
server could close it, and Kubernetes offers none for arbitrary writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from .config import OperatorConfig
from .errors import KubeError, LeaseLost, NotLeader

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class LeaseApi(Protocol):
    """The three calls the elector makes (kube.Kube has them); tests pass a fake."""

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None: ...

    def create(self, obj: Obj) -> Obj: ...

    def replace(self, obj: Obj) -> Obj: ...


def _micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _wait_stop(stop: asyncio.Event, seconds: float) -> bool:
    """True when stop was set within `seconds`. `asyncio.timeout` around the wait itself, not `wait_for`: kopf's
    SIGTERM handling cancels the tasks created after it started, `wait_for`'s inner task among them, which would end
    the lease holder cancelled instead of stopped (tenant_spend.py had that bug)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


class LeaderElector:
    def __init__(
        self,
        api: LeaseApi,
        cfg: OperatorConfig,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[asyncio.Event, float], Awaitable[bool]] = _wait_stop,
    ) -> None:
        self.api = api
        self.cfg = cfg
        self.clock = clock
        self._wait = wait
        # (holder, renewTime, resourceVersion) last seen: any write to the record restarts the standby's wait.
        self._observed: tuple[str, str, str] | None = None
        self._observed_at = 0.0
        # Monotonic time at which the last successful acquire/renew started; None: not the leader. Written by the
        # elector's thread, read by writers' threads (one attribute: atomic).
        self._renewed_at: float | None = None
        self.is_leader = False
        # One thread of its own: lease calls never queue behind reconciles or watches in a shared pool.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease")

    # --- the write gate ---------------------------------------------------------------------------------------

    def holds_lease(self) -> bool:
        renewed = self._renewed_at
        return renewed is not None and self.clock() - renewed < self.cfg.lease_renew_deadline_seconds

    def check_leader(self) -> None:
        """The write guard: raise NotLeader unless a renewal started within the renew deadline succeeded."""
        if not self.holds_lease():
            raise NotLeader(
                f"{self.cfg.identity} cannot prove it holds lease {self.cfg.lease_namespace}/{self.cfg.lease_name} "
                f"(no successful renewal within {self.cfg.lease_renew_deadline_seconds:g}s): write refused"
            )

    # --- one attempt ----------------------------------------------------------------------------------------

    def _lease(self, rv: str | None, transitions: int, acquire_time: str | None) -> Obj:
        now = _micro_now()
        md: Obj = {"name": self.cfg.lease_name, "namespace": self.cfg.lease_namespace}
        if rv:
            md["resourceVersion"] = rv
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": md,
            "spec": {
                "holderIdentity": self.cfg.identity,
                "leaseDurationSeconds": math.ceil(self.cfg.lease_duration_seconds),
                "acquireTime": acquire_time or now,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }

    def try_acquire_or_renew(self) -> bool:
        """One attempt (blocking). True when this replica holds the lease afterwards."""
        started = self.clock()
        current = self.api.get("Lease", self.cfg.lease_namespace, self.cfg.lease_name)
        if current is None:
            try:
                self.api.create(self._lease(None, 0, None))
            except KubeError as e:
                if e.status == 409:
                    return self._mark(None)  # someone else created it first
                raise
            return self._mark(started)
        spec = current.get("spec", {}) or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, str(spec.get("renewTime")), str(current.get("metadata", {}).get("resourceVersion")))
        now = self.clock()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.cfg.lease_duration_seconds)
        mine = holder == self.cfg.identity
        expired = now - self._observed_at >= duration
        if not mine and holder and not expired:
            return self._mark(None)
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        lease = self._lease(
            current["metadata"]["resourceVersion"], transitions, spec.get("acquireTime") if mine else None
        )
        try:
            self.api.replace(lease)  # resourceVersion makes this a compare-and-swap
        except KubeError as e:
            if e.status == 409:
                return self._mark(None)  # someone else wrote the record since we read it
            raise
        return self._mark(started)

    def _mark(self, renewed_at: float | None) -> bool:
        leader = renewed_at is not None
        self._renewed_at = renewed_at
        if leader != self.is_leader:
            log.info(
                "%s lease %s/%s as %s",
                "acquired" if leader else "do not hold",
                self.cfg.lease_namespace,
                self.cfg.lease_name,
                self.cfg.identity,
            )
        self.is_leader = leader
        return leader

    def release(self) -> None:
        """Give the lease up at shutdown so the standby takes over at once instead of after expiry."""
        if not self.is_leader:
            return
        self._renewed_at = None  # no write after this point
        try:
            current = self.api.get("Lease", self.cfg.lease_namespace, self.cfg.lease_name)
            if current and (current.get("spec") or {}).get("holderIdentity") == self.cfg.identity:
                current["spec"]["holderIdentity"] = ""
                current["spec"]["leaseDurationSeconds"] = 1
                self.api.replace(current)
        except KubeError as e:
            log.warning("could not release the lease: %s", e)
        self.is_leader = False

    # --- loops ----------------------------------------------------------------------------------------------

    async def _attempt(self, give_up_after: float | None) -> bool:
        """One attempt in the elector's thread; False on an API error or when `give_up_after` seconds pass first
        (the thread then finishes on its own, bounded by the per-request timeout)."""
        fut = asyncio.get_running_loop().run_in_executor(self._pool, self.try_acquire_or_renew)
        try:
            return await asyncio.wait_for(fut, timeout=give_up_after)
        except TimeoutError:
            log.warning("lease request still unanswered after %.1fs", give_up_after or 0.0)
        except KubeError as e:
            log.warning("lease: %s", e)
        return False

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until leader (True) or until stop is set (False)."""
        while not stop.is_set():
            if await self._attempt(None):
                return True
            if await self._wait(stop, self.cfg.lease_retry_period_seconds):
                break
        return False

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew every retry period until stop is set; raise LeaseLost as soon as another replica holds the lease
        or no renewal has succeeded within the renew deadline (writes are refused from that moment on anyway)."""
        while not await self._wait(stop, self.cfg.lease_retry_period_seconds):
            renewed = self._renewed_at
            left = None if renewed is None else self.cfg.lease_renew_deadline_seconds - (self.clock() - renewed)
            if left is not None and left > 0:
                await self._attempt(left)
            if not self.holds_lease():
                self.is_leader = False
                raise LeaseLost(
                    f"lost lease {self.cfg.lease_namespace}/{self.cfg.lease_name}: not renewed within "
                    f"{self.cfg.lease_renew_deadline_seconds:g}s or held by another replica"
                )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
