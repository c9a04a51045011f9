"""A fake vLLM OpenAI-compatible server: real HTTP, vLLM's API shapes and metric names, scripted behaviour.

It stands in for a GPU model server (which cannot run here) at the network boundary. Behaviour is configurable
per instance and changeable while running: latency before the answer, delay between streamed tokens, an HTTP
error status, dropping the connection without an answer or mid-stream, and a concurrency limit that makes
requests queue (reported as `vllm:num_requests_waiting`, as vLLM does).

Run standalone (so that a test can SIGKILL it like a crashed pod):
    python -m tests.support.fake_vllm --host 127.0.0.1 --port 8001 --model small-model
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from tiergate_router.openai_server import (
    CompletionStream,
    HTTPServer,
    ModelServer,
    ServerLoad,
    completion_body,
    serve_until_signalled,
    usage_body,
    wants_usage,
)


@dataclass
class Behaviour:
    latency_s: float = 0.0
    token_delay_s: float = 0.0
    tokens: int = 8
    # Answer every generation request with this HTTP status (vLLM-style error body) instead of a completion.
    fail_status: int | None = None
    # Close the connection without sending a response.
    drop_connection: bool = False
    # While streaming, close the connection after this many tokens.
    drop_after_tokens: int | None = None
    # Requests generating at once; the rest wait in a queue (vLLM's scheduler, much simplified). 0 = no limit.
    max_running: int = 0
    # Like `vllm serve --api-key`: every /v1 request needs `Authorization: Bearer <api_key>`, else HTTP 401.
    api_key: str | None = None
    # Hold every generation (counted in `stats.running`) until this event is set: a test keeps requests in flight
    # for exactly as long as it needs, instead of a latency it hopes is long enough on a busy machine. Set it from
    # another thread with `loop.call_soon_threadsafe(event.set)`.
    hold: asyncio.Event | None = None
    # Keep every request body in `Stats.requests` (tests read them); a load test of megabyte prompts turns it off.
    record: bool = True
    # Best-of-N: the texts of the choices a request with `n` gets (choice i: samples[i % len]); None: generated
    # words, choice i > 0 tagged `-s<i>`. vLLM answers `n` with n choices and usage summed over all of them.
    samples: tuple[str, ...] | None = None
    # Answer one choice whatever `n` asks (an OpenAI-compatible server without sampling of several).
    ignore_n: bool = False
    # Input modalities the model takes (text, image, audio). A chat request with an image (`image_url`) or audio
    # (`input_audio`, `audio_url`) part it does not take is refused with HTTP 400, as vLLM refuses them for a
    # text-only model; one it takes is "read": the answer starts with `<modality>:<digest>` per part (the first 12
    # hex digits of the part's URL or data's SHA-256, `attachment_digest`), so a test can tell which part reached
    # which tier and what came back.
    modalities: frozenset[str] = frozenset({"text"})


@dataclass
class Stats(ServerLoad):
    requests: list[dict[str, Any]] = field(default_factory=list)
    completed: int = 0
    # Requests whose client went away before the answer was complete (vLLM aborts those).
    aborted: int = 0
    # Requests refused for a missing or wrong API key.
    unauthorized: int = 0


class FakeVLLM(ModelServer):
    def __init__(
        self,
        model: str = "fake-model",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        behaviour: Behaviour | None = None,
        name: str | None = None,
    ) -> None:
        self.stats = Stats()
        super().__init__(
            model, owned_by="vllm", load=self.stats, model_card={"root": model, "parent": None, "max_model_len": 2048}
        )
        self.behaviour = behaviour or Behaviour()
        self.name = name or f"{model}@{host}"
        # Stopping drops requests in flight almost at once, as a killed vLLM pod would.
        self.server = HTTPServer(self.app(middlewares=[self._check_key]), host, port, shutdown_timeout=0.1)
        self._slots: asyncio.Semaphore | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @web.middleware
    async def _check_key(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = self.behaviour.api_key
        authorised = request.headers.get("Authorization") == f"Bearer {key}"
        if key is not None and request.path.startswith("/v1") and not authorised:
            self.stats.unauthorized += 1
            # vLLM's answer (its authentication middleware), body included.
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def start(self) -> str:
        await self.server.start()
        return self.base_url

    async def stop(self) -> None:
        await self.server.stop()

    def _error(self, status: int, message: str, type_: str = "BadRequestError") -> web.Response:
        # vLLM's ErrorResponse shape.
        return web.json_response(
            {"object": "error", "message": message, "type": type_, "param": None, "code": status}, status=status
        )

    async def generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "invalid JSON")
        if not isinstance(body, dict):
            return self._error(400, "body must be an object")
        b = self.behaviour
        if b.record:
            self.stats.requests.append(body)
        if body.get("model") != self.model:
            return self._error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        if b.drop_connection:
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        if b.fail_status is not None:
            return self._error(b.fail_status, f"scripted failure {b.fail_status}", "InternalServerError")
        seen = _attachments(body) if chat else []
        refused = sorted({m for m, _ in seen if m not in b.modalities})
        if refused:
            return self._error(400, f"{self.model} is not a multimodal model: it takes no {refused[0]} input")
        prefix = " ".join(f"{m}:{d}" for m, d in seen)
        prompt = _prompt_text(body, chat)
        n_prompt = max(1, len(prompt.split()))
        n_out = int(body.get("max_tokens") or b.tokens)
        n_out = max(1, min(n_out, b.tokens))
        try:
            await self._acquire_slot()
            try:
                self.stats.running += 1
                if b.hold is not None:
                    await b.hold.wait()
                if b.latency_s:
                    await asyncio.sleep(b.latency_s)
                if body.get("stream"):
                    return await self._stream(request, body, chat, n_prompt, n_out, prefix)
                n = body.get("n")
                n_choices = 1 if b.ignore_n or not isinstance(n, int) or n < 1 else n
                texts = [(f"{prefix} " if prefix else "") + self._text(i, n_out) for i in range(n_choices)]
                out_tokens = sum(len(t.split()) for t in texts)
                self.stats.prompt_tokens += n_prompt
                self.stats.generation_tokens += out_tokens
                self.stats.completed += 1
                answer = completion_body(
                    self.model,
                    chat=chat,
                    text=texts[0],
                    finish_reason="length",
                    prompt_tokens=n_prompt,
                    completion_tokens=out_tokens,
                )
                first = answer["choices"][0]
                answer["choices"] = [
                    {**first, "index": i, **({"message": {"role": "assistant", "content": t}} if chat else {"text": t})}
                    for i, t in enumerate(texts)
                ]
                return web.json_response(answer)
            finally:
                self.stats.running -= 1
                self._release_slot()
        except asyncio.CancelledError:
            self.stats.aborted += 1
            raise

    def _text(self, i: int, n_out: int) -> str:
        """The text of choice `i` of an answer of `n_out` tokens."""
        if self.behaviour.samples is not None:
            return self.behaviour.samples[i % len(self.behaviour.samples)]
        tag = self.name if i == 0 else f"{self.name}-s{i}"
        return " ".join(f"{tag}-tok{k}" for k in range(n_out))

    async def _acquire_slot(self) -> None:
        if self.behaviour.max_running <= 0:
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.behaviour.max_running)
        self.stats.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.stats.waiting -= 1

    def _release_slot(self) -> None:
        if self.behaviour.max_running > 0 and self._slots is not None:
            self._slots.release()

    async def _stream(
        self, request: web.Request, body: dict[str, Any], chat: bool, n_prompt: int, n_out: int, prefix: str = ""
    ) -> web.StreamResponse:
        b = self.behaviour
        stream = await CompletionStream.open(request, self.model, chat=chat)
        if prefix:
            await stream.text(prefix + " ")
        for i in range(n_out):
            if b.drop_after_tokens is not None and i >= b.drop_after_tokens:
                assert request.transport is not None
                request.transport.close()
                raise asyncio.CancelledError
            if b.token_delay_s:
                await asyncio.sleep(b.token_delay_s)
            await stream.text(("" if i == 0 else " ") + f"{self.name}-tok{i}")
            self.stats.generation_tokens += 1
        await stream.finish("length", usage_body(n_prompt, n_out) if wants_usage(body) else None)
        self.stats.prompt_tokens += n_prompt
        self.stats.completed += 1
        return stream.response


def attachment_digest(payload: str) -> str:
    """What the fake "reads" in an image or audio part: the first 12 hex digits of its URL's or data's SHA-256."""
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _attachments(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(modality, digest) of each image and audio part of a chat body, in order."""
    out: list[tuple[str, str]] = []
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else []:
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype in ("image_url", "audio_url"):
                url = (part.get(ptype) or {}).get("url", "")
                out.append(("image" if ptype == "image_url" else "audio", attachment_digest(str(url))))
            elif ptype == "input_audio":
                out.append(("audio", attachment_digest(str((part.get("input_audio") or {}).get("data", "")))))
    return out


