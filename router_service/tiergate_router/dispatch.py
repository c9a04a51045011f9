"""Sending requests to tiers: endpoint choice, retries, circuit breakers, fallback and streaming pass-through.

Failure handling, per tier in the fallback chain:
- connection refused / reset, connect timeout, a body cut short, HTTP 5xx: the endpoint's breaker counts a
  failure and the request is retried on another endpoint of the tier (at most `max_attempts_per_tier` tries);
- HTTP 429 (the backend's own back-pressure) or every endpoint at its in-flight limit: the tier is saturated;
- other 4xx: the backend judged the request itself (e.g. too long for its context): returned to the client as is,
  since another tier would most likely refuse it too and retrying would only double the cost;
- no endpoint left or tries exhausted: the next tier in the chain.
Non-streaming requests can be retried until the whole response is read. A streaming request is committed once
the first chunk has arrived; after that an upstream failure ends the stream (nothing else is safe).
Generation has no side effects, so replaying a request on another endpoint is always allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tiergate_router.breaker import BreakerState
from tiergate_router.config import RouterConfig, TierConfig
from tiergate_router.errors import NoTierAvailableError, UpstreamStreamError
from tiergate_router.metrics import RouterMetrics
from tiergate_router.pool import Endpoint, TierPool

RETRY_STATUSES = frozenset({500, 502, 503, 504})
SATURATED_STATUSES = frozenset({429})


class _TryNext(Exception):
    def __init__(self, reason: str, *, endpoint_failed: bool, saturated: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.endpoint_failed = endpoint_failed
        self.saturated = saturated


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


def _auth(tier: TierConfig) -> dict[str, str] | None:
    """The tier's API key as a bearer token (hosted OpenAI-compatible APIs, vLLM's --api-key)."""
    return {"Authorization": f"Bearer {tier.api_key}"} if tier.api_key else None


class Dispatcher:
    def __init__(
        self, config: RouterConfig, metrics: RouterMetrics, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._clock = clock
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
                for ep in old.endpoints:
                    ep.removed = True
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

    async def complete(self, chain: list[str], path: str, body: dict[str, Any]) -> UpstreamReply:
        result = await self._run_chain(chain, path, body, stream=False)
        assert isinstance(result, UpstreamReply)
        return result

    async def open_stream(self, chain: list[str], path: str, body: dict[str, Any]) -> UpstreamStream:
        result = await self._run_chain(chain, path, body, stream=True)
        assert isinstance(result, UpstreamStream)
        return result

    async def _run_chain(
        self, chain: list[str], path: str, body: dict[str, Any], *, stream: bool
    ) -> UpstreamReply | UpstreamStream:
        cfg = self.config
        attempts: list[str] = []
        reason = ""
        for i, tier_name in enumerate(chain):
            pool = self.pools.get(tier_name)
            if pool is None:
                continue
            if i > 0:
                self.metrics.fallbacks.labels(chain[i - 1], tier_name, reason or "down").inc()
            tier = cfg.tier(tier_name)
            if pool.saturated(cfg.max_outstanding_per_endpoint, cfg.saturation_waiting):
                reason = "saturated"
                attempts.append(f"{tier_name}: saturated")
                continue
            tried: set[str] = set()
            reason = "down"
            while len(tried) < cfg.max_attempts_per_tier:
                ep = pool.pick(tried)
                if ep is None:
                    if not tried:
                        attempts.append(f"{tier_name}: no available endpoint")
                    break
                if tried:
                    self.metrics.retries.labels(tier_name, reason).inc()
                tried.add(ep.base_url)
                try:
                    return await self._attempt(tier, ep, path, body, stream=stream, fallback=i > 0, attempts=attempts)
                except _TryNext as e:
                    attempts.append(f"{tier_name} {ep.base_url}: {e.reason}")
                    reason = "saturated" if e.saturated else "error"
        raise NoTierAvailableError(
            f"no tier could answer (tried {', '.join(chain)}): {'; '.join(attempts[-6:])}", attempts
        )

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
    ) -> UpstreamReply | UpstreamStream:
        cfg = self.config
        ep.outstanding += 1
        self.metrics.outstanding.labels(ep.tier).inc()
        handed_over = False
        t0 = time.perf_counter()
        try:
            try:
                payload = dict(body, model=await self._served_model(tier, ep))
                timeout = aiohttp.ClientTimeout(
                    total=None if stream else cfg.request_timeout_s,
                    sock_connect=cfg.connect_timeout_s,
                    sock_read=cfg.stream_idle_timeout_s if stream else None,
                )
                resp = await self.session.post(
                    f"{ep.base_url}{path}", json=payload, timeout=timeout, headers=_auth(tier)
                )
            except (aiohttp.ClientError, TimeoutError) as e:
                raise _TryNext(f"connect/send failed: {e!r}", endpoint_failed=True) from e
            try:
                if resp.status in SATURATED_STATUSES:
                    raise _TryNext(f"HTTP {resp.status}", endpoint_failed=False, saturated=True)
                if resp.status in RETRY_STATUSES:
                    raise _TryNext(f"HTTP {resp.status}", endpoint_failed=True)
                ctype = resp.headers.get("Content-Type", "application/json")
                if not stream or resp.status != 200:
                    try:
                        data = await resp.read()
                    except (aiohttp.ClientError, TimeoutError) as e:
                        raise _TryNext(f"response cut short: {e!r}", endpoint_failed=True) from e
                    ep.breaker.record_success()
                    self.metrics.upstream_seconds.labels(tier.name).observe(time.perf_counter() - t0)
                    return UpstreamReply(tier.name, ep.base_url, resp.status, ctype, data, fallback, attempts)
                try:
                    async with asyncio.timeout(cfg.request_timeout_s):
                        first = await resp.content.readany()
                except (aiohttp.ClientError, TimeoutError) as e:
                    raise _TryNext(f"stream failed before its first byte: {e!r}", endpoint_failed=True) from e
                if not first:
                    raise _TryNext("stream ended before its first byte", endpoint_failed=True)
                handed_over = True
                return UpstreamStream(tier.name, ep.base_url, resp.status, ctype, fallback, first, resp, ep, self)
            except BaseException:
                if not handed_over:
                    resp.close()
                raise
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
