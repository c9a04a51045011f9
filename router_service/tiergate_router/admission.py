"""Admission by memory: the request bodies the router holds at once stay within a byte budget.

Every request's body (at most `max_body_bytes`) and what is made from it (the parsed JSON, the prompt text, the
body forwarded to the tier) live until its answer is done, so without a bound the router's memory grows with the
number of requests in flight. A request reserves its body's size (its Content-Length, or the body limit when it
sends none; a gRPC request its message's size) before the body is read and gives it back when its answer ends; a
request that does not fit waits, first come first served, with its body still in the kernel's socket buffer (a
gRPC message is already read: there the budget bounds what is made from it). One budget serves both front ends
(`Router.body_budget`). Waiting rather than refusing: a burst of large prompts is slowed, not failed, and the
router's memory is the baseline plus a fixed multiple of the budget.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class BudgetTimeout(Exception):
    """A request waited its whole allowance for room in the budget."""


class ByteBudget:
    """A FIFO byte semaphore. `hold(n)` waits until `n` bytes fit (n is clamped to the limit, so any request can
    go once it is first in line and the budget is free) and releases them on exit, cancelled or not; BudgetTimeout
    when `timeout_s` passes first."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"byte budget must be positive, got {limit}")
        self.limit = limit
        self.held = 0
        # The most ever held at once, and how many requests had to wait: what a test or a debugger asks.
        self.peak = 0
        self.waited = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def resize(self, limit: int) -> None:
        """A new limit (a policy reload). Bytes already held stay held; a larger limit lets waiters in at once, a
        smaller one holds new requests back until enough is given back."""
        if limit < 1:
            raise ValueError(f"byte budget must be positive, got {limit}")
        self.limit = limit
        self._wake()

    @contextlib.asynccontextmanager
    async def hold(self, n: int, timeout_s: float | None = None) -> AsyncIterator[None]:
        n = max(0, min(n, self.limit))
        if not self._waiters and self.held + n <= self.limit:
            # The common case, on every request: room at once, so no timer is scheduled and cancelled for it.
            self._take(n)
        else:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._acquire(n)
            except TimeoutError as e:
                raise BudgetTimeout(f"no room for {n} bytes of request body within {timeout_s} s") from e
        try:
            yield
        finally:
            self.held -= n
            self._wake()

    async def _acquire(self, n: int) -> None:
        if not self._waiters and self.held + n <= self.limit:
            self._take(n)
            return
        self.waited += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Granted just as the waiter was cancelled: give the bytes back to the next in line.
                self.held -= n
                self._wake()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((n, fut))
                self._wake()
            raise

    def _wake(self) -> None:
        """Grant waiters in arrival order while the first one fits (never overtaking it: no starvation)."""
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.held + n > self.limit:
                return
            self._waiters.popleft()
            self._take(n)
            fut.set_result(None)

    def _take(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)
