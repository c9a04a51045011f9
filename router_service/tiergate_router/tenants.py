"""Tenants: who is calling (API keys), what they may use (tiers), how much (limits, daily budget), and accounting.

The front ends call `TenantGate.authenticate` with the request's `Authorization` header (HTTP) or `authorization`
metadata (gRPC) before reading anything else; `Router.route` calls `TenantGate.admit` with the tier the client
named, which checks the tier (403), the limits and the budget (429), and returns the tenant's `Access`: what the
routing decision must respect (allowed tiers, cost weight, "one tier cheaper" while the budget is low, the cheapest
tier only once it is spent). `TenantGate.charge` counts a response's tokens and spend.

Keys are never logged or kept in clear: the gate holds their SHA-256 digests and compares a presented key's digest
with every tenant's in constant time (`hmac.compare_digest`, no early exit). Keys come from the environment
(`TIERGATE_TENANT_KEY_<NAME>`, local mode) or else from one file per tenant under `Tenancy.keys_dir` (the
operator's projected volume of the tenants' Secrets, which the kubelet rewrites when a Secret changes); files are
re-read every second, so a rotated key takes effect without a restart. A tenant removed from the policy is gone with
the next `apply` (the policy reload), so its key is refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from tiergate_router.errors import TenantRefusedError
from tiergate_router.limits import BucketKeys, Limiter, StoreUnavailable, Verdict, bucket_keys

log = logging.getLogger(__name__)

NANO = 1_000_000_000
# How often key files are re-read: a rotated key is honoured within a second of the kubelet writing it.
KEY_REFRESH_S = 1.0
ANONYMOUS = "anonymous"
UNLIMITED = Verdict(True, 0, "", 0)


def key_env(tenant: str) -> str:
    """`TIERGATE_TENANT_KEY_<NAME>` (the same rule as tiergate.api.naming.tenant_key_env, which the operator and the
    documentation use; kept here too so the hot path imports nothing from the API package)."""
    return "TIERGATE_TENANT_KEY_" + tenant.upper().replace("-", "_")


@dataclass(frozen=True)
class BudgetConfig:
    daily_nano_usd: int
    low_remaining_bp: int = 2000
    low_cost_weight_bp: int | None = None
    # What happens once spent: True refuses (429), False serves the cheapest allowed tier only.
    refuse_when_spent: bool = True


@dataclass(frozen=True)
class TenantConfig:
    name: str
    # Allowed tier names; None: all.
    tiers: frozenset[str] | None = None
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    cost_weight_bp: int | None = None
    budget: BudgetConfig | None = None


@dataclass(frozen=True)
class Tenancy:
    """The tenants part of RouterConfig. No tenants and unauthenticated allowed: the router is open, as without
    tenants at all (`enabled` False)."""

    tenants: tuple[TenantConfig, ...] = ()
    allow_unauthenticated: bool = True
    # host:port of the shared limit store; None: each replica counts alone (limits divided by `replicas`).
    redis_address: str | None = None
    fail_closed: bool = False
    replicas: int = 1
    # Namespace/name of the policy: replicas of one policy share counters, other policies on the same Redis don't.
    scope: str = "local"
    keys_dir: Path | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.tenants) or not self.allow_unauthenticated

    def tenant(self, name: str) -> TenantConfig:
        for t in self.tenants:
            if t.name == name:
                return t
        raise KeyError(name)


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a tenant, or nobody (`tenant` None) where the policy lets unauthenticated requests in."""

    tenant: TenantConfig | None


UNAUTHENTICATED = Principal(None)


@dataclass(frozen=True)
class Access:
    """What one admitted request may use; `Router.route` applies it to its decision."""

    tenant: str | None = None
    tiers: frozenset[str] | None = None
    cost_weight_bp: int | None = None
    # The budget is low: one tier cheaper than the decision (unless a low cost weight applies instead).
    cheaper: bool = False
    # The budget is spent and the policy says CheapestTier.
    cheapest_only: bool = False
    keys: BucketKeys | None = field(default=None, compare=False)


