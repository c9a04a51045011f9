"""Sending requests to tiers: endpoint choice, retries, circuit breakers, fallback and streaming pass-through.

Failure handling, per tier in the fallback chain:
- connection refused / reset, connect timeout, a body cut short, HTTP 5xx: the endpoint's breaker counts a
  failure and the request is retried on another endpoint of the tier (at most `max_attempts_per_tier` tries);
- HTTP 429 (the backend's own back-pressure) or every endpoint at its in-flight limit: the tier is saturated;
- other 4xx: the backend judged the request itself (e.g. too long for its context): returned to the client as is,
  since another tier would most likely refuse it too and retrying would only double the cost;
- no endpoint left or tries exhausted: the next tier in the chain.
Time and load limits, as Envoy's (docs/router.md, "Deadlines and retries"):
- one overall deadline per request (`request_timeout_s`, or the client's shorter one) covers every try, every
  fallback and the backoff between them; when it passes, or when the chain's last try timed out, the request ends
  with DeadlineExceededError (HTTP 504, as Envoy's upstream timeout).
  A streaming request's deadline ends at its first byte; after that only the idle timeout applies;
- each try is bounded by `per_try_timeout_s` (when set) and by what is left of the deadline; a try past the
  per-try timeout is the endpoint's failure, and the request moves on;
- a send after a failed try is a retry; retries on the same tier wait an exponential backoff with full jitter
  first. A retry after a 5xx or a timeout (the endpoint is alive and a retry adds load) needs room in the retry
  budget (retries in flight at most max(min_retry_concurrency, retry_budget_percent of the requests in flight)),
  else RetryBudgetExhaustedError; after a refused or dropped connection (the endpoint is gone) only the breaker
  and the tries per tier bound it. Moving on from a saturated tier is load shedding, not a retry.
Non-streaming requests can be retried until the whole response is read. A streaming request is committed once
the first chunk has arrived; after that an upstream failure ends the stream (nothing else is safe).
Generation has no side effects, so replaying a request on another endpoint is always allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tiergate_router.breaker import BreakerState
from tiergate_router.config import RouterConfig, TierConfig
from tiergate_router.errors import (
    DeadlineExceededError,
    NoTierAvailableError,
    RetryBudgetExhaustedError,
    UpstreamStreamError,
    UpstreamTooLargeError,
)
from tiergate_router.metrics import RouterMetrics
from tiergate_router.pool import Endpoint, TierPool

RETRY_STATUSES = frozenset({500, 502, 503, 504})
SATURATED_STATUSES = frozenset({429})


class _TryNext(Exception):
    """A try failed in a way another try may mend. `budgeted`: the endpoint answered badly (5xx) or too slowly (a
    timeout), so it is alive and working, and a retry adds load: the retry budget applies. A connection that was
    refused, reset or dropped means the endpoint is gone: a retry moves the same work elsewhere, bounded by the
    breaker and the tries per tier, not by the budget (so that losing a pod under load loses no request)."""

    def __init__(
        self,
        reason: str,
        *,
        endpoint_failed: bool,
        saturated: bool = False,
        budgeted: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(reason)
        self.timed_out = timed_out
        self.reason = reason
        self.endpoint_failed = endpoint_failed
        self.saturated = saturated
        self.budgeted = budgeted


@dataclass
class UpstreamReply:
    """A complete (non-streaming) answer from a tier."""

    tier: str
    endpoint: str
    status: int
    content_type: str
    body: bytes
    fallback: bool
    attempts: list[str] = field(default_factory=list)


@dataclass
class UpstreamStream:
    """A committed streaming answer: headers and first chunk received; iterate `chunks()` for the rest."""

    tier: str
    endpoint: str
    status: int
    content_type: str
    fallback: bool
    first_chunk: bytes
    _resp: aiohttp.ClientResponse
    _ep: Endpoint
    _dispatcher: Dispatcher
    _done: bool = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The first chunk, then every chunk as the backend sends it (no re-buffering: token by token)."""
        yield self.first_chunk
        idle = self._dispatcher.config.stream_idle_timeout_s
        try:
            while True:
                async with asyncio.timeout(idle):
                    chunk = await self._resp.content.readany()
                if not chunk:
                    break
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as e:
            self._ep.breaker.record_failure()
            self._dispatcher._observe_breaker(self._ep)
            raise UpstreamStreamError(f"tier {self.tier} ({self.endpoint}) failed mid-stream: {e!r}") from e
        self._ep.breaker.record_success()
        self._dispatcher._observe_breaker(self._ep)

    def close(self) -> None:
        """Release the upstream connection; closing an unfinished stream aborts the request upstream."""
        if self._done:
            return
        self._done = True
        if not self._resp.content.is_eof():
            self._resp.close()
            self._ep.breaker.release()
        else:
            self._resp.release()
        self._dispatcher._finish(self._ep)


