"""The gRPC API (tiergate.v1.RouterService) over a real grpc.aio server, plus grpc.health.v1 and reflection."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.support.harness import Harness
from tests.support.waiting import wait_for
from tiergate_router._proto import router_pb2, router_pb2_grpc


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness().start()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def stub(harness: Harness) -> Iterator[router_pb2_grpc.RouterServiceStub]:
    with grpc.insecure_channel(harness.grpc_target) as ch:
        yield router_pb2_grpc.RouterServiceStub(ch)


def test_classify(stub: router_pb2_grpc.RouterServiceStub) -> None:
    easy = stub.Classify(router_pb2.ClassifyRequest(prompt="what is 2+2"))
    assert easy.tier == "small"
    assert easy.score == pytest.approx(0.1)
    assert easy.threshold_bp == 5000
    hard = stub.Classify(router_pb2.ClassifyRequest(messages=[router_pb2.ChatMessage(role="user", content="HARD")]))
    assert hard.tier == "large"
    assert hard.score == 1.0


def test_generate_unary(stub: router_pb2_grpc.RouterServiceStub, harness: Harness) -> None:
    r = stub.Generate(router_pb2.GenerateRequest(prompt="HARD one", max_tokens=4))
    assert r.tier == "large"
    assert r.text.split() == [f"large{r.text[5]}-tok{i}" for i in range(4)]
    assert r.usage.completion_tokens == 4
    assert r.model == "large-model"
    assert not r.fallback
    forced = stub.Generate(router_pb2.GenerateRequest(prompt="HARD", tier="small"))
    assert forced.tier == "small"


def test_generate_stream(stub: router_pb2_grpc.RouterServiceStub) -> None:
    chunks = list(stub.GenerateStream(router_pb2.GenerateRequest(prompt="easy", max_tokens=5)))
    text = "".join(c.delta for c in chunks)
    assert len(text.split()) == 5
    assert all(c.tier == "small" for c in chunks)
    assert chunks[-1].usage.completion_tokens == 5
    assert any(c.finish_reason == "length" for c in chunks)


@pytest.mark.parametrize(
    ("req", "code", "needle"),
    [
        (router_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "exactly one of"),
        (
            router_pb2.GenerateRequest(prompt="x", messages=[router_pb2.ChatMessage(role="user", content="y")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "exactly one of",
        ),
        (
            router_pb2.GenerateRequest(messages=[router_pb2.ChatMessage(role="wizard", content="y")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "role",
        ),
        (router_pb2.GenerateRequest(prompt="x", tier="nope"), grpc.StatusCode.NOT_FOUND, "does not exist"),
        (router_pb2.GenerateRequest(prompt="x" * 10_000_000), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ],
)
def test_bad_generate_requests(
    harness: Harness, req: router_pb2.GenerateRequest, code: grpc.StatusCode, needle: str
) -> None:
    opts = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(harness.grpc_target, options=opts) as ch:
        s = router_pb2_grpc.RouterServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            s.Generate(req)
        assert e.value.code() == code
        assert needle in (e.value.details() or "")
        with pytest.raises(grpc.RpcError) as e2:
            list(s.GenerateStream(req))
        assert e2.value.code() == code


def test_health_and_reflection(harness: Harness) -> None:
    with grpc.insecure_channel(harness.grpc_target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert (
            h.Check(health_pb2.HealthCheckRequest(service="tiergate.v1.RouterService")).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"tiergate.v1.RouterService", "grpc.health.v1.Health"} <= services
        fd = db.FindFileContainingSymbol("tiergate.v1.RouterService")
        assert fd.name == "tiergate/v1/router.proto"


def test_graceful_shutdown_turns_health_not_serving_and_finishes_in_flight() -> None:
    # A long grace: the stop waits for the call in flight, which the test releases only once the stop has begun.
    h = Harness(tiers=(("small", 1), ("large", 1)), grace_s=60.0).start()
    hold = asyncio.Event()
    small = h.fakes["small"][0]
    small.behaviour.hold = hold
    results: list[str] = []
    stopper = threading.Thread(target=h.stop)
    try:
        with grpc.insecure_channel(h.grpc_target) as ch:
            s = router_pb2_grpc.RouterServiceStub(ch)

            def call() -> None:
                results.append(s.Generate(router_pb2.GenerateRequest(prompt="slow"), timeout=120).tier)

            caller = threading.Thread(target=call)
            caller.start()
            wait_for("the call to be generating on the small tier", lambda: small.stats.running == 1, interval=0.02)
            health = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service="tiergate.v1.RouterService"), timeout=120
            )
            assert next(health).status == health_pb2.HealthCheckResponse.SERVING
            stopper.start()
            # The first thing a stop does, so that load balancers move traffic away before the listener closes.
            assert next(health).status == health_pb2.HealthCheckResponse.NOT_SERVING
            health.cancel()  # a watch is a call in flight too: the stop would wait for it

            def refused() -> bool:
                with grpc.insecure_channel(h.grpc_target) as probe:
                    try:
                        stub = router_pb2_grpc.RouterServiceStub(probe)
                        stub.Classify(router_pb2.ClassifyRequest(prompt="x"), timeout=5)
                    except grpc.RpcError as e:
                        return e.code() == grpc.StatusCode.UNAVAILABLE
                return False

            wait_for("the stopping server to refuse new calls", refused, interval=0.05)
            h.thread.loop.call_soon_threadsafe(hold.set)  # only now may the call in flight finish
            caller.join(120)
            stopper.join(120)
    finally:
        if stopper.ident is None:  # failed before the stop began: release the call, stop here
            h.thread.loop.call_soon_threadsafe(hold.set)
            h.stop()
    assert not caller.is_alive()
    assert not stopper.is_alive()
    assert results == ["small"]
    assert small.stats.completed == 1


def test_undecodable_request_is_invalid_argument(harness: Harness) -> None:
    with grpc.insecure_channel(harness.grpc_target) as ch:
        call = ch.unary_unary(
            "/tiergate.v1.RouterService/Generate", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as e:
            call(b"\x00", timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cannot decode GenerateRequest" in (e.value.details() or "")
