"""A scripted reward server speaking vLLM's pooling API (`POST /pooling`, `GET /v1/models`, `/health`), for the
router's best-of-N failure paths: it scores by a function of the text, or times out, answers garbage, or fails.

The real reward server (`tiergate reward-server`, a transformers model) is what the "returns the best" test uses;
this one exists because a real model cannot be told to misbehave on cue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tiergate_router.openai_server import HTTPServer, models_body

# What the server does with a /pooling request.
MODES = ("ok", "hang", "http500", "not_json", "wrong_count", "nan", "strings")


@dataclass
class RewardScript:
    mode: str = "ok"
    # The score of one rendered (prompt, answer) text.
    score: Callable[[str], float] = lambda text: float(len(text))
    # Every /pooling body received.
    requests: list[dict[str, Any]] = field(default_factory=list)


class FakeReward:
    def __init__(self, model: str = "fake-reward", *, script: RewardScript | None = None) -> None:
        self.model = model
        self.script = script or RewardScript()
        app = web.Application()
        app.router.add_post("/pooling", self.pooling)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        self.server = HTTPServer(app, "127.0.0.1", 0, shutdown_timeout=0.1)
        # Released at stop, so a hanging request ends with the server.
        self._release = asyncio.Event()

    @property
    def url(self) -> str:
        """The server root, what `--reward-url` takes."""
        return f"http://127.0.0.1:{self.server.port}"

    async def start(self) -> str:
        await self.server.start()
        return self.url

    async def stop(self) -> None:
        self._release.set()
        await self.server.stop()

    async def models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(models_body([self.model], owned_by="vllm"))

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="")

    async def pooling(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        s = self.script
        s.requests.append(body)
        texts = body.get("input") or []
        mode = s.mode
        if mode == "hang":
            await self._release.wait()
        if mode == "http500":
            return web.json_response({"object": "error", "message": "boom", "code": 500}, status=500)
        if mode == "not_json":
            return web.Response(text="<html>proxy error</html>", content_type="text/html")
        scores: list[Any] = [s.score(t) for t in texts]
        if mode == "wrong_count":
            scores = scores[:-1]
        elif mode == "nan":
            scores = [float("nan")] * len(scores)
        elif mode == "strings":
            scores = ["high"] * len(scores)
        data = [{"index": i, "object": "pooling", "data": [v]} for i, v in enumerate(scores)]
        # vLLM's JSON encoder writes NaN as the bare token NaN, which is not JSON: a garbage answer either way.
        return web.json_response({"object": "list", "model": self.model, "data": data, "usage": {}})
