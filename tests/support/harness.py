"""A router with fake vLLM tiers on loopback, run on an event loop in a background thread.

Sync tests (and the official sync `openai` client) talk to it over real HTTP/gRPC; async work on the router's own
loop goes through `call()`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from tests.support.fake_vllm import Behaviour, FakeVLLM
from tests.support.scorers import KeywordScorer
from tiergate_router.classifier import Classifier, MicroBatcher
from tiergate_router.config import RouterConfig, TierConfig
from tiergate_router.server import RouterServer, ServeOptions

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="harness-loop", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Harness:
    """`tiers` maps tier name -> number of fake endpoints (cheapest first)."""

    def __init__(
        self,
        tiers: Sequence[tuple[str, int]] = (("small", 2), ("large", 2)),
        *,
        config_overrides: dict[str, Any] | None = None,
        grpc: bool = True,
        classifier_factory: Callable[[], Classifier] | None = None,
        external: dict[str, list[str]] | None = None,
        grace_s: float = 1.0,
        modalities: dict[str, frozenset[str]] | None = None,
    ) -> None:
        self.thread = LoopThread()
        self.fakes: dict[str, list[FakeVLLM]] = {}
        self.scorer = KeywordScorer()
        self._tiers = tiers
        self._overrides = config_overrides or {}
        self._grpc = grpc
        self._classifier_factory = classifier_factory
        # tier -> base URLs of servers the caller runs (e.g. fake vLLM subprocesses it can SIGKILL)
        self._external = external or {}
        # Short by default so that stopping a harness is quick; a shutdown test that needs requests to outlive the
        # stop gives a long one (the stop still returns as soon as they are done).
        self._grace_s = grace_s
        # tier -> its input modalities (the router's TierConfig and its fakes' alike); absent: text only.
        self._modalities = modalities or {}
        self.server: RouterServer | None = None

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return self.thread.call(coro, timeout)

    def start(self) -> Harness:
        self.call(self._start())
        return self

    async def _start(self) -> None:
        tier_cfgs: list[TierConfig] = []
        for name, n in self._tiers:
            mods = self._modalities.get(name, frozenset({"text"}))
            fakes = [
                FakeVLLM(f"{name}-model", name=f"{name}{i}", behaviour=Behaviour(modalities=mods)) for i in range(n)
            ]
            for f in fakes:
                await f.start()
            self.fakes[name] = fakes
            tier_cfgs.append(
                TierConfig(
                    name=name,
                    base_urls=tuple(self._external.get(name, [])) + tuple(f.base_url for f in fakes),
                    input_price_per_mtok=1.0 * (len(tier_cfgs) + 1) ** 2,
                    output_price_per_mtok=2.0 * (len(tier_cfgs) + 1) ** 2,
                    modalities=mods,
                )
            )
        n = len(tier_cfgs)
        cfg = RouterConfig(
            tiers=tuple(tier_cfgs),
            thresholds_bp=(5000,) if n == 2 else tuple(round(10000 * i / n) for i in range(1, n)),
            **self._overrides,
        )
        classifier = self._classifier_factory() if self._classifier_factory else MicroBatcher(self.scorer)
        self.server = RouterServer(
            cfg, classifier, ServeOptions(port=0, grpc_port=0 if self._grpc else None, grace_s=self._grace_s)
        )
        await self.server.start()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def grpc_target(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.grpc_port}"

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        assert self.server is not None
        v = self.server.router.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        return self.call(_wrap(fn))

    def stop(self) -> None:
        async def _stop() -> None:
            if self.server is not None:
                await self.server.stop()
            for fakes in self.fakes.values():
                for f in fakes:
                    await f.stop()

        try:
            self.call(_stop())
        finally:
            self.thread.close()


async def _wrap(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()
