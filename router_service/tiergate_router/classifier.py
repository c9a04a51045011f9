"""Prompt classification: the Classifier protocol the router uses, and micro-batching around a blocking scorer.

The router only needs `await classifier.score(prompts)`: per prompt, a score in [0, 1] (two-tier artifacts: the
probability that the strongest tier is needed) or a tuple of predicted qualities, one per artifact tier (N-tier
artifacts; the router picks the tier, see decision.choose_multi_tier). The real scorer (encoder and trained head
from `tiergate.routing`) is blocking and much cheaper per prompt in batches, so `MicroBatcher` scores the prompts
of concurrent requests together on one worker thread (one thread: the encoder already uses every core, two
batches at once would only contend).

Memory: a prompt may be megabytes, so nothing here keeps prompt text beyond the request. Prompts are cut to
`max_chars` characters before anything else (`prompt_chars`: what the encoder's token window can use), and the
result cache holds a 16-byte digest of that cut text with the verdict, under both an entry bound and a byte budget
(`ScoreCache`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar

from tiergate_router.errors import ClassifierError

# Per prompt: a two-tier score, or the predicted quality of each tier of an N-tier artifact.
Verdict = float | tuple[float, ...]
R = TypeVar("R", bound=Verdict)


# Characters kept per word piece of the encoder's window when prompts are cut before classification. The encoder
# reads at most `max_tokens` word pieces of a prompt, so the rest of a 1 MB prompt is only tokenized to be thrown
# away (and hashed, for the cache). A word piece of ordinary text spans 3-6 characters and one of code or base64
# fewer than 20; 128 leaves the window full for any text short of long runs of whitespace, control characters or
# words over the tokenizer's 100-character limit (each of which becomes one [UNK] piece). For such text the window
# ends early: that prompt's own routing is decided on its first `max_chars` characters, nothing else changes.
CHARS_PER_TOKEN_BOUND = 128

# Defaults of the result cache. Entries are a digest and a verdict, a few hundred bytes each: 16384 of them hold
# the repeats of real traffic (shared system prompts, retries) and cost ~3 MB for a two-tier verdict; the byte
# budget binds first for wide N-tier verdicts (a tuple of 9 qualities: ~500 bytes per entry).
DEFAULT_CACHE_ENTRIES = 16384
DEFAULT_CACHE_BYTES = 4 * 1024 * 1024
# Bytes a cache entry costs beyond its key and value objects: the OrderedDict's hash-table slot and linked-list
# node. Measured with tracemalloc on CPython 3.11 at 74-116 bytes per entry (the high end right after the table
# doubles); 160 keeps the accounted size at or above the real one (tests/unit/test_router_classifier_cache.py).
ENTRY_OVERHEAD_BYTES = 160


def prompt_chars(max_tokens: int) -> int:
    """How many characters of a prompt to classify, for an encoder that reads `max_tokens` word pieces."""
    return max_tokens * CHARS_PER_TOKEN_BOUND


def prompt_key(text: str) -> bytes:
    """The cache key of a (cut) prompt: 16 bytes of BLAKE2b. "surrogatepass": JSON may carry lone surrogates."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _sizeof(value: object) -> int:
    if isinstance(value, tuple):
        return sys.getsizeof(value) + sum(sys.getsizeof(v) for v in value)
    return sys.getsizeof(value)


def _entry_size(key: bytes, value: object) -> int:
    return ENTRY_OVERHEAD_BYTES + _sizeof(key) + _sizeof(value)