async def _read_capped(resp: aiohttp.ClientResponse, limit: int, tier: str, url: str, attempts: list[str]) -> bytes:
    """The whole answer, or UpstreamTooLargeError as soon as it is known to exceed `limit` bytes (its
    Content-Length, else the bytes read so far): a tier never makes the router hold more than `limit` for one
    answer. (Bytes as sent: the session does not decompress.)"""

    def too_large(size: str) -> UpstreamTooLargeError:
        attempts.append(f"{tier} {url}: answer of {size} bytes, over the limit of {limit}")
        return UpstreamTooLargeError(
            f"tier {tier} ({url}) answered with more than the router's limit of {limit} bytes ({size}; "
            "spec.router.bodyLimits.maxResponseBytes, --max-response-bytes)",
            attempts,
        )

    if resp.content_length is not None and resp.content_length > limit:
        raise too_large(str(resp.content_length))
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        buf += chunk
        if len(buf) > limit:
            raise too_large(f"at least {len(buf)}")
    return bytes(buf)


def _auth(tier: TierConfig) -> dict[str, str] | None:
    """The tier's API key as a bearer token (hosted OpenAI-compatible APIs, vLLM's --api-key)."""
    return {"Authorization": f"Bearer {tier.api_key}"} if tier.api_key else None


