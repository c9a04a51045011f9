"""Per-tenant request and token limits and daily spend, counted in Redis across router replicas.

Each limit is a token bucket that holds one minute's worth and refills continuously (requests per minute: a
bucket of `rpm` that loses one per request; tokens per minute: a bucket of `tpm` charged with each response's
tokens). Unlike a fixed window there is no burst of twice the limit at a window's edge, and the wait until the next
admission (Retry-After) follows from the level. One Lua script checks and takes from both buckets and reads the
day's spend, atomically, on the server's clock (`TIME`), so replicas with skewed clocks still agree.

When Redis cannot be reached (`RedisStore` raises `StoreUnavailable`), `Limiter` either refuses (fail closed) or
counts on its own with every limit divided by the replica count (`LocalStore`): with R replicas behind a balancing
Service the door stays about as closed as with Redis. The documented bound: during an outage a tenant may get up to
one extra minute's worth (each replica starts with a full bucket of its share), and what was counted locally is not
written back to Redis when it returns. The day's spend continues from what Redis last reported.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol

from tiergate.api import naming
from tiergate.resp import RedisConnection, RedisError, RedisUnavailable, RespValue

log = logging.getLogger(__name__)

# Buckets and spend counters expire when idle: a bucket untouched for two minutes is full again anyway, and a
# day's spend is needed until the day ends (two days cover any clock skew at midnight).
BUCKET_TTL_MS = 120_000
SPEND_TTL_S = 2 * 86_400
MINUTE_MS = 60_000

# KEYS: requests bucket, tokens bucket, spend counter. ARGV: mode ("admit" | "charge"), rpm (0: none), tpm (0: none),
# tokens to charge, nano-dollars to add. Buckets are hashes {l: level, t: last update in ms}.
# admit -> {1, 0, "", spent} or {0, retry_after_ms, "requests"|"tokens", spent}; charge -> {1, 0, "", spent}.
LUA = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  local l, t = tonumber(v[1]), tonumber(v[2])
  if l == nil or t == nil then return cap end
  return math.min(cap, l + math.max(0, now - t) * cap / 60000)
end
local function store(key, l)
  redis.call('HSET', key, 'l', tostring(l), 't', tostring(now))
  redis.call('PEXPIRE', key, tonumber(ARGV[6]))
end
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[1] == 'charge' then
  if tpm > 0 then store(KEYS[2], math.max(-tpm, level(KEYS[2], tpm) - tonumber(ARGV[4]))) end
  local spent = tonumber(ARGV[5])
  if spent > 0 then
    spent = redis.call('INCRBY', KEYS[3], spent)
    redis.call('EXPIRE', KEYS[3], tonumber(ARGV[7]))
  else
    spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  end
  return {1, 0, '', spent}
end
local spent = tonumber(redis.call('GET', KEYS[3]) or '0')
local r = 0
if rpm > 0 then
  r = level(KEYS[1], rpm)
  if r < 1 then return {0, math.ceil((1 - r) * 60000 / rpm), 'requests', spent} end
end
if tpm > 0 then
  local k = level(KEYS[2], tpm)
  if k < 1 then return {0, math.ceil((1 - k) * 60000 / tpm), 'tokens', spent} end
end
if rpm > 0 then store(KEYS[1], r - 1) end
return {1, 0, '', spent}
"""
LUA_SHA = hashlib.sha1(LUA.encode()).hexdigest()


class StoreUnavailable(Exception):
    """The shared counters cannot be reached."""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    # Milliseconds until the bucket that refused holds one again (0 when allowed).
    retry_after_ms: int
    # "requests" or "tokens": the limit that refused ("" when allowed).
    limit: str
    # Nano-dollars spent today by the tenant, as the store counts it.
    spent_nano: int


@dataclass(frozen=True)
class BucketKeys:
    requests: str
    tokens: str
    spend: str


def bucket_keys(scope: str, tenant: str, day: str) -> BucketKeys:
    """Keys of one tenant's counters (`tiergate.api.naming`: the operator reads the spend under the same name)."""
    tag = naming.tenant_key_prefix(scope, tenant)
    return BucketKeys(f"{tag}:rq", f"{tag}:tok", naming.tenant_spend_key(scope, tenant, day))


class Store(Protocol):
    async def admit(self, keys: BucketKeys, rpm: int, tpm: int) -> Verdict: ...
    async def charge(self, keys: BucketKeys, tpm: int, tokens: int, nano: int) -> None: ...


def _verdict(reply: RespValue) -> Verdict:
    if not isinstance(reply, list) or len(reply) != 4:
        raise StoreUnavailable(f"unexpected answer from the limit script: {reply!r}")
    ok, retry, which, spent = reply
    if not isinstance(ok, int) or not isinstance(retry, int) or not isinstance(spent, int):
        raise StoreUnavailable(f"unexpected answer from the limit script: {reply!r}")
    name = which.decode() if isinstance(which, bytes) else str(which or "")
    return Verdict(ok == 1, retry, name, spent)


