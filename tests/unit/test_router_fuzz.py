"""Property-based fuzzing of the HTTP API and the gRPC messages: whatever arrives, the router answers with a
success or a well-formed 4xx (INVALID_ARGUMENT/NOT_FOUND over gRPC), never a 5xx, never a crash."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.harness import Harness
from tiergate_router._proto import router_pb2, router_pb2_grpc

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["user", "system", "assistant", "tool", "", "USER", "bot"])
messages = st.lists(
    st.fixed_dictionaries({"role": roles | json_values, "content": st.text(max_size=60) | json_values}), max_size=4
)
chat_bodies = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["tiergate", "small", "large", "nope", ""]) | json_values,
        "messages": messages | json_values,
    },
    optional={
        "stream": st.booleans() | json_values,
        "max_tokens": st.integers(-3, 20) | json_values,
        "temperature": st.floats(allow_nan=False, allow_infinity=False) | json_values,
        "stop": json_values,
        "n": st.integers(-1, 3),
        "extra_field": json_values,
    },
)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness().start()
    yield h
    h.stop()


def _post(h: Harness, path: str, body: bytes) -> tuple[int, bytes, str]:
    assert h.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", h.server.http_port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data, r.headers.get("x-tiergate-tier", "")


def _check(status: int, data: bytes, tier: str) -> None:
    assert status < 500, data[:500]
    assert tier, "x-tiergate-tier header missing"
    if status >= 400:
        err = json.loads(data)["error"]
        assert isinstance(err["message"], str)
        assert err["message"]


@FUZZ
@given(body=chat_bodies)
def test_fuzz_chat_json(harness: Harness, body: dict[str, Any]) -> None:
    status, data, tier = _post(harness, "/v1/chat/completions", json.dumps(body).encode())
    _check(status, data, tier)
    if status == 200 and body.get("stream") is not True:
        assert tier in ("small", "large")


@FUZZ
@given(
    body=st.fixed_dictionaries(
        {"model": json_values | st.just("tiergate"), "prompt": json_values},
        optional={"stream": json_values, "max_tokens": json_values},
    )
)
def test_fuzz_completions_json(harness: Harness, body: dict[str, Any]) -> None:
    status, data, tier = _post(harness, "/v1/completions", json.dumps(body).encode())
    _check(status, data, tier)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_fuzz_raw_bytes(harness: Harness, raw: bytes) -> None:
    status, data, tier = _post(harness, "/v1/chat/completions", raw)
    _check(status, data, tier)


chat_messages = st.lists(st.builds(router_pb2.ChatMessage, role=roles, content=st.text(max_size=60)), max_size=3)
generate_requests = st.builds(
    router_pb2.GenerateRequest,
    messages=chat_messages,
    prompt=st.text(max_size=60),
    max_tokens=st.integers(0, 2**32 - 1),
    tier=st.sampled_from(["", "small", "large", "nope", "tiergate"]),
)
OK_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def channel(harness: Harness) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(harness.grpc_target) as ch:
        yield ch


@FUZZ
@given(req=generate_requests, stream=st.booleans())
def test_fuzz_grpc_generate(channel: grpc.Channel, req: router_pb2.GenerateRequest, stream: bool) -> None:
    s = router_pb2_grpc.RouterServiceStub(channel)
    error: grpc.RpcError | None = None
    try:
        tiers = [c.tier for c in s.GenerateStream(req, timeout=30)] if stream else [s.Generate(req, timeout=30).tier]
    except grpc.RpcError as e:
        error = e
    if error is None:
        assert set(tiers) <= {"small", "large"}
        assert tiers
    else:
        assert error.code() in OK_CODES, (error.code(), error.details())


@FUZZ
@given(raw=st.binary(max_size=200), method=st.sampled_from(["Classify", "Generate"]))
def test_fuzz_grpc_wire_bytes(channel: grpc.Channel, raw: bytes, method: str) -> None:
    # Arbitrary bytes on the wire: either a decodable message (then a normal answer) or a clean error.
    call = channel.unary_unary(
        f"/tiergate.v1.RouterService/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    error: grpc.RpcError | None = None
    try:
        call(raw, timeout=30)
    except grpc.RpcError as e:
        error = e
    if error is not None:
        assert error.code() in OK_CODES, (error.code(), error.details())
