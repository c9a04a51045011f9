"""The shared OpenAI server skeleton (tiergate_router.openai_server), on its own: a minimal model server on it,
read by the official `openai` client and by the router's own scrapers."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest
from aiohttp import web

from tiergate_router.dispatch import parse_waiting
from tiergate_router.openai_server import (
    CompletionStream,
    HTTPServer,
    ModelServer,
    completion_body,
    error_response,
    usage_body,
    wants_usage,
)


class Echo(ModelServer):
    """Answers with the words of the prompt, one chunk per word when streaming."""

    def __init__(self) -> None:
        super().__init__("echo", owned_by="tests", model_card={"max_model_len": 16})

    async def generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await request.json()
        if body.get("model") != self.model:
            return error_response(404, "no such model", type_="NotFoundError", code="model_not_found")
        words = (body["messages"][-1]["content"] if chat else body["prompt"]).split()
        if not body.get("stream"):
            return web.json_response(
                completion_body(
                    self.model,
                    chat=chat,
                    text=" ".join(words),
                    finish_reason="stop",
                    prompt_tokens=len(words),
                    completion_tokens=len(words),
                )
            )
        stream = await CompletionStream.open(request, self.model, chat=chat)
        for i, w in enumerate(words):
            await stream.text(("" if i == 0 else " ") + w)
        await stream.finish("stop", usage_body(len(words), len(words)) if wants_usage(body) else None)
        return stream.response


async def _exercise() -> None:
    echo = Echo()
    echo.load.waiting = 3
    a, b = HTTPServer(echo.app(), "127.0.0.1", 0), HTTPServer(echo.app(), "127.0.0.1", 0)
    port_a, port_b = await a.start(), await b.start()
    try:
        # Port 0: each got a free port of its own, read back from the bound socket.
        assert port_a != 0
        assert port_b != 0
        assert port_a != port_b
        assert a.base_url == f"http://127.0.0.1:{port_a}/v1"
        client = openai.AsyncOpenAI(base_url=a.base_url, api_key="unused", max_retries=0)

        (model,) = (await client.models.list()).data
        assert (model.id, model.owned_by, model.model_extra) == ("echo", "tests", {"max_model_len": 16})

        chat = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "one two"}])
        assert chat.choices[0].message.content == "one two"
        assert chat.usage is not None
        assert chat.usage.total_tokens == 4

        chunks = [
            c
            async for c in await client.chat.completions.create(
                model="echo",
                messages=[{"role": "user", "content": "x y z"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "x y z"
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 3

        pieces = [c async for c in await client.completions.create(model="echo", prompt="p q", stream=True)]
        assert "".join(c.choices[0].text for c in pieces) == "p q"
        assert all(c.usage is None for c in pieces)  # not asked for

        with pytest.raises(openai.NotFoundError) as err:
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        # OpenAI's error envelope: the client unwraps `error` into the exception's body and code.
        assert err.value.status_code == 404
        assert err.value.code == "model_not_found"
        assert err.value.body == {
            "message": "no such model",
            "type": "NotFoundError",
            "param": None,
            "code": "model_not_found",
        }

        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port_a}/metrics") as r:
                # The router's own scraper reads the queue length the server reports.
                assert parse_waiting(await r.text()) == 3
            async with http.get(f"http://127.0.0.1:{port_a}/health") as r:
                assert r.status == 200
        await client.close()
    finally:
        await a.stop()
        await b.stop()


def test_model_server_on_the_skeleton_speaks_openai_to_the_official_client() -> None:
    asyncio.run(_exercise())
