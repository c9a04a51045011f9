"""Leader election on a coordination.k8s.io/v1 Lease, the way client-go does it.

Two replicas run; the one holding the Lease reconciles, the other waits. Why not kopf's peering: it needs its
own cluster-scoped CRD and does not elect a single leader among equal-priority peers. Expiry is judged by this
process's monotonic clock (how long the lease record has not changed), never by comparing timestamps written by
another machine, so clock skew between nodes cannot make two replicas leaders.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from .config import OperatorConfig
from .errors import KubeError, LeaseLost
from .kube import Kube

log = logging.getLogger(__name__)


def _micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, kube: Kube, cfg: OperatorConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.cfg = cfg
        self.clock = clock
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self.is_leader = False

    def _lease(self, rv: str | None, transitions: int, acquire_time: str | None) -> dict[str, Any]:
        now = _micro_now()
        md: dict[str, Any] = {"name": self.cfg.lease_name, "namespace": self.cfg.lease_namespace}
        if rv:
            md["resourceVersion"] = rv
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": md,
            "spec": {
                "holderIdentity": self.cfg.identity,
                "leaseDurationSeconds": self.cfg.lease_duration_seconds,
                "acquireTime": acquire_time or now,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }

    def try_acquire_or_renew(self) -> bool:
        """One attempt (blocking). True when this replica holds the lease afterwards."""
        current = self.kube.get("Lease", self.cfg.lease_namespace, self.cfg.lease_name)
        if current is None:
            try:
                self.kube.create(self._lease(None, 0, None))
            except KubeError as e:
                if e.status == 409:
                    return False  # someone else created it first
                raise
            self._mark(True)
            return True
        spec = current.get("spec", {}) or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, str(spec.get("renewTime")))
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()
        duration = int(spec.get("leaseDurationSeconds") or self.cfg.lease_duration_seconds)
        mine = holder == self.cfg.identity
        expired = self.clock() - self._observed_at >= duration
        if not mine and holder and not expired:
            self._mark(False)
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        lease = self._lease(
            current["metadata"]["resourceVersion"], transitions, spec.get("acquireTime") if mine else None
        )
        try:
            self.kube.replace(lease)  # resourceVersion makes this a compare-and-swap
        except KubeError as e:
            if e.status == 409:
                self._mark(False)
                return False
            raise
        self._mark(True)
        return True

    def _mark(self, leader: bool) -> None:
        if leader != self.is_leader:
            log.info(
                "%s leadership of lease %s/%s",
                "acquired" if leader else "do not hold",
                self.cfg.lease_namespace,
                self.cfg.lease_name,
            )
        self.is_leader = leader

    def release(self) -> None:
        """Give the lease up at shutdown so the standby takes over at once instead of after expiry."""
        if not self.is_leader:
            return
        try:
            current = self.kube.get("Lease", self.cfg.lease_namespace, self.cfg.lease_name)
            if current and (current.get("spec") or {}).get("holderIdentity") == self.cfg.identity:
                current["spec"]["holderIdentity"] = ""
                current["spec"]["leaseDurationSeconds"] = 1
                self.kube.replace(current)
        except KubeError as e:
            log.warning("could not release the lease: %s", e)
        self.is_leader = False

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until leader (True) or until stop is set (False)."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                if await loop.run_in_executor(None, self.try_acquire_or_renew):
                    return True
            except KubeError as e:
                log.warning("lease: %s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.cfg.lease_renew_seconds / 2)
        return False

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew until stop is set; raise LeaseLost when renewal fails for a whole lease duration."""
        loop = asyncio.get_running_loop()
        last_ok = self.clock()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.cfg.lease_renew_seconds)
                return
            except TimeoutError:
                pass
            try:
                ok = await loop.run_in_executor(None, self.try_acquire_or_renew)
            except KubeError as e:
                log.warning("lease renewal failed: %s", e)
                ok = False
            if ok:
                last_ok = self.clock()
            elif not self.is_leader or self.clock() - last_ok >= self.cfg.lease_duration_seconds:
                raise LeaseLost(f"lost lease {self.cfg.lease_namespace}/{self.cfg.lease_name}")