class Dispatcher:
    def __init__(
        self,
        config: RouterConfig,
        metrics: RouterMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._clock = clock
        self._rng = rng
        # Requests in _run_chain, and the retries among their tries in flight: the retry budget's two numbers.
        self._active = 0
        self._retrying = 0
        self.pools: dict[str, TierPool] = {}
        # (tier, endpoint URL) of every circuit-breaker series exported, so that the series of gone ones are removed.
        self._breaker_series: set[tuple[str, str]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.apply_config(config)

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is None:
            # No connection limit per host: least-outstanding balancing and backend back-pressure decide load;
            # aiohttp's default of 100 would silently queue a burst inside the router.
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=10, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Dispatcher.start() was not awaited")
        return self._session

    def apply_config(self, config: RouterConfig) -> None:
        """Swap in a new configuration. Pools of kept tiers keep their endpoints (and in-flight counts and
        breakers); requests in flight hold their own Endpoint objects and are not disturbed."""
        self.config = config
        pools: dict[str, TierPool] = {}
        for t in config.tiers:
            pool = self.pools.get(t.name) or TierPool(
                t.name,
                breaker_failures=config.breaker_failures,
                breaker_open_s=config.breaker_open_s,
                clock=self._clock,
            )
            pool.set_breaker(config.breaker_failures, config.breaker_open_s)
            pool.set_static(t.base_urls)
            if t.service is None:  # no Service (any more): the pods discovered for one are no endpoints of it
                pool.set_discovered(())
            pools[t.name] = pool
        for name, old in self.pools.items():
            if name not in pools:
                self.metrics.endpoints.remove(name)
                self.metrics.tier_demand.remove(name)
                old.wake()  # requests held for the tier move on along their chain
                for ep in old.endpoints:
                    ep.removed = True
        for t in config.tiers:
            # A 0 series per tier from the start: the HPA and KEDA read a missing series as an error or nothing,
            # and a tier scaled to zero must be seen at 0 before its first request raises it.
            self.metrics.tier_demand.labels(t.name)
        self.pools = pools
        self._refresh_gauges()

    def set_discovered(self, tier: str, urls: list[str]) -> None:
        pool = self.pools.get(tier)
        if pool is not None:
            pool.set_discovered(urls)
            self._refresh_gauges()

    def _refresh_gauges(self) -> None:
        live: set[tuple[str, str]] = set()
        for name, pool in self.pools.items():
            self.metrics.endpoints.labels(name).set(len(pool.endpoints))
            for ep in pool.endpoints:
                self._observe_breaker(ep)
                live.add((ep.tier, ep.base_url))
        # Endpoints gone (a pod discovery dropped, a URL or tier a reload removed) leave /metrics with their series:
        # pods come and go with new IPs, and their series would otherwise pile up for the life of the process.
        for tier, url in self._breaker_series - live:
            self.metrics.breaker_state.remove(tier, url)
        self._breaker_series = live

    def _observe_breaker(self, ep: Endpoint) -> None:
        if ep.removed:
            return
        self.metrics.breaker_state.labels(ep.tier, ep.base_url).set(int(ep.breaker.state))

    def _finish(self, ep: Endpoint) -> None:
        ep.outstanding -= 1
        self.metrics.outstanding.labels(ep.tier).dec()

    # -- dispatch ---------------------------------------------------------------------------------------------

    async def complete(
        self,
        chain: list[str],
        path: str,
        body: dict[str, Any],
        *,
        timeout_s: float | None = None,
        tier_bodies: Mapping[str, dict[str, Any]] | None = None,
    ) -> UpstreamReply:
        """The first complete answer along `chain`; `timeout_s` is the client's own deadline (None: the config's).
        `tier_bodies` sends a tier its own body instead of `body` (best-of-N: `n` samples from its tier only, a
        fallback tier gets the plain request)."""
        result = await self._run_chain(chain, path, body, stream=False, timeout_s=timeout_s, tier_bodies=tier_bodies)
        assert isinstance(result, UpstreamReply)
        return result

    async def open_stream(
        self, chain: list[str], path: str, body: dict[str, Any], *, timeout_s: float | None = None
    ) -> UpstreamStream:
        """The first stream along `chain` to send a byte; the deadline (`timeout_s` as in `complete`) ends there."""
        result = await self._run_chain(chain, path, body, stream=True, timeout_s=timeout_s)
        assert isinstance(result, UpstreamStream)
        return result

    def _admit_retry(self) -> bool:
        """Envoy's retry budget: retries in flight stay below max(min_retry_concurrency, budget% of requests in
        flight), so that a failing tier cannot multiply the load on the others."""
        cfg = self.config
        allowed = max(cfg.min_retry_concurrency, self._active * cfg.retry_budget_percent // 100)
        return self._retrying < allowed

    async def _run_chain(
        self,
        chain: list[str],
        path: str,
        body: dict[str, Any],
        *,
        stream: bool,
        timeout_s: float | None,
        tier_bodies: Mapping[str, dict[str, Any]] | None = None,
    ) -> UpstreamReply | UpstreamStream:
        cfg = self.config
        now = self._clock()
        own_deadline = now + cfg.request_timeout_s
        deadline = own_deadline if timeout_s is None else min(own_deadline, now + timeout_s)
        attempts: list[str] = []
        reason = ""
        # Whether the last try failed with an error (the next send is a retry: backoff on the same tier) and whether
        # that retry needs the budget (_TryNext.budgeted). Moving on from a saturated tier is load shedding.
        after_error = False
        budgeted = False
        # Whether the last try ran out of time: then the answer is a timeout (504), as Envoy's, even with time left.
        timed_out = False
        self._active += 1
        try:
            for i, tier_name in enumerate(chain):
                if self._clock() >= deadline:
                    break
                pool = self.pools.get(tier_name)
                if pool is None:
                    continue
                if i > 0:
                    self.metrics.fallbacks.labels(chain[i - 1], tier_name, reason or "down").inc()
                tier = cfg.tier(tier_name)
                if i == 0 and tier.hold_when_empty_s is not None and not pool.endpoints:
                    await self._hold(pool, tier.hold_when_empty_s, deadline, attempts)
                if pool.saturated(cfg.max_outstanding_per_endpoint, cfg.saturation_waiting):
                    reason = "saturated"
                    attempts.append(f"{tier_name}: saturated")
                    continue
                tried: set[str] = set()
                tier_errors = 0
                reason = "down"
                while len(tried) < cfg.max_attempts_per_tier and self._clock() < deadline:
                    ep = pool.pick(tried)
                    if ep is None:
                        if not tried:
                            attempts.append(f"{tier_name}: no available endpoint")
                        break
                    retry = after_error and budgeted
                    if retry and not self._admit_retry():
                        self.metrics.retry_overflow.labels(tier_name).inc()
                        attempts.append(f"{tier_name}: retry budget exhausted")
                        raise RetryBudgetExhaustedError(_summary("retry budget exhausted", chain, attempts), attempts)
                    if tried:
                        self.metrics.retries.labels(tier_name, reason).inc()
                    tried.add(ep.base_url)
                    if retry:
                        self._retrying += 1
                    try:
                        if tier_errors:
                            await self._backoff(tier_errors, deadline)
                        remaining = deadline - self._clock()
                        if remaining <= 0:
                            break
                        limit = try_limit(remaining, cfg.per_try_timeout_s, client_deadline=deadline < own_deadline)
                        sent = tier_bodies.get(tier_name, body) if tier_bodies else body
                        return await self._attempt(
                            tier, ep, path, sent, stream=stream, fallback=i > 0, attempts=attempts, limit=limit
                        )
                    except _TryNext as e:
                        attempts.append(f"{tier_name} {ep.base_url}: {e.reason}")
                        reason = "saturated" if e.saturated else "error"
                        after_error, budgeted, timed_out = not e.saturated, e.budgeted, e.timed_out
                        tier_errors += after_error
                    finally:
                        if retry:
                            self._retrying -= 1
            if self._clock() >= deadline:
                raise DeadlineExceededError(_summary("deadline exceeded", chain, attempts), attempts)
            if timed_out:
                raise DeadlineExceededError(_summary("the last try timed out", chain, attempts), attempts)
            raise NoTierAvailableError(_summary("no tier could answer", chain, attempts), attempts)
        finally:
            self._active -= 1

    async def _hold(self, pool: TierPool, hold_s: float, deadline: float, attempts: list[str]) -> None:
        """Hold a request for its chosen tier while the tier has no endpoint (scaled to zero: its demand, which
        counts this request, wakes it), up to `hold_s` or the deadline. Only the chosen tier holds: a tier tried as
        a fallback is tried because another could not answer, and waits there would add up along the chain."""
        left = deadline - self._clock()
        woke = await pool.wait_for_endpoints(min(hold_s, left))
        outcome = "endpoint" if woke else "deadline" if left <= hold_s else "expired"
        self.metrics.holds.labels(pool.tier, outcome).inc()
        if not woke:
            attempts.append(f"{pool.tier}: no endpoint after holding {hold_s:g} s at most")

    async def _backoff(self, retry_n: int, deadline: float) -> None:
        """Sleep before the `retry_n`-th retry on one tier, never past the deadline."""
        cfg = self.config
        delay = backoff_s(retry_n, cfg.backoff_base_s, cfg.backoff_max_s, self._rng())
        await asyncio.sleep(max(0.0, min(delay, deadline - self._clock())))

    async def _served_model(self, tier: TierConfig, ep: Endpoint) -> str:
        if tier.served_model:
            return tier.served_model
        if ep.model_id is None:
            # Local-mode tiers (`--tier NAME=URL`) name no model: ask the server once, as clients of vLLM do.
            timeout = aiohttp.ClientTimeout(
                total=self.config.request_timeout_s, sock_connect=self.config.connect_timeout_s
            )
            try:
                async with self.session.get(f"{ep.base_url}/models", timeout=timeout, headers=_auth(tier)) as r:
                    data = await r.json(content_type=None) if r.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                raise _TryNext(f"listing models failed: {e!r}", endpoint_failed=True) from e
            models = data.get("data") if isinstance(data, dict) else None
            if not isinstance(models, list) or not models or not isinstance(models[0], dict):
                raise _TryNext("GET /models returned no model", endpoint_failed=True)
            ep.model_id = str(models[0].get("id"))
        return ep.model_id

    async def _attempt(
        self,
        tier: TierConfig,
        ep: Endpoint,
        path: str,
        body: dict[str, Any],
        *,
        stream: bool,
        fallback: bool,
        attempts: list[str],
        limit: TryLimit,
    ) -> UpstreamReply | UpstreamStream:
        """One try on one endpoint within `limit` (to the whole answer, or to a stream's first byte). When the limit
        passes the try fails, as the endpoint's failure when the limit blames it."""
        ep.outstanding += 1
        self.metrics.outstanding.labels(ep.tier).inc()
        handed_over = False
        try:
            try:
                async with asyncio.timeout(limit.seconds):
                    result = await self._exchange(
                        tier, ep, path, body, stream=stream, fallback=fallback, attempts=attempts
                    )
            except TimeoutError as e:
                self.metrics.try_timeouts.labels(tier.name, limit.name).inc()
                raise _TryNext(
                    f"no answer within {limit.seconds:.3g} s ({limit.name})",
                    endpoint_failed=limit.blame,
                    budgeted=True,
                    timed_out=True,
                ) from e
            handed_over = isinstance(result, UpstreamStream)
            return result
        except _TryNext as e:
            if e.endpoint_failed:
                ep.breaker.record_failure()
            else:
                ep.breaker.release()
            raise
        except BaseException:
            # Cancelled by the client (or a bug): says nothing about the endpoint.
            ep.breaker.release()
            raise
        finally:
            self._observe_breaker(ep)
            if not handed_over:
                self._finish(ep)

    async def _exchange(
        self,
        tier: TierConfig,
        ep: Endpoint,
        path: str,
        body: dict[str, Any],
        *,
        stream: bool,
        fallback: bool,
        attempts: list[str],
    ) -> UpstreamReply | UpstreamStream:
        """Send the request and read the answer (a stream: its first chunk). Raises _TryNext for a failure worth
        another try; the caller bounds the time and keeps the endpoint's books."""
        cfg = self.config
        t0 = time.perf_counter()
        try:
            payload = dict(body, model=await self._served_model(tier, ep))
            # The caller's asyncio.timeout bounds the whole try; here only the connect and, for a stream handed over
            # to the client, the idle time between chunks.
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=cfg.connect_timeout_s,
                sock_read=cfg.stream_idle_timeout_s if stream else None,
            )
            resp = await self.session.post(f"{ep.base_url}{path}", json=payload, timeout=timeout, headers=_auth(tier))
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _TryNext(
                f"connect/send failed: {e!r}", endpoint_failed=True, budgeted=isinstance(e, TimeoutError)
            ) from e
        try:
            if resp.status in SATURATED_STATUSES:
                raise _TryNext(f"HTTP {resp.status}", endpoint_failed=False, saturated=True)
            if resp.status in RETRY_STATUSES:
                raise _TryNext(f"HTTP {resp.status}", endpoint_failed=True, budgeted=True)
            ctype = resp.headers.get("Content-Type", "application/json")
            if not stream or resp.status != 200:
                try:
                    data = await _read_capped(resp, cfg.max_response_bytes, tier.name, ep.base_url, attempts)
                except (aiohttp.ClientError, TimeoutError) as e:
                    raise _TryNext(
                        f"response cut short: {e!r}", endpoint_failed=True, budgeted=isinstance(e, TimeoutError)
                    ) from e
                ep.breaker.record_success()
                self.metrics.upstream_seconds.labels(tier.name).observe(time.perf_counter() - t0)
                return UpstreamReply(tier.name, ep.base_url, resp.status, ctype, data, fallback, attempts)
            try:
                first = await resp.content.readany()
            except (aiohttp.ClientError, TimeoutError) as e:
                raise _TryNext(
                    f"stream failed before its first byte: {e!r}",
                    endpoint_failed=True,
                    budgeted=isinstance(e, TimeoutError),
                ) from e
            if not first:
                raise _TryNext("stream ended before its first byte", endpoint_failed=True)
            return UpstreamStream(tier.name, ep.base_url, resp.status, ctype, fallback, first, resp, ep, self)
        except BaseException:
            # Failed, or cancelled by the time limit or the client: drop the connection (a complete answer's read
            # has released it to the pool already).
            resp.close()
            raise

    # -- backend queue lengths (vLLM metrics) -------------------------------------------------------------------

    async def scrape_queue_lengths(self) -> None:
        """Read `vllm:num_requests_waiting` from every endpoint's /metrics (the server root, not /v1)."""

        async def one(ep: Endpoint) -> None:
            root = ep.base_url[: -len("/v1")] if ep.base_url.endswith("/v1") else ep.base_url
            try:
                async with self.session.get(
                    f"{root}/metrics", timeout=aiohttp.ClientTimeout(total=self.config.connect_timeout_s)
                ) as r:
                    text = await r.text() if r.status == 200 else ""
            except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
                return
            ep.waiting = parse_waiting(text)

        eps = [ep for pool in self.pools.values() for ep in pool.endpoints if ep.breaker.state is not BreakerState.OPEN]
        await asyncio.gather(*(one(ep) for ep in eps))

    async def run_scraper(self, interval_s: float) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.scrape_queue_lengths()
            await asyncio.sleep(interval_s)


@dataclass(frozen=True)
class TryLimit:
    """How long one try may take, which limit that is (`per_try` or `deadline`, the metric's label), and whether
    running out of it is the endpoint's failure (its breaker counts it)."""

    seconds: float
    name: str
    blame: bool


def try_limit(remaining_s: float, per_try_s: float | None, *, client_deadline: bool) -> TryLimit:
    """The limit of the next try: the per-try timeout when it ends first, else what is left of the deadline. Running
    out of a configured limit blames the endpoint; running out of a client's own, shorter deadline does not (an
    impatient client must not open the breakers of healthy endpoints)."""
    if per_try_s is not None and per_try_s < remaining_s:
        return TryLimit(per_try_s, "per_try", blame=True)
    return TryLimit(remaining_s, "deadline", blame=not client_deadline)


def backoff_s(retry_n: int, base_s: float, max_s: float, u: float) -> float:
    """Exponential backoff with full jitter before the `retry_n`-th retry on a tier (1, 2, ...): uniform in
    [0, min(max_s, base_s * 2^(retry_n-1))] for `u` uniform in [0, 1). Full jitter spreads the retries of many
    requests that failed together, so they do not hit the tier again in lockstep."""
    ceiling = min(max_s, base_s * 2.0 ** min(max(retry_n - 1, 0), 30))
    return ceiling * u


def _summary(what: str, chain: list[str], attempts: list[str]) -> str:
    return f"{what} (tried {', '.join(chain)}): {'; '.join(attempts[-6:])}"


def parse_waiting(metrics_text: str) -> int:
    """Sum of `vllm:num_requests_waiting` samples in a Prometheus text exposition (0 when absent)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("vllm:num_requests_waiting"):
            try:
                total += float(line.rsplit(None, 1)[-1])
            except ValueError:
                continue
    return int(total)
