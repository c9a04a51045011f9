"""Request ids, the decision log, POST /v1/feedback and the re-query signal, through the official `openai` client and
a real gRPC channel against a router with fake vLLM tiers on loopback."""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from tests.support.harness import Harness
from tests.support.waiting import wait_for
from tiergate_router._proto import router_pb2, router_pb2_grpc


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dlog") / "decisions.jsonl"


@pytest.fixture(scope="module")
def harness(log_path: Path) -> Iterator[Harness]:
    h = Harness(config_overrides={"decision_log": str(log_path)}).start()
    assert h.server is not None
    h.server.router.artifact_id = "sha-of-test-artifact"
    yield h
    h.stop()


def client(h: Harness) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0)


def records(h: Harness, path: Path) -> list[dict[str, Any]]:
    assert h.server is not None
    log = h.server.router.decision_log
    assert log is not None
    assert log.flush()
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(h: Harness, path: Path, rid: str) -> list[dict[str, Any]]:
    return [r for r in records(h, path) if r["request_id"] == rid]


@dataclass
class Reply:
    status_code: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    h: Harness, method: str, path: str, body: bytes | None = None, headers: dict[str, bytes] | None = None
) -> Reply:
    """A raw HTTP call (header values as bytes, so a test can send what a client library would refuse)."""
    assert h.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", h.server.http_port, timeout=30)
    try:
        conn.putrequest(method, path)
        for k, v in {"Content-Type": b"application/json", **(headers or {})}.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body)
        r = conn.getresponse()
        return Reply(r.status, r.headers, r.read())
    finally:
        conn.close()


def feedback(h: Harness, body: object) -> Reply:
    return call(h, "POST", "/v1/feedback", json.dumps(body).encode())


# --- request ids ---------------------------------------------------------------------------------------------


def test_every_response_carries_a_request_id_and_a_sane_client_id_is_kept(harness: Harness) -> None:
    c = client(harness)
    raw = c.chat.completions.with_raw_response.create(model="tiergate", messages=[{"role": "user", "content": "hi"}])
    rid = raw.headers["x-request-id"]
    assert len(rid) == 32
    assert int(rid, 16) >= 0
    again = c.chat.completions.with_raw_response.create(model="tiergate", messages=[{"role": "user", "content": "hi"}])
    assert again.headers["x-request-id"] != rid

    mine = "trace-0af7651916cd43dd8448eb211c80319c"
    raw = c.chat.completions.with_raw_response.create(
        model="tiergate", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-request-id": mine}
    )
    assert raw.headers["x-request-id"] == mine

    # Errors carry one too: an unknown model (404), and aiohttp's own 405.
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert len(err.value.response.headers["x-request-id"]) == 32
    assert len(call(harness, "GET", "/v1/chat/completions").headers["x-request-id"]) == 32
    assert len(call(harness, "GET", "/health").headers["x-request-id"]) == 32


@pytest.mark.parametrize("sent", ["x" * 129, "has space", "tab\there", "ünïcode", ""])
def test_an_insane_client_id_is_replaced(harness: Harness, sent: str) -> None:
    body = json.dumps({"model": "tiergate", "messages": [{"role": "user", "content": "hi"}]}).encode()
    r = call(harness, "POST", "/v1/chat/completions", body, {"x-request-id": sent.encode()})
    assert r.status_code == 200
    got = r.headers["x-request-id"]
    assert got != sent
    assert len(got) == 32