class ScoreCache(Generic[R]):
    """Least-recently-used verdicts by prompt digest, bounded by `max_entries` and by `max_bytes` (each entry
    counted as its key, its value and ENTRY_OVERHEAD_BYTES). A zero bound disables the cache."""

    def __init__(self, max_entries: int = DEFAULT_CACHE_ENTRIES, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        # Values only: an entry's size is recomputed on eviction rather than stored (a stored int would cost more
        # than the float it describes).
        self._entries: collections.OrderedDict[bytes, R] = collections.OrderedDict()
        self.bytes = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> R | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, key: bytes, value: R) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= _entry_size(key, old)
        size = _entry_size(key, value)
        if size > self.max_bytes or self.max_entries < 1:
            return
        self._entries[key] = value
        self.bytes += size
        self._evict()

    def resize(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._evict()

    def _evict(self) -> None:
        while self._entries and (len(self._entries) > self.max_entries or self.bytes > self.max_bytes):
            key, value = self._entries.popitem(last=False)
            self.bytes -= _entry_size(key, value)


class Classifier(Protocol):
    async def score(self, prompts: Sequence[str]) -> Sequence[Verdict]: ...

    async def aclose(self) -> None: ...


class MicroBatcher(Generic[R]):
    """Classifier over a blocking batch scorer: batches concurrent prompts and caches repeated ones.

    `max_wait_s` is how long the first prompt of a batch waits for company when the worker is idle. The default
    is 0: a lone request is scored at once (waiting only added latency: the measured 2 ms of the old default
    were all overhead at concurrency 1), and under load batches still fill, because prompts that arrive while a
    batch is being scored queue and form the next one. The LRU cache keys on the exact prompt text (repeated
    system prompts and retries are common in real traffic, and a hit costs microseconds instead of milliseconds).
    """

    def __init__(
        self,
        scorer: Callable[[Sequence[str]], Sequence[R]],
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.0,
        max_chars: int | None = None,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._scorer = scorer
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._max_chars = max_chars
        self.cache: ScoreCache[R] = ScoreCache(cache_entries, cache_bytes)
        self._queue: list[tuple[bytes, str, asyncio.Future[R]]] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiergate-classifier")
        self.on_batch = on_batch
        self._closed = False

    async def score(self, prompts: Sequence[str]) -> list[R]:
        if self._closed:
            raise ClassifierError("classifier is closed")
        loop = asyncio.get_running_loop()
        results: list[R | None] = []
        pending: list[tuple[int, asyncio.Future[R]]] = []
        for p in prompts:
            text = p if self._max_chars is None else p[: self._max_chars]
            key = prompt_key(text)
            hit = self.cache.get(key)
            if hit is not None:
                results.append(hit)
                continue
            fut: asyncio.Future[R] = loop.create_future()
            self._queue.append((key, text, fut))
            pending.append((len(results), fut))
            results.append(None)
        if not pending:
            return [r for r in results if r is not None]
        self._ensure_worker()
        for i, f in pending:
            results[i] = await f
        return [r for r in results if r is not None]

    def _ensure_worker(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        self._wakeup.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._queue) < self._max_batch and self._max_wait_s > 0:
                await asyncio.sleep(self._max_wait_s)
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            live = [(k, p, f) for k, p, f in batch if not f.done()]
            if not live:
                continue
            by_key = {k: p for k, p, _ in live}
            keys, texts = list(by_key), list(by_key.values())
            t0 = time.perf_counter()
            try:
                scores = await loop.run_in_executor(self._executor, self._scorer, texts)
                if len(scores) != len(texts):
                    raise ClassifierError(f"scorer returned {len(scores)} scores for {len(texts)} prompts")
            except Exception as e:  # a failing scorer fails this batch's requests, not the worker
                err = e if isinstance(e, ClassifierError) else ClassifierError(f"scoring failed: {e}")
                for _, _, f in live:
                    if not f.done():
                        f.set_exception(err)
                continue
            if self.on_batch is not None:
                self.on_batch(len(texts), time.perf_counter() - t0)
            verdicts = dict(zip(keys, scores, strict=True))
            for k, v in verdicts.items():
                self.cache.put(k, v)
            for k, _, f in live:
                if not f.done():
                    f.set_result(verdicts[k])

    async def aclose(self) -> None:
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for _, _, f in self._queue:
            if not f.done():
                f.set_exception(ClassifierError("classifier closed"))
        self._queue = []
        self._executor.shutdown(wait=False, cancel_futures=True)
