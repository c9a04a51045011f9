"""Waiting on conditions, not on the clock: tests poll for the state they need (a counter, a metric, a log line,
an object in the API) with a generous bound, instead of sleeping a guessed time and hoping a busy machine kept up.

The bound only turns a hang into a failure that names what was awaited; a passing run never waits for it.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

# The same poller as the control-plane test bed's, so every test names what it waited for the same way.
from tiergate.devcluster.cluster import wait_for

T = TypeVar("T")

# Generous on purpose: a loaded 2-core CI machine can be many times slower than a laptop; a passing test returns
# as soon as its condition holds, so a long bound costs nothing.
DEFAULT_TIMEOUT_S = 60.0

__all__ = ["DEFAULT_TIMEOUT_S", "async_wait_for", "wait_for", "write_atomically"]


async def async_wait_for(
    what: str, fn: Callable[[], T | None], limit_s: float = DEFAULT_TIMEOUT_S, interval: float = 0.02
) -> T:
    """`wait_for` for code running on an event loop: polls without blocking the loop (the condition usually
    depends on tasks of that same loop making progress)."""
    last: T | None = None
    try:
        async with asyncio.timeout(limit_s):
            # Polling on purpose: the condition is state owned by other code (a fake's counter, often on another
            # thread's loop), which offers no event to await.
            while not (last := fn()):  # noqa: ASYNC110
                await asyncio.sleep(interval)
            return last
    except TimeoutError:
        raise TimeoutError(f"timed out after {limit_s:.0f}s waiting for {what}; last value: {last!r}") from None


def write_atomically(path: Path, text: str) -> None:
    """Replace `path`'s content in one step (a temporary file renamed over it), as Kubernetes swaps a mounted
    ConfigMap. A plain `write_text` truncates first: a poller reading in between sees an empty or half-written
    file, counts a failed reload, and a test counting reloads flakes on a busy machine."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