def test_a_streamed_answer_carries_the_id_and_is_logged_when_it_ends(harness: Harness, log_path: Path) -> None:
    c = client(harness)
    with c.chat.completions.with_streaming_response.create(
        model="tiergate",
        messages=[{"role": "user", "content": "HARD: stream me"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=3,
    ) as resp:
        rid = resp.headers["x-request-id"]
        chunks = list(resp.parse())
    assert chunks[-1].usage is not None
    # The client has the last byte before the handler has finished: wait for the record rather than race it.
    (rec,) = wait_for("the stream's decision record", lambda: by_id(harness, log_path, rid))
    assert rec["tier"] == "large"
    assert rec["outcome"] == "success"
    assert rec["tokens"]["completion"] == 3
    assert rec["cost_usd"] > 0


# --- the decision log ----------------------------------------------------------------------------------------


def test_one_decision_record_per_request_with_the_schema(harness: Harness, log_path: Path) -> None:
    c = client(harness)
    prompt = "What is 2+2?"
    raw = c.chat.completions.with_raw_response.create(
        model="tiergate", messages=[{"role": "user", "content": prompt}], user="alice-1"
    )
    answer = raw.parse()
    rid = raw.headers["x-request-id"]
    (rec,) = by_id(harness, log_path, rid)
    assert rec["kind"] == "decision"
    assert rec["ts"].endswith("Z")
    assert "T" in rec["ts"]
    assert rec["user"] == "alice-1"
    assert "tenant" not in rec
    assert rec["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
    assert "prompt" not in rec  # not allowed by this router's settings
    assert rec["score"] == pytest.approx(0.1)
    assert rec["decision"] == "small"
    assert rec["tier"] == "small"
    assert rec["samples"] == 1
    assert rec["fallbacks"] == []
    assert rec["artifact"] == "sha-of-test-artifact"
    assert rec["outcome"] == "success"
    assert rec["latency_ms"] > 0
    assert answer.usage is not None
    assert rec["tokens"] == {"prompt": answer.usage.prompt_tokens, "completion": answer.usage.completion_tokens}
    assert rec["cost_usd"] == pytest.approx(
        (answer.usage.prompt_tokens * 1.0 + answer.usage.completion_tokens * 2.0) / 1e6
    )

    forced = c.completions.with_raw_response.create(model="large", prompt="hello", max_tokens=2)
    (rec,) = by_id(harness, log_path, forced.headers["x-request-id"])
    assert rec["score"] is None
    assert rec["decision"] == "forced"
    assert rec["artifact"] == ""


def test_a_failed_tier_is_logged_as_a_fallback(harness: Harness, log_path: Path) -> None:
    for f in harness.fakes["small"]:
        f.behaviour.fail_status = 503
    try:
        raw = client(harness).chat.completions.with_raw_response.create(
            model="tiergate", messages=[{"role": "user", "content": "easy one"}]
        )
    finally:
        for f in harness.fakes["small"]:
            f.behaviour.fail_status = None
    (rec,) = by_id(harness, log_path, raw.headers["x-request-id"])
    assert rec["decision"] == "small"
    assert rec["tier"] == "large"
    assert rec["fallbacks"] == ["small"]


def test_grpc_calls_carry_the_id_in_initial_metadata_and_are_logged(harness: Harness, log_path: Path) -> None:
    with grpc.insecure_channel(harness.grpc_target) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        reply, call = stub.Generate.with_call(router_pb2.GenerateRequest(prompt="HARD grpc", max_tokens=2))
        rid = dict(call.initial_metadata())["x-request-id"]
        (rec,) = by_id(harness, log_path, rid)
        assert rec["tier"] == reply.tier == "large"
        assert rec["tokens"]["completion"] == 2

        stream = stub.GenerateStream(
            router_pb2.GenerateRequest(prompt="easy grpc", max_tokens=2), metadata=(("x-request-id", "grpc-mine"),)
        )
        assert len(list(stream)) >= 2
        assert dict(stream.initial_metadata())["x-request-id"] == "grpc-mine"
        (rec,) = by_id(harness, log_path, "grpc-mine")
        assert rec["tier"] == "small"
        assert rec["outcome"] == "success"

        # An aborted call still has it.
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(router_pb2.GenerateRequest(prompt="x", tier="nope"))
        assert len(dict(err.value.initial_metadata())["x-request-id"]) == 32


def test_drops_feed_the_metric(harness: Harness) -> None:
    assert harness.server is not None
    log = harness.server.router.decision_log
    assert log is not None
    assert log.on_drop is not None
    before = harness.metric("tiergate_router_decision_log_dropped_total")
    log.on_drop()
    assert harness.metric("tiergate_router_decision_log_dropped_total") == before + 1


def test_prompts_are_written_only_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "with-prompts.jsonl"
    h = Harness(grpc=False, config_overrides={"decision_log": str(path), "decision_log_prompts": True}).start()
    try:
        raw = client(h).chat.completions.with_raw_response.create(
            model="tiergate", messages=[{"role": "user", "content": "secret recipe"}]
        )
        (rec,) = by_id(h, path, raw.headers["x-request-id"])
        assert rec["prompt"] == "secret recipe"
    finally:
        h.stop()


# --- feedback ------------------------------------------------------------------------------------------------


def test_feedback_is_recorded_once_and_refused_clearly(harness: Harness, log_path: Path) -> None:
    raw = client(harness).chat.completions.with_raw_response.create(
        model="tiergate", messages=[{"role": "user", "content": "rate me"}]
    )
    rid = raw.headers["x-request-id"]
    before = harness.metric("tiergate_router_feedback_total", {"source": "explicit"})

    # The official client's generic POST (`client.post`), as a script using the SDK would send it.
    got = client(harness).post("/feedback", body={"request_id": rid, "rating": 0.5}, cast_to=object)
    assert got == {"object": "feedback", "request_id": rid, "rating": 0.5}

    dup = feedback(harness, {"request_id": rid, "rating": -1})
    assert len(dup.headers["x-request-id"]) == 32
    assert dup.status_code == 409
    assert dup.json()["error"]["code"] == "feedback_exists"
    unknown = feedback(harness, {"request_id": "never-seen", "rating": 1})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "request_id"

    for body, param in (
        ({"request_id": rid, "rating": 1.5}, "rating"),
        ({"request_id": rid, "rating": -1.01}, "rating"),
        ({"request_id": rid, "rating": "good"}, "rating"),
        ({"request_id": rid, "rating": True}, "rating"),
        ({"request_id": rid}, "rating"),
        ({"rating": 1}, "request_id"),
        ({"request_id": 7, "rating": 1}, "request_id"),
        ({"request_id": rid, "rating": 1, "comment": "x"}, "comment"),
    ):
        r = feedback(harness, body)
        assert r.status_code == 400, body
        assert r.json()["error"]["param"] == param, body
    assert call(harness, "POST", "/v1/feedback", b"{not json").status_code == 400

    fb = [r for r in by_id(harness, log_path, rid) if r["kind"] == "feedback"]
    assert len(fb) == 1
    assert fb[0]["rating"] == 0.5
    assert fb[0]["source"] == "explicit"
    assert fb[0]["ts"].endswith("Z")
    assert harness.metric("tiergate_router_feedback_total", {"source": "explicit"}) == before + 1


def test_the_same_user_re_asking_counts_against_the_earlier_answer(harness: Harness, log_path: Path) -> None:
    c = client(harness)

    def ask(text: str, user: str | None) -> str:
        kw: dict[str, Any] = {"user": user} if user is not None else {}
        raw = c.chat.completions.with_raw_response.create(
            model="tiergate", messages=[{"role": "user", "content": text}], **kw
        )
        return raw.headers["x-request-id"]

    first = ask("How do I sort a list in Python?", "bob")
    other_user = ask("How do I sort a list in Python?", "carol")
    again = ask("how do I sort a list in python", "bob")  # the same after normalisation
    anonymous = [ask("an anonymous question", None), ask("an anonymous question", None)]

    fb = [r for r in records(harness, log_path) if r["kind"] == "feedback" and r["source"] == "requery"]
    assert [(r["request_id"], r["rating"]) for r in fb if r["request_id"] in {first, other_user, again}] == [
        (first, -1.0)
    ]
    assert not [r for r in fb if r["request_id"] in anonymous]
    # Explicit feedback on the re-asked request is still taken (a different source).
    assert feedback(harness, {"request_id": first, "rating": -0.5}).status_code == 200


def test_with_tenants_feedback_needs_a_key_and_rates_only_the_tenants_own(tmp_path: Path) -> None:
    from tiergate_router.tenants import Tenancy, TenantConfig

    keys = {"acme": "key-acme-0123456789", "other": "key-other-0123456789"}
    for name, key in keys.items():
        (tmp_path / name).write_text(key + "\n")
    tenancy = Tenancy(
        tenants=(TenantConfig("acme"), TenantConfig("other")), allow_unauthenticated=False, keys_dir=tmp_path
    )
    path = tmp_path / "log.jsonl"
    h = Harness(grpc=False, config_overrides={"tenancy": tenancy, "decision_log": str(path)}).start()
    try:
        c = openai.OpenAI(base_url=f"{h.url}/v1", api_key=keys["acme"], max_retries=0)
        raw = c.chat.completions.with_raw_response.create(model="tiergate", messages=[{"role": "user", "content": "q"}])
        rid = raw.headers["x-request-id"]
        (rec,) = by_id(h, path, rid)
        assert rec["tenant"] == "acme"
        body = json.dumps({"request_id": rid, "rating": 1}).encode()

        def bearer(name: str) -> dict[str, bytes]:
            return {"Authorization": f"Bearer {keys[name]}".encode()}

        assert call(h, "POST", "/v1/feedback", body).status_code == 401
        assert call(h, "POST", "/v1/feedback", body, bearer("other")).status_code == 404
        assert call(h, "POST", "/v1/feedback", body, bearer("acme")).status_code == 200
        # Through the official client too (its generic POST): a duplicate is a 409 ConflictError.
        with pytest.raises(openai.ConflictError):
            c.post("/feedback", body={"request_id": rid, "rating": 0}, cast_to=object)
    finally:
        h.stop()
