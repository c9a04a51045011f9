"""The router's reward client (tiergate_router.reward) against a scripted pooling server: the one batched call it
makes, and the reason it gives for every way the reward server can fail."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.support.reward import FakeRewardServer
from tests.support.router_serve import free_port
from tiergate_router.reward import (
    REWARD_ERROR_REASONS,
    RewardClient,
    RewardError,
    parse_scores,
    render_pair,
)


def _with_fake(mode: str, check: Callable[[FakeRewardServer], Awaitable[None]]) -> FakeRewardServer:
    async def body() -> FakeRewardServer:
        fake = FakeRewardServer(mode=mode)
        await fake.start()
        try:
            await check(fake)
        finally:
            await fake.stop()
        return fake

    return asyncio.run(body())


def test_scores_in_one_batched_call_in_answer_order() -> None:
    answers = ["Paris.", "It is Paris, the largest city of France.", "Lyon"]

    async def check(fake: FakeRewardServer) -> None:
        client = RewardClient(fake.url, None)
        try:
            scores = await client.score("Capital of France?", answers, timeout_s=10)
            again = await client.score("Capital of France?", answers[:1], timeout_s=10)
        finally:
            await client.aclose()
        assert scores == [float(len(render_pair("Capital of France?", a))) for a in answers]
        assert again == scores[:1]

    fake = _with_fake("ok", check)
    assert len(fake.requests) == 2  # one call per score(), whatever n
    first = fake.requests[0]
    assert first["model"] == "fake-reward"  # asked /v1/models (once: the second call reused it)
    assert first["input"] == [render_pair("Capital of France?", a) for a in answers]
    assert first["use_activation"] is False  # raw logits, not vLLM's default sigmoid
    assert first["truncate_prompt_tokens"] == -1


def test_named_model_and_shared_session_are_used_as_given() -> None:
    async def check(fake: FakeRewardServer) -> None:
        async with aiohttp.ClientSession() as session:
            client = RewardClient(fake.url + "/", "other-name", session=session)
            with pytest.raises(RewardError) as e:
                await client.score("p", ["a"], timeout_s=10)
            assert e.value.reason == "bad_response"  # the server's 404 for an unknown model
            assert "does not exist" in str(e.value)
            await client.aclose()
            assert not session.closed  # the caller's session stays open

    fake = _with_fake("ok", check)
    assert [r["model"] for r in fake.requests] == ["other-name"]


def test_no_answers_no_call() -> None:
    async def check(fake: FakeRewardServer) -> None:
        client = RewardClient(fake.url, "fake-reward")
        assert await client.score("p", [], timeout_s=1) == []
        await client.aclose()

    assert _with_fake("ok", check).requests == []


@pytest.mark.parametrize("mode", ["wrong_count", "nan", "not_json", "http_500", "huge"])
def test_garbage_is_bad_response(mode: str) -> None:
    async def check(fake: FakeRewardServer) -> None:
        client = RewardClient(fake.url, "fake-reward")
        try:
            with pytest.raises(RewardError) as e:
                await client.score("p", ["a", "bb", "ccc"], timeout_s=10)
        finally:
            await client.aclose()
        assert e.value.reason == "bad_response"

    _with_fake(mode, check)


def test_a_server_that_holds_is_a_timeout() -> None:
    async def check(fake: FakeRewardServer) -> None:
        client = RewardClient(fake.url, "fake-reward")
        try:
            with pytest.raises(RewardError) as e:
                await client.score("p", ["a", "b"], timeout_s=0.2)
        finally:
            await client.aclose()
        assert e.value.reason == "timeout"
        assert len(fake.requests) == 1  # it was the server that held, not the connection

    _with_fake("hold", check)


def test_a_dropped_connection_is_unavailable() -> None:
    async def check(fake: FakeRewardServer) -> None:
        client = RewardClient(fake.url, "fake-reward")
        try:
            with pytest.raises(RewardError) as e:
                await client.score("p", ["a"], timeout_s=10)
        finally:
            await client.aclose()
        assert e.value.reason == "unavailable"

    _with_fake("drop", check)


def test_a_refused_connection_is_unavailable() -> None:
    async def check() -> None:
        # Nothing listens there: the model lookup is refused first, and the reason says so.
        client = RewardClient(f"http://127.0.0.1:{free_port()}", None)
        try:
            with pytest.raises(RewardError) as e:
                await client.score("p", ["a"], timeout_s=10)
        finally:
            await client.aclose()
        assert e.value.reason == "unavailable"

    asyncio.run(check())


def test_a_server_that_speaks_no_http_is_bad_response() -> None:
    async def check() -> None:
        async def nonsense(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(nonsense, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = RewardClient(f"http://127.0.0.1:{port}", "m")
        try:
            with pytest.raises(RewardError) as e:
                await client.score("p", ["a"], timeout_s=10)
        finally:
            await client.aclose()
            server.close()
        assert e.value.reason == "bad_response"

    asyncio.run(check())


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ([], "no `data` list"),
        ({"data": {"index": 0}}, "no `data` list"),
        ({"data": [{"index": 0, "data": [1.0]}]}, "1 scores for 2 answers"),
        ({"data": [{"index": 0, "data": [1.0]}, {"index": 0, "data": [2.0]}]}, "appears twice"),
        ({"data": [{"index": 0, "data": [1.0]}, {"index": 2, "data": [2.0]}]}, "valid `index`"),
        ({"data": [{"index": 0, "data": [1.0]}, {"index": True, "data": [2.0]}]}, "valid `index`"),
        ({"data": [{"index": 0, "data": [1.0, 2.0]}, {"index": 1, "data": [2.0]}]}, "score 0"),
        ({"data": [{"index": 0, "data": "AAAA"}, {"index": 1, "data": [2.0]}]}, "score 0"),
        ({"data": [{"index": 0, "data": [1.0]}, {"index": 1, "data": [float("inf")]}]}, "score 1"),
        ({"data": [{"index": 0, "data": [1.0]}, {"index": 1, "data": False}]}, "score 1"),
    ],
)
def test_parse_scores_refuses_garbage(body: object, why: str) -> None:
    with pytest.raises(RewardError, match=why) as e:
        parse_scores(body, 2)
    assert e.value.reason == "bad_response"


def test_parse_scores_accepts_both_vllm_forms_in_any_order() -> None:
    body = json.loads('{"data": [{"index": 1, "data": -2}, {"index": 0, "data": [0.5]}]}')
    assert parse_scores(body, 2) == [0.5, -2.0]


def test_reasons_are_the_documented_ones() -> None:
    assert REWARD_ERROR_REASONS == ("timeout", "unavailable", "bad_response")
    with pytest.raises(ValueError, match="unknown reward error reason"):
        RewardError("sad", "no such reason")
