"""Endpoints of a tier and least-outstanding-requests selection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tiergate_router.breaker import BreakerState, CircuitBreaker


@dataclass(eq=False)
class Endpoint:
    """One backend (an OpenAI-compatible base URL). Identity matters: in-flight requests hold the object."""

    tier: str
    base_url: str
    breaker: CircuitBreaker
    outstanding: int = 0
    # Queue length the backend last reported (vLLM's `vllm:num_requests_waiting`), when scraped.
    waiting: int = 0
    model_id: str | None = None
    removed: bool = False


class TierPool:
    """The endpoint set of one tier. Selection: among endpoints whose breaker admits a request, the one with the
    fewest requests in flight through this router (ties go to the least recently picked, so equal load spreads).
    """

    def __init__(
        self, tier: str, *, breaker_failures: int, breaker_open_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tier = tier
        self._breaker_failures = breaker_failures
        self._breaker_open_s = breaker_open_s
        self._clock = clock
        self._endpoints: dict[str, Endpoint] = {}
        self._static: set[str] = set()
        self._discovered: set[str] = set()
        self._picks = 0
        self._last_pick: dict[str, int] = {}
        # Requests held until the tier has an endpoint again (wait_for_endpoints): set when one appears.
        self._waiters: set[asyncio.Event] = set()

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def set_static(self, urls: Iterable[str]) -> None:
        self._static = {u.rstrip("/") for u in urls}
        self._sync()

    def set_discovered(self, urls: Iterable[str]) -> None:
        self._discovered = {u.rstrip("/") for u in urls}
        self._sync()

    def set_breaker(self, failures: int, open_s: float) -> None:
        self._breaker_failures, self._breaker_open_s = failures, open_s
        for ep in self._endpoints.values():
            ep.breaker.failures, ep.breaker.open_s = failures, open_s

    def _sync(self) -> None:
        wanted = self._static | self._discovered
        for url in list(self._endpoints):
            if url not in wanted:
                # Requests already in flight keep their Endpoint object and finish normally.
                self._endpoints.pop(url).removed = True
                self._last_pick.pop(url, None)  # pods come and go with new IPs: keep no history of gone ones
        for url in sorted(wanted):
            if url not in self._endpoints:
                self._endpoints[url] = Endpoint(
                    tier=self.tier,
                    base_url=url,
                    breaker=CircuitBreaker(self._breaker_failures, self._breaker_open_s, self._clock),
                )
        if self._endpoints:
            self.wake()

    @property
    def holding(self) -> int:
        """Requests waiting in wait_for_endpoints now."""
        return len(self._waiters)

    def wake(self) -> None:
        """End every wait_for_endpoints now (an endpoint appeared, or the tier left the configuration)."""
        for ev in self._waiters:
            ev.set()

    async def wait_for_endpoints(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the tier to have an endpoint (discovery publishes one, a reload adds one);
        whether it has one now. Called on the event loop that publishes discovery's changes."""
        if self._endpoints:
            return True
        ev = asyncio.Event()
        self._waiters.add(ev)
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await ev.wait()
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(ev)
        return bool(self._endpoints)

    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> Endpoint | None:
        """Reserve the best available endpoint (its breaker admits the request), or None when none is."""
        candidates = [ep for ep in self._endpoints.values() if ep.base_url not in exclude and ep.breaker.available()]
        if not candidates:
            return None
        candidates.sort(key=lambda ep: (ep.outstanding + ep.waiting, self._last_pick.get(ep.base_url, -1)))
        for ep in candidates:
            if ep.breaker.acquire():
                self._picks += 1
                self._last_pick[ep.base_url] = self._picks
                return ep
        return None

    def saturated(self, max_outstanding: int, saturation_waiting: int) -> bool:
        """True when every admitting endpoint is at its in-flight limit or reports a long queue."""
        live = [ep for ep in self._endpoints.values() if ep.breaker.state is not BreakerState.OPEN]
        if not live:
            return False  # down, not saturated: pick() returning None tells that

        def full(ep: Endpoint) -> bool:
            return (max_outstanding > 0 and ep.outstanding >= max_outstanding) or (
                saturation_waiting > 0 and ep.waiting >= saturation_waiting
            )

        return all(full(ep) for ep in live)
