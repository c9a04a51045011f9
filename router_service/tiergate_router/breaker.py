"""Per-endpoint circuit breaker: a pure state machine with an injected clock, so tests need no sleeping."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.IntEnum):
    # Values are what the circuit-breaker-state gauge exports.
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `open_s` lets exactly one probe through (half-open).

    A successful probe closes it; a failed probe opens it again for another `open_s`. Consecutive rather than
    windowed counting: an endpoint that was killed fails every request, so three in a row is a fast, clear signal,
    while occasional errors of a healthy endpoint are reset by its successes.
    """

    def __init__(self, failures: int = 3, open_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.open_s = open_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at = 0.0
        self._state = BreakerState.CLOSED
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.open_s:
            return BreakerState.HALF_OPEN
        return self._state

    def available(self) -> bool:
        """Whether a request may be sent now (without reserving the half-open probe)."""
        st = self.state
        return st is BreakerState.CLOSED or (st is BreakerState.HALF_OPEN and not self._probe_in_flight)

    def acquire(self) -> bool:
        """Reserve the right to send one request; in half-open state only one caller gets it."""
        st = self.state
        if st is BreakerState.CLOSED:
            return True
        if st is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._state = BreakerState.HALF_OPEN
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._consecutive = 0
        self._probe_in_flight = False
        self._state = BreakerState.CLOSED

    def record_failure(self) -> None:
        self._consecutive += 1
        was_probe = self._probe_in_flight
        self._probe_in_flight = False
        if was_probe or self._consecutive >= self.failures:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()

    def release(self) -> None:
        """The reserved request ended without telling anything about the endpoint (e.g. client cancelled)."""
        if self._probe_in_flight:
            self._probe_in_flight = False