OPEN = Access()


def allowed_tiers(names: tuple[str, ...], access: Access) -> list[str]:
    return [n for n in names if access.tiers is None or n in access.tiers]


def restrict_choice(chosen: str, names: tuple[str, ...], access: Access) -> str:
    """The tier a tenant gets for the router's choice `chosen` (names cheapest first): the cheapest allowed tier
    when only that is left; else the strongest allowed tier not above the choice (the cheapest allowed one when
    none is), then one allowed tier lower while the budget is low."""
    allowed = allowed_tiers(names, access)
    if not allowed:
        raise TenantRefusedError(
            f"tenant {access.tenant!r} may use none of the tiers served ({', '.join(names)})",
            status=403,
            code="tier_not_allowed",
        )
    if access.cheapest_only:
        return allowed[0]
    rank = names.index(chosen)
    below = [n for n in allowed if names.index(n) <= rank]
    pick = below[-1] if below else allowed[0]
    if access.cheaper:
        i = allowed.index(pick)
        pick = allowed[max(0, i - 1)]
    return pick


def restrict_chain(chain: list[str], access: Access) -> list[str]:
    """The fallback chain without tiers the tenant may not use (and only the first tier once the budget is spent
    and CheapestTier applies: a fallback to a dearer tier would spend again)."""
    out = [t for t in chain if access.tiers is None or t in access.tiers]
    return out[:1] if access.cheapest_only else out


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """Tenant name -> digest of its current key, from the environment first, else `keys_dir/<name>`."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ
        self._digests: tuple[tuple[str, bytes], ...] = ()
        self._missing_logged: set[str] = set()

    def load(self, tenancy: Tenancy) -> None:
        env = os.environ if self._environ is None else self._environ
        out: list[tuple[str, bytes]] = []
        for t in tenancy.tenants:
            key = env.get(key_env(t.name), "").strip()
            if not key and tenancy.keys_dir is not None:
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    key = (tenancy.keys_dir / t.name).read_text(encoding="utf-8").strip()
            if key:
                out.append((t.name, _digest(key)))
                self._missing_logged.discard(t.name)
            elif t.name not in self._missing_logged:
                self._missing_logged.add(t.name)
                where = f" nor in {tenancy.keys_dir / t.name}" if tenancy.keys_dir is not None else ""
                log.warning("tenant %s has no API key (not in %s%s): refused", t.name, key_env(t.name), where)
        self._digests = tuple(out)

    def match(self, key: str) -> str | None:
        """The tenant whose key this is. Every tenant's digest is compared, in constant time, whatever matches."""
        d = _digest(key)
        found: str | None = None
        for name, ref in self._digests:
            if hmac.compare_digest(d, ref):
                found = name
        return found