class RedisStore:
    """The counters in Redis, through the `LUA` script (EVALSHA, loaded with EVAL on the first NOSCRIPT)."""

    def __init__(self, address: str, *, timeout_s: float = 0.5) -> None:
        self.conn = RedisConnection(address, timeout_s=timeout_s)

    def _args(self, mode: str, keys: BucketKeys, rpm: int, tpm: int, tokens: int, nano: int) -> list[str | int]:
        return [3, keys.requests, keys.tokens, keys.spend, mode, rpm, tpm, tokens, nano, BUCKET_TTL_MS, SPEND_TTL_S]

    async def _run(self, args: list[str | int], fut: asyncio.Future[RespValue] | None = None) -> RespValue:
        try:
            try:
                if fut is not None:
                    return await self.conn.wait(fut)
                return await self.conn.execute("EVALSHA", LUA_SHA, *args)
            except RedisError as e:
                if not str(e).startswith("NOSCRIPT"):
                    raise
                return await self.conn.execute("EVAL", LUA, *args)
        except (RedisUnavailable, RedisError) as e:
            raise StoreUnavailable(str(e)) from e

    async def admit(self, keys: BucketKeys, rpm: int, tpm: int) -> Verdict:
        return _verdict(await self._run(self._args("admit", keys, rpm, tpm, 0, 0)))

    async def charge(self, keys: BucketKeys, tpm: int, tokens: int, nano: int) -> None:
        args = self._args("charge", keys, 0, tpm, tokens, nano)
        # Written now, in order after the request's own admission, so that this replica's next admission of the
        # tenant sees the charge; the answer is awaited afterwards.
        fut = self.conn.send_now("EVALSHA", LUA_SHA, *args)
        await self._run(args, fut)

    async def aclose(self) -> None:
        await self.conn.aclose()


class _Bucket:
    def __init__(self, cap: float, now: float) -> None:
        self.cap, self.level, self.t = cap, cap, now

    def refill(self, now: float) -> float:
        self.level = min(self.cap, self.level + max(0.0, now - self.t) * self.cap / MINUTE_MS)
        self.t = now
        return self.level


class LocalStore:
    """The same buckets in this process, each limit divided by `replicas` (at least one request or token a
    minute): what a replica enforces alone while Redis is down, or when the policy names no limit store."""

    def __init__(self, replicas: int) -> None:
        self.replicas = max(1, replicas)
        self._buckets: dict[str, _Bucket] = {}
        self._spend: dict[str, int] = {}
        # Per spend key, the day's spend Redis last reported: an outage continues from it instead of from zero.
        self.baseline: dict[str, int] = {}

    def _share(self, limit: int) -> int:
        return max(1, math.ceil(limit / self.replicas)) if limit > 0 else 0

    def _bucket(self, key: str, cap: int, now: float) -> _Bucket:
        b = self._buckets.get(key)
        if b is None or b.cap != cap:
            b = self._buckets[key] = _Bucket(cap, now)
        b.refill(now)
        return b

    def spent(self, keys: BucketKeys) -> int:
        # What Redis last said, plus this replica's own count since, scaled up: each replica counts its share (the
        # requests are spread over the replicas), so multiplying back estimates the whole policy's spend.
        return self.baseline.get(keys.spend, 0) + self._spend.get(keys.spend, 0) * self.replicas

    async def admit(self, keys: BucketKeys, rpm: int, tpm: int) -> Verdict:
        now = time.monotonic() * 1000
        rpm, tpm = self._share(rpm), self._share(tpm)
        spent = self.spent(keys)
        r = self._bucket(keys.requests, rpm, now) if rpm else None
        if r is not None and r.level < 1:
            return Verdict(False, math.ceil((1 - r.level) * MINUTE_MS / rpm), "requests", spent)
        if tpm:
            k = self._bucket(keys.tokens, tpm, now)
            if k.level < 1:
                return Verdict(False, math.ceil((1 - k.level) * MINUTE_MS / tpm), "tokens", spent)
        if r is not None:
            r.level -= 1
        return Verdict(True, 0, "", spent)

    async def charge(self, keys: BucketKeys, tpm: int, tokens: int, nano: int) -> None:
        tpm = self._share(tpm)
        if tpm:
            k = self._bucket(keys.tokens, tpm, time.monotonic() * 1000)
            k.level = max(-float(tpm), k.level - tokens)
        if nano:
            # Stale days are dropped as a new one starts: the dict holds today's keys only.
            if keys.spend not in self._spend:
                day = keys.spend.rsplit(":", 1)[-1]
                self._spend = {k: v for k, v in self._spend.items() if k.endswith(day)}
                self.baseline = {k: v for k, v in self.baseline.items() if k.endswith(day)}
            self._spend[keys.spend] = self._spend.get(keys.spend, 0) + nano


class Limiter:
    """Admission and charging against the shared store, falling back to per-replica counting (or refusing, when
    `fail_closed`) while the store is unavailable."""

    def __init__(self, redis_address: str | None, replicas: int, *, fail_closed: bool) -> None:
        self.redis = RedisStore(redis_address) if redis_address else None
        self.local = LocalStore(replicas)
        self.fail_closed = fail_closed
        # Whether the last call reached Redis (for the store-up gauge, and to log transitions once).
        self.store_up = self.redis is not None

    def _down(self, e: Exception) -> None:
        if self.store_up:
            log.warning(
                "limit store unavailable, %s: %s",
                "refusing tenant requests" if self.fail_closed else "limits counted per replica",
                e,
            )
        self.store_up = False

    def _up(self) -> None:
        if not self.store_up:
            log.info("limit store reachable again: limits shared across replicas")
        self.store_up = True

    async def admit(self, keys: BucketKeys, rpm: int, tpm: int) -> Verdict:
        """Raises StoreUnavailable only when failing closed."""
        if self.redis is not None:
            try:
                v = await self.redis.admit(keys, rpm, tpm)
                self._up()
                self.local.baseline[keys.spend] = v.spent_nano
                return v
            except StoreUnavailable as e:
                self._down(e)
                if self.fail_closed:
                    raise
        return await self.local.admit(keys, rpm, tpm)

    async def charge(self, keys: BucketKeys, tpm: int, tokens: int, nano: int) -> None:
        if self.redis is not None:
            try:
                await self.redis.charge(keys, tpm, tokens, nano)
                self._up()
                return
            except StoreUnavailable as e:
                self._down(e)
        await self.local.charge(keys, tpm, tokens, nano)

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
