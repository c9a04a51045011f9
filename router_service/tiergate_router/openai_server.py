"""The one OpenAI-compatible HTTP server skeleton (aiohttp), shared by the router's front end (`server`,
`http_api`), the demo's model server (`demo.lm_server`) and the test suite's fake vLLM (tests/support).

It holds what those servers have in common and none of what they answer: listening on host:port (port 0 picks a
free port, read back through aiohttp's public `AppRunner.addresses`, never a private attribute), OpenAI's error
envelope, the `/v1/models` list, completion bodies and their server-sent-event stream, vLLM's queue metrics, and
the `READY <url>` line a parent process waits for before it sends requests.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
SSE_DONE = b"data: [DONE]\n\n"


class OpenAIEndpoints(Protocol):
    """The handlers every OpenAI-compatible server here has (the router, the demo's tiers, the fake vLLM)."""

    async def chat_completions(self, request: web.Request) -> web.StreamResponse: ...
    async def completions(self, request: web.Request) -> web.StreamResponse: ...
    async def models(self, request: web.Request) -> web.StreamResponse: ...
    async def metrics(self, request: web.Request) -> web.StreamResponse: ...
    async def health(self, request: web.Request) -> web.StreamResponse: ...


def build_openai_app(
    endpoints: OpenAIEndpoints, *, middlewares: Sequence[Middleware] = (), client_max_size: int = 1024**2
) -> web.Application:
    """The OpenAI routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) and the serving ones vLLM has
    at the root (`/metrics`, `/health`); `client_max_size` is aiohttp's own limit on a body it reads."""
    app = web.Application(middlewares=middlewares, client_max_size=client_max_size)
    app.router.add_post("/v1/chat/completions", endpoints.chat_completions)
    app.router.add_post("/v1/completions", endpoints.completions)
    app.router.add_get("/v1/models", endpoints.models)
    app.router.add_get("/metrics", endpoints.metrics)
    app.router.add_get("/health", endpoints.health)
    return app


class HTTPServer:
    """An aiohttp application listening on `host:port` until `stop()`.

    `shutdown_timeout` is how long `stop()` lets requests in flight finish (aiohttp's default is 60 s).
    """

    def __init__(self, app: web.Application, host: str, port: int, *, shutdown_timeout: float = 60.0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (the free one chosen when `port` was 0)."""
        # handler_cancellation: a client that disconnects cancels its handler. That is how a model server learns
        # to stop generating, and how the router closes its upstream request, which tells the tier to abort.
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=self.shutdown_timeout
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        # getsockname() of the listening sockets; with port 0 the kernel chose, so ask it back.
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL clients are given (`…/v1`)."""
        return f"http://{self.host}:{self.port}/v1"


async def serve_until_signalled(server: HTTPServer) -> None:
    """Start `server`, print `READY <base URL>` (the line a parent process reads before it sends requests), serve
    until SIGTERM or SIGINT, then stop."""
    await server.start()
    print(f"READY {server.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


# -- bodies ---------------------------------------------------------------------------------------------------


def error_body(
    message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope; the official client reads `error.message` into its exception."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.json_response(error_body(message, type_=type_, param=param, code=code), status=status, headers=headers)


def models_body(model_ids: Iterable[str], *, owned_by: str, **extra: Any) -> dict[str, Any]:
    """The `/v1/models` list; `extra` fields go into every entry (vLLM adds `root`, `max_model_len`, …)."""
    now = int(time.time())
    data = [{"id": m, "object": "model", "created": now, "owned_by": owned_by, **extra} for m in model_ids]
    return {"object": "list", "data": data}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def wants_usage(body: Mapping[str, Any]) -> bool:
    """Whether a streaming request asked for the final usage chunk (`stream_options.include_usage`)."""
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


def _completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def completion_body(
    model: str, *, chat: bool, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A whole (non-streamed) answer: a `chat.completion` or a `text_completion`."""
    choice: dict[str, Any] = (
        {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
    )
    choice |= {"logprobs": None, "finish_reason": finish_reason}
    return {
        "id": _completion_id(chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage_body(prompt_tokens, completion_tokens),
    }


def sse_event(obj: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


class CompletionStream:
    """One streamed answer as OpenAI's server-sent events: the chunks (`chat.completion.chunk`, opened by the
    assistant role, or `text_completion`), a last chunk with the finish reason, the usage chunk when asked for,
    then `[DONE]`."""

    def __init__(self, response: web.StreamResponse, model: str, *, chat: bool) -> None:
        self.response = response
        self.model = model
        self.chat = chat
        self.id = _completion_id(chat)
        self.created = int(time.time())

    @classmethod
    async def open(
        cls, request: web.Request, model: str, *, chat: bool, headers: Mapping[str, str] | None = None
    ) -> CompletionStream:
        """Send the headers (`headers` beside the content type) and, for chat, the role chunk."""
        response = web.StreamResponse(headers={**(headers or {}), "Content-Type": SSE_CONTENT_TYPE})
        await response.prepare(request)
        stream = cls(response, model, chat=chat)
        if chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            await stream._write([role], None)
        return stream

    async def text(self, piece: str) -> None:
        await self._chunk(piece, None)

    async def finish(self, finish_reason: str, usage: dict[str, int] | None = None) -> None:
        await self._chunk(None, finish_reason)
        if usage is not None:
            await self._write([], usage)
        await self.response.write(SSE_DONE)
        await self.response.write_eof()

    async def _chunk(self, piece: str | None, finish_reason: str | None) -> None:
        """A chunk with a piece of the answer, or the last one (no piece, the finish reason)."""
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["delta"] = {} if piece is None else {"content": piece}
        else:
            choice["text"] = piece or ""
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        await self._write([choice], None)

    async def _write(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> None:
        event: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            event["usage"] = usage
        await self.response.write(sse_event(event))


@dataclass
class ServerLoad:
    """A model server's counters, as vLLM reports them on /metrics."""

    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


def vllm_metrics_text(model: str, load: ServerLoad) -> str:
    """The part of vLLM's /metrics the router reads (`vllm:num_requests_waiting`, scraped for queue-aware
    balancing), with its neighbours, in Prometheus text format."""
    label = f'model_name="{model}"'
    samples = [
        ("num_requests_running", "gauge", "Number of requests in model execution batches.", load.running),
        ("num_requests_waiting", "gauge", "Number of requests waiting to be processed.", load.waiting),
        ("prompt_tokens_total", "counter", "Number of prefill tokens processed.", load.prompt_tokens),
        ("generation_tokens_total", "counter", "Number of generation tokens processed.", load.generation_tokens),
    ]
    return "".join(
        f"# HELP vllm:{name} {help_}\n# TYPE vllm:{name} {kind}\nvllm:{name}{{{label}}} {float(value)}\n"
        for name, kind, help_, value in samples
    )


class ModelServer:
    """An OpenAI-compatible model server (one served model): everything but the generation, which a subclass
    implements in `generate`, keeping `load` up to date. `model_card` adds fields to the model's `/v1/models`
    entry."""

    def __init__(
        self, model: str, *, owned_by: str, load: ServerLoad | None = None, model_card: Mapping[str, Any] | None = None
    ) -> None:
        self.model = model
        self.owned_by = owned_by
        self.load = load if load is not None else ServerLoad()
        self.model_card = dict(model_card or {})

    def app(self, *, middlewares: Sequence[Middleware] = ()) -> web.Application:
        return build_openai_app(self, middlewares=middlewares)

    async def generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        raise NotImplementedError

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, chat=False)

    async def models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(models_body([self.model], owned_by=self.owned_by, **self.model_card))

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=vllm_metrics_text(self.model, self.load), content_type="text/plain")

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="")