class TenantMetrics:
    """Per-tenant counters. Labels are declared tenant names (and `anonymous`) only, so the series are bounded by
    the policy, whatever keys clients send; the reasons are a fixed set."""

    REASONS = (
        "unauthenticated",
        "invalid_key",
        "tier_not_allowed",
        "requests_per_minute",
        "tokens_per_minute",
        "budget_spent",
        "limit_store_unavailable",
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        p = "tiergate_router_tenant"
        self.requests = Counter(f"{p}_requests", "Requests admitted per tenant", ["tenant"], registry=registry)
        self.refusals = Counter(
            f"{p}_refusals",
            "Requests refused per tenant (`none`: no valid key) and reason",
            ["tenant", "reason"],
            registry=registry,
        )
        self.tokens = Counter(f"{p}_tokens", "Tokens per tenant", ["tenant", "kind"], registry=registry)
        self.spend = Counter(
            f"{p}_spend_dollars", "Spend per tenant from token counts and tier prices", ["tenant"], registry=registry
        )
        self.budget_state = Gauge(
            f"{p}_budget_state",
            "Daily budget per tenant as last seen: 0 ok, 1 low (routed cheaper), 2 spent",
            ["tenant"],
            registry=registry,
        )
        self.store_up = Gauge(
            "tiergate_router_limit_store_up", "1 when the shared limit store (Redis) answered last", registry=registry
        )


def utc_day(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d")


def seconds_to_midnight(now: dt.datetime | None = None) -> int:
    now = now or dt.datetime.now(dt.UTC)
    tomorrow = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((tomorrow - now).total_seconds()))


def budget_access(t: TenantConfig, spent_nano: int) -> tuple[str, Access | None]:
    """("ok" | "low" | "spent", the budget's effect on access or None for none; the caller refuses when spent and
    refusing)."""
    b = t.budget
    if b is None:
        return "ok", None
    if spent_nano >= b.daily_nano_usd:
        return "spent", Access(cheapest_only=True)
    remaining = b.daily_nano_usd - spent_nano
    if remaining * 10_000 < b.low_remaining_bp * b.daily_nano_usd:
        if b.low_cost_weight_bp is not None:
            return "low", Access(cost_weight_bp=b.low_cost_weight_bp)
        return "low", Access(cheaper=True)
    return "ok", None


class TenantGate:
    """Authentication, admission and charging for one router; `apply` takes a new Tenancy (policy reload)."""

    def __init__(
        self, tenancy: Tenancy, registry: CollectorRegistry, *, environ: Mapping[str, str] | None = None
    ) -> None:
        self.tenancy = tenancy
        self.metrics = TenantMetrics(registry)
        self.keys = KeyRing(environ)
        self.limiter = self._limiter(tenancy)
        self.keys.load(tenancy)
        self._task: asyncio.Task[None] | None = None
        self._closing: list[Limiter] = []

    @staticmethod
    def _limiter(t: Tenancy) -> Limiter:
        return Limiter(t.redis_address, t.replicas, fail_closed=t.fail_closed)

    def apply(self, tenancy: Tenancy) -> None:
        old = self.tenancy
        self.tenancy = tenancy
        if (old.redis_address, old.replicas, old.fail_closed) != (
            tenancy.redis_address,
            tenancy.replicas,
            tenancy.fail_closed,
        ):
            self._closing.append(self.limiter)
            self.limiter = self._limiter(tenancy)
        self.keys.load(tenancy)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._refresh_keys())

    async def _refresh_keys(self) -> None:
        while True:
            await asyncio.sleep(KEY_REFRESH_S)
            self.keys.load(self.tenancy)
            while self._closing:
                await self._closing.pop().aclose()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for lim in (self.limiter, *self._closing):
            await lim.aclose()

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller from an `Authorization: Bearer KEY` value; TenantRefusedError (401) without a valid key, unless
        the policy lets unauthenticated requests in (a key that is sent must still be valid)."""
        t = self.tenancy
        if not t.enabled:
            return UNAUTHENTICATED
        if not authorization:
            if t.allow_unauthenticated:
                return UNAUTHENTICATED
            self.metrics.refusals.labels("none", "unauthenticated").inc()
            raise TenantRefusedError(
                "no API key: send it as 'Authorization: Bearer KEY'", status=401, code="missing_api_key"
            )
        scheme, _, key = authorization.strip().partition(" ")
        name = self.keys.match(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if name is None:
            self.metrics.refusals.labels("none", "invalid_key").inc()
            # Never echo the key, not even a prefix of it.
            raise TenantRefusedError("invalid API key", status=401, code="invalid_api_key")
        return Principal(t.tenant(name))

    async def admit(self, principal: Principal, forced_tier: str | None) -> Access:
        """Check the tier a client named, the limits and the budget; the Access the decision must respect.
        TenantRefusedError: 403 for a tier the tenant may not use, 429 over a limit or budget, 503 when the limit
        store is down and the policy fails closed."""
        t = principal.tenant
        if t is None:
            if self.tenancy.enabled:
                self.metrics.requests.labels(ANONYMOUS).inc()
            return OPEN
        m = self.metrics
        if forced_tier is not None and t.tiers is not None and forced_tier not in t.tiers:
            m.refusals.labels(t.name, "tier_not_allowed").inc()
            raise TenantRefusedError(
                f"tenant {t.name!r} may not use tier {forced_tier!r} (allowed: {', '.join(sorted(t.tiers))})",
                status=403,
                code="tier_not_allowed",
                param="model",
            )
        keys = bucket_keys(self.tenancy.scope, t.name, utc_day())
        try:
            # A tenant with neither limits nor budget has nothing to count: no round trip to the store.
            v = (
                await self.limiter.admit(keys, t.requests_per_minute, t.tokens_per_minute)
                if t.requests_per_minute or t.tokens_per_minute or t.budget is not None
                else UNLIMITED
            )
        except StoreUnavailable as e:
            m.store_up.set(0)
            m.refusals.labels(t.name, "limit_store_unavailable").inc()
            raise TenantRefusedError(
                "the limit store is unavailable and the policy refuses requests then",
                status=503,
                code="limit_store_unavailable",
                retry_after_s=1,
            ) from e
        m.store_up.set(1 if self.limiter.store_up else 0)
        if not v.allowed:
            limit = f"{v.limit}_per_minute"
            value = t.requests_per_minute if v.limit == "requests" else t.tokens_per_minute
            m.refusals.labels(t.name, limit).inc()
            raise TenantRefusedError(
                f"tenant {t.name!r} is over its limit of {value} {v.limit} per minute",
                status=429,
                code="rate_limit_exceeded",
                type_=v.limit,
                retry_after_s=max(1, math.ceil(v.retry_after_ms / 1000)),
                limit=limit,
            )
        state, effect = budget_access(t, v.spent_nano)
        m.budget_state.labels(t.name).set(("ok", "low", "spent").index(state))
        if state == "spent" and t.budget is not None and t.budget.refuse_when_spent:
            m.refusals.labels(t.name, "budget_spent").inc()
            raise TenantRefusedError(
                f"tenant {t.name!r} has spent its daily budget of {t.budget.daily_nano_usd / NANO:.2f} USD",
                status=429,
                code="budget_exceeded",
                type_="insufficient_quota",
                retry_after_s=seconds_to_midnight(),
                limit="daily_budget",
            )
        m.requests.labels(t.name).inc()
        cost_weight = t.cost_weight_bp
        cheaper = cheapest = False
        if effect is not None:
            cost_weight = effect.cost_weight_bp if effect.cost_weight_bp is not None else cost_weight
            cheaper, cheapest = effect.cheaper, effect.cheapest_only
        return Access(
            tenant=t.name,
            tiers=t.tiers,
            cost_weight_bp=cost_weight,
            cheaper=cheaper,
            cheapest_only=cheapest,
            keys=keys,
        )

    async def charge(self, access: Access, prompt_tokens: int, completion_tokens: int, dollars: float) -> None:
        """Count a response against its tenant: tokens into the tokens-per-minute bucket, cost into today's spend
        (rounded up to the nano-dollar, so that many small answers never add up to less than they cost)."""
        if access.tenant is None or access.keys is None:
            return
        try:
            t = self.tenancy.tenant(access.tenant)
        except KeyError:
            return  # removed from the policy while the request ran
        tokens = prompt_tokens + completion_tokens
        nano = math.ceil(dollars * NANO) if dollars > 0 else 0
        self.metrics.tokens.labels(t.name, "prompt").inc(prompt_tokens)
        self.metrics.tokens.labels(t.name, "completion").inc(completion_tokens)
        self.metrics.spend.labels(t.name).inc(nano / NANO)
        if t.tokens_per_minute or (t.budget is not None and nano):
            await self.limiter.charge(access.keys, t.tokens_per_minute, tokens, nano if t.budget else 0)