def _prompt_text(body: dict[str, Any], chat: bool) -> str:
    if not chat:
        p = body.get("prompt")
        return p if isinstance(p, str) else " ".join(x for x in p if isinstance(x, str)) if isinstance(p, list) else ""
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        return ""
    return " ".join(m.get("content", "") for m in msgs if isinstance(m, dict) and isinstance(m.get("content"), str))


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeVLLM(
        args.model,
        host=args.host,
        port=args.port,
        name=args.name,
        behaviour=Behaviour(
            latency_s=args.latency,
            token_delay_s=args.token_delay,
            tokens=args.tokens,
            max_running=args.max_running,
            api_key=args.api_key,
            record=not args.no_record,
        ),
    )
    await serve_until_signalled(fake.server)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fake vLLM OpenAI server for tests and benchmarks")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", default="fake-model")
    p.add_argument("--name", default=None, help="tag put into generated text (default MODEL@HOST)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds between streamed tokens")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--max-running", type=int, default=0)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 (as vLLM's --api-key)")
    p.add_argument("--no-record", action="store_true", help="do not keep request bodies (load tests of big prompts)")
    args = p.parse_args(argv)
    try:
        import uvloop  # same loop as the router, so benchmarks compare like with like
    except ModuleNotFoundError:
        asyncio.run(_serve(args))
        return 0
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
