"""Bad input gets an OpenAI-style 4xx naming the problem; never a 5xx, never a crash (the router keeps serving)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.harness import Harness
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness(grpc=False).start()
    yield h
    h.stop()


def post(
    h: Harness, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], http.client.HTTPResponse]:
    assert h.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", h.server.http_port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data), resp


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "tiergate", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


@pytest.mark.parametrize(
    ("body", "status", "needle", "param"),
    [
        (b"{not json", 400, "not valid JSON", None),
        (b"", 400, "empty", None),
        (b"[1, 2]", 400, "must be a JSON object", None),
        (b'{"model": "tiergate", "messages": [], "x": NaN}', 400, "NaN", None),
        (b"\xff\xfe{}", 400, "not valid UTF-8", None),
        (
            json.dumps({"model": "tiergate", "messages": "hello"}).encode(),
            400,
            "'messages' must be an array",
            "messages",
        ),
        (json.dumps({"model": "tiergate", "messages": []}).encode(), 400, "at least one message", "messages"),
        (json.dumps({"model": "tiergate"}).encode(), 400, "'messages' is required", "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "'model' is required", "model"),
        (
            json.dumps({"model": 7, "messages": [{"role": "user", "content": "x"}]}).encode(),
            400,
            "'model' must be a string",
            "model",
        ),
        (chat(stream="yes"), 400, "'stream' must be a boolean", "stream"),
        (chat(max_tokens="10"), 400, "'max_tokens' must be an integer", "max_tokens"),
        (chat(max_tokens=0), 400, "'max_tokens' must be at least 1", "max_tokens"),
        (chat(temperature="hot"), 400, "'temperature' must be a number", "temperature"),
        (
            json.dumps({"model": "tiergate", "messages": [{"role": "user", "content": 5}]}).encode(),
            400,
            "'messages[0].content' must be a string or an array",
            "messages[0].content",
        ),
        (
            json.dumps({"model": "tiergate", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
            400,
            "'messages[0].role' must be one of",
            "messages[0].role",
        ),
        (
            json.dumps({"model": "tiergate", "messages": ["hi"]}).encode(),
            400,
            "'messages[0]' must be an object",
            "messages[0]",
        ),
        (
            json.dumps({"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}).encode(),
            404,
            "The model 'gpt-17' does not exist",
            "model",
        ),
    ],
)
def test_bad_chat_requests_get_openai_errors(
    harness: Harness, body: bytes, status: int, needle: str, param: str | None
) -> None:
    got, data, resp = post(harness, "/v1/chat/completions", body)
    assert got == status
    assert needle in data["error"]["message"]
    assert data["error"]["param"] == param
    assert data["error"]["type"] == "invalid_request_error"
    assert resp.headers["x-tiergate-tier"] == "none"


def test_bad_completion_prompt_type(harness: Harness) -> None:
    got, data, _ = post(harness, "/v1/completions", json.dumps({"model": "tiergate", "prompt": 12}).encode())
    assert got == 400
    assert "'prompt' must be a string" in data["error"]["message"]


def test_ten_megabyte_prompt_is_413(harness: Harness) -> None:
    body = json.dumps({"model": "tiergate", "messages": [{"role": "user", "content": "x" * 10_000_000}]}).encode()
    got, data, _ = post(harness, "/v1/chat/completions", body)
    assert got == 413
    assert "exceeds the router's limit" in data["error"]["message"]
    assert data["error"]["code"] == "request_too_large"


def test_ten_megabyte_prompt_chunked_without_length_is_413(harness: Harness) -> None:
    assert harness.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", harness.server.http_port, timeout=30)
    payload = json.dumps({"model": "tiergate", "messages": [{"role": "user", "content": "y" * 10_000_000}]}).encode()
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=iter([payload[i : i + 1 << 20] for i in range(0, len(payload), 1 << 20)]),
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        encode_chunked=True,
    )
    resp = conn.getresponse()
    assert resp.status == 413
    assert "exceeds" in json.loads(resp.read())["error"]["message"]


def test_unknown_path_and_method_are_json_4xx(harness: Harness) -> None:
    got, data, _ = post(harness, "/v1/embeddings", chat())
    assert got == 404
    assert "error" in data
    assert harness.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", harness.server.http_port, timeout=10)
    conn.request("GET", "/v1/chat/completions")
    r = conn.getresponse()
    assert r.status == 405
    assert "error" in json.loads(r.read())


def test_router_still_serves_after_bad_input(harness: Harness) -> None:
    got, _data, resp = post(harness, "/v1/chat/completions", chat())
    assert got == 200
    assert resp.headers["x-tiergate-tier"] == "small"
    assert (
        harness.metric(
            "tiergate_router_requests_total", {"tier": "none", "decision": "none", "outcome": "client_error"}
        )
        > 0
    )


def test_client_disconnect_mid_stream_aborts_upstream_and_router_survives() -> None:
    h = Harness(tiers=(("small", 1), ("large", 1)), grpc=False).start()
    try:
        for f in h.fakes["small"]:
            # A stream far longer than any wait below (20 min): the generation can only end by being aborted.
            f.behaviour.token_delay_s = 0.2
            f.behaviour.tokens = 6000
        assert h.server is not None
        body = json.dumps(
            {"model": "tiergate", "stream": True, "messages": [{"role": "user", "content": "a long story"}]}
        ).encode()
        s = socket.create_connection(("127.0.0.1", h.server.http_port))
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = b""
        while b"\r\n\r\n" not in head:  # the whole header block, however the bytes arrive
            chunk = s.recv(65536)
            assert chunk, head
            head += chunk
        assert b"200 OK" in head
        assert b"x-tiergate-tier: small" in head.lower()
        s.close()  # the client goes away mid-stream
        fake = h.fakes["small"][0]
        wait_for("the upstream generation cancelled", lambda: fake.stats.aborted, interval=0.05)
        assert fake.stats.aborted == 1
        assert fake.stats.completed == 0
        cancelled = {"tier": "small", "decision": "small", "outcome": "cancelled"}
        wait_for(
            "the cancelled request counted",
            lambda: h.metric("tiergate_router_requests_total", cancelled) >= 1,
            interval=0.05,
        )
        # and the endpoint is still in good standing (a client leaving says nothing about the backend)
        fake.behaviour.token_delay_s = 0.0
        got, _, resp = post(h, "/v1/chat/completions", chat())
        assert got == 200
        assert resp.headers["x-tiergate-tier"] == "small"
        assert h.metric("tiergate_router_circuit_breaker_state", {"tier": "small", "endpoint": fake.base_url}) == 0
    finally:
        h.stop()
