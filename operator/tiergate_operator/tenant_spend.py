"""Per-tenant spend in the policy's status: once a minute the leader reads today's spend of every tenant with a
budget from the policy's limit store (the Redis the routers count in) and writes `status.tenants`.

The routers keep the counters (tiergate_router.limits) under the names `tiergate.api.naming` gives them; the
operator only reads them, with one MGET per policy. A policy without `spec.limitStore` has no shared count (each
router replica counts its share alone), so it gets no `status.tenants`. A store that cannot be reached leaves the
last status as it was (logged once per policy and outage): the count is the routers' business, the status a view.
The building of the status entries is pure (`spend_entries`); the loop around it only reads, compares and patches.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from tiergate.api import naming
from tiergate.api.errors import PolicyValidationError
from tiergate.api.policy import KIND, RoutingPolicy, TenantSpendState, parse_policy
from tiergate.resp import RedisConnection, RedisError, RedisUnavailable

from .errors import KubeError
from .kube import Kube

log = logging.getLogger(__name__)

# Once a minute: spend moves continuously, and a status write per policy per minute is a small load on the API
# server (one PATCH, only when a figure changed).
REPORT_SECONDS = 60.0
NANO = Decimal(1_000_000_000)


def _usd(nano: int) -> str:
    return format((Decimal(nano) / NANO).normalize(), "f")


def spend_entries(policy: RoutingPolicy, spent_nano: Mapping[str, int], day: dt.date) -> list[dict[str, Any]]:
    """`status.tenants` for the policy's tenants with a budget, from their spend in nano-dollars (absent: none yet).
    The state follows the router's rule (tiergate_router.tenants.budget_access): Spent at the budget, Low below
    lowRemainingBasisPoints of it left."""
    out: list[dict[str, Any]] = []
    for t in policy.spec.tenants:
        b = t.budget
        if b is None:
            continue
        spent = spent_nano.get(t.name, 0)
        daily = int(b.daily_usd * NANO)
        state = TenantSpendState.OK
        if spent >= daily:
            state = TenantSpendState.SPENT
        elif (daily - spent) * 10_000 < b.low_remaining_basis_points * daily:
            state = TenantSpendState.LOW
        out.append(
            {
                "name": t.name,
                "day": day.isoformat(),
                "spentUsd": _usd(spent),
                "dailyUsd": _usd(daily),
                "state": state.value,
            }
        )
    return out


async def read_spend(conn: RedisConnection, scope: str, tenants: Sequence[str], day: dt.date) -> dict[str, int]:
    """Today's spend per tenant (nano-dollars; tenants without a counter yet are left out). RedisUnavailable or
    RedisError when the store cannot answer."""
    if not tenants:
        return {}
    keys = [naming.tenant_spend_key(scope, t, day.strftime("%Y%m%d")) for t in tenants]
    reply = await conn.execute("MGET", *keys)
    if not isinstance(reply, list):
        raise RedisError(f"unexpected MGET answer: {reply!r}")
    return {t: int(v) for t, v in zip(tenants, reply, strict=True) if isinstance(v, bytes) and v.isdigit()}


class SpendReporter:
    """The loop: `policies` gives the latest policy bodies the controller holds; `kube` writes the status."""

    def __init__(
        self,
        kube: Kube,
        policies: Callable[[], list[dict[str, Any]]],
        *,
        interval_s: float = REPORT_SECONDS,
        today: Callable[[], dt.date] = lambda: dt.datetime.now(dt.UTC).date(),
    ) -> None:
        self.kube = kube
        self.policies = policies
        self.interval_s = interval_s
        self.today = today
        self._conns: dict[str, RedisConnection] = {}
        self._failing: set[str] = set()
        # What was last written per policy: the body the controller holds may not show our own write yet.
        self._written: dict[tuple[str, str], list[dict[str, Any]]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                # asyncio.timeout, not wait_for: wait_for runs stop.wait() as a task of its own, which kopf, on
                # SIGTERM, cancels with the other tasks born after it started ("hung" tasks); this task then ended
                # cancelled and the operator exited with a CancelledError instead of 0.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval_s):
                        await stop.wait()
                if stop.is_set():
                    break
                await self.report_all()
        finally:
            for conn in self._conns.values():
                await conn.aclose()

    async def report_all(self) -> int:
        """One pass over every policy; the number of statuses written."""
        written = 0
        for body in self.policies():
            try:
                written += await self.report(body)
            except Exception:  # one policy's failure must not stop the others' reports
                log.exception("reporting the tenants' spend of a policy failed")
        return written

    async def report(self, body: Mapping[str, Any]) -> int:
        try:
            policy = parse_policy(body)
        except PolicyValidationError:
            return 0  # the reconciler reports an invalid spec
        store = policy.spec.limit_store
        budgeted = [t.name for t in policy.spec.tenants if t.budget is not None]
        if store is None or not budgeted:
            return 0
        conn = self._conns.get(store.redis_address)
        if conn is None:
            conn = self._conns[store.redis_address] = RedisConnection(store.redis_address, timeout_s=2.0)
        day = self.today()
        scope = naming.limit_scope(policy.metadata.namespace, policy.name)
        where = f"{scope} ({store.redis_address})"
        try:
            spent = await read_spend(conn, scope, budgeted, day)
        except (RedisUnavailable, RedisError) as e:
            if where not in self._failing:
                log.warning("tenants' spend of %s not read: %s", where, e)
                self._failing.add(where)
            return 0
        self._failing.discard(where)
        entries = spend_entries(policy, spent, day)
        ns = policy.metadata.namespace or "default"
        current = (body.get("status") or {}).get("tenants") or []
        if entries in (current, self._written.get((ns, policy.name))):
            return 0
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, self.kube.patch_status, KIND, ns, policy.name, {"tenants": entries}
            )
        except KubeError as e:
            log.warning("status.tenants of %s/%s not written: %s", ns, policy.name, e)
            return 0
        self._written[(ns, policy.name)] = entries
        return 1
