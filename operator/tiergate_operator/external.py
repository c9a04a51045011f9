"""Whether the external tiers' endpoints answer: a real check for `status`, off the reconcile path.

A tier with `endpoint.url` is served by someone else (a hosted API, a server in another cluster); the operator
deploys nothing for it, so no Deployment says whether it is up. Instead the operator asks it, as the router would:
`GET {url}/models` with a short timeout. Any HTTP answer below 500 counts as reachable: the server resolved,
connected, completed TLS and spoke HTTP. That includes 401/403, because the operator does not send the tier's API
key: the key lives in a Secret, and the operator is deliberately not allowed to read Secrets (any verb that tells
whether a Secret exists also returns its data; docs/operator.md, "RBAC"). Whether the key is right is the router's
to find out per request. A 5xx, a timeout, a refused connection, a DNS or TLS failure count as unreachable, with
the error in the message.

Checks run in `ExternalChecks.run`, a loop beside the reconcile workers: each URL is probed as soon as a policy
names it and then every `interval` seconds, on the controller's thread pool, and a changed verdict requeues a
status refresh of the policies naming it. A reconcile only registers the URLs of its policy (`want`) and reads the
last verdicts (`get`): no I/O, so a slow or hanging endpoint never delays applying a policy. URLs no policy has named
for a few intervals are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass

# Probes are status, not traffic: a few seconds tells a dead endpoint from a slow one without tying up a thread.
DEFAULT_TIMEOUT_S = 5.0
# Hosted APIs change state rarely; 30 s keeps status current without polling anyone's API noticeably.
DEFAULT_INTERVAL_S = 30.0
# A URL nobody has wanted for this many intervals is no longer probed or kept.
FORGET_AFTER_INTERVALS = 3
# Longest error text kept in a verdict (status messages are capped at 1 KiB for all components together).
_MAX_ERROR = 200


@dataclass(frozen=True)
class ExternalCheck:
    """The verdict on one endpoint: `ok` when it answered below HTTP 500; `message` what it answered or why not."""

    ok: bool
    message: str


def models_url(base_url: str) -> str:
    return f"{base_url.rstrip('/')}/models"


def probe(base_url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ExternalCheck:
    """`GET {base_url}/models` once, without credentials (the module docstring says why)."""
    url = models_url(base_url)
    req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "tiergate-operator"})
    try:
        # http(s) only: the CRD's URL pattern allows nothing else.
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return ExternalCheck(True, f"GET {url}: HTTP {resp.status}")
    except urllib.error.HTTPError as e:
        if e.code < 500:
            return ExternalCheck(True, f"GET {url}: HTTP {e.code} (reachable; the API key is the router's to send)")
        return ExternalCheck(False, f"GET {url}: HTTP {e.code} {str(e.reason)[:_MAX_ERROR]}")
    except urllib.error.URLError as e:
        return ExternalCheck(False, f"GET {url}: {str(e.reason)[:_MAX_ERROR]}")
    except (TimeoutError, OSError, ValueError) as e:
        return ExternalCheck(False, f"GET {url}: {type(e).__name__}: {str(e)[:_MAX_ERROR] or 'no answer'}")


class ExternalChecks:
    """The last verdict per external base URL, and the loop that refreshes them. Thread-safe: reconciles run on
    worker threads, the loop on the event loop."""

    def __init__(
        self,
        probe_fn: Callable[[str, float], ExternalCheck] = probe,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe_fn
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._verdicts: dict[str, ExternalCheck] = {}
        self._checked: dict[str, float] = {}  # URL -> when its last probe finished
        self._wanted: dict[str, float] = {}  # URL -> when a reconcile last named it
        self._new = asyncio.Event()  # set (from any thread, via the loop) when a URL never probed is wanted
        self._loop: asyncio.AbstractEventLoop | None = None

    def want(self, urls: Iterable[str]) -> None:
        """Register the URLs a policy names (called by reconcile; no I/O). A new one is probed at once."""
        now = self._clock()
        fresh = False
        with self._lock:
            for u in urls:
                fresh |= u not in self._wanted and u not in self._verdicts
                self._wanted[u] = now
        if fresh and self._loop is not None:
            self._loop.call_soon_threadsafe(self._new.set)

    def get(self, url: str) -> ExternalCheck | None:
        """The last verdict, None while the URL has not been probed yet."""
        with self._lock:
            return self._verdicts.get(url)

    def due(self) -> list[str]:
        """URLs to probe now: wanted and never probed, or probed an interval ago. Forgets URLs not wanted for
        FORGET_AFTER_INTERVALS intervals."""
        now = self._clock()
        with self._lock:
            stale = [u for u, t in self._wanted.items() if now - t > FORGET_AFTER_INTERVALS * self.interval_s]
            for u in stale:
                self._wanted.pop(u, None)
                self._verdicts.pop(u, None)
                self._checked.pop(u, None)
            return [u for u in self._wanted if u not in self._checked or now - self._checked[u] >= self.interval_s]

    def record(self, url: str, verdict: ExternalCheck) -> bool:
        """Store a probe's verdict; True when it differs from the previous one (a status refresh is due)."""
        with self._lock:
            before = self._verdicts.get(url)
            self._verdicts[url] = verdict
            self._checked[url] = self._clock()
        return before != verdict

    async def run(self, executor: Executor, on_change: Callable[[str], None]) -> None:
        """Probe what is due, forever (cancel to stop); `on_change(url)` after a verdict changed. Probes of one
        round run in parallel on `executor`, each bounded by the timeout."""
        self._loop = asyncio.get_running_loop()
        while True:
            self._new.clear()
            urls = self.due()
            if urls:
                verdicts = await asyncio.gather(
                    *(self._loop.run_in_executor(executor, self._probe, u, self.timeout_s) for u in urls)
                )
                for u, v in zip(urls, verdicts, strict=True):
                    if self.record(u, v):
                        on_change(u)
            # Until the next URL falls due, or a new one is wanted.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), timeout=self._next_due_in())

    def _next_due_in(self) -> float:
        now = self._clock()
        with self._lock:
            waits = [self.interval_s - (now - self._checked.get(u, now - self.interval_s)) for u in self._wanted]
        return max(0.05, min(waits, default=self.interval_s))
