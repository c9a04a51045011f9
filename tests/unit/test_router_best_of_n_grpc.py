"""Best-of-N over gRPC (tiergate.v1.RouterService): the same path as HTTP, the samples count as the trailing
metadata `x-tiergate-samples`."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.support.bon_harness import BEST, SAMPLES, BestOfNHarness, N, closed_port_url, words
from tiergate_router._proto import router_pb2, router_pb2_grpc


@pytest.fixture(scope="module")
def bon() -> Iterator[BestOfNHarness]:
    b = BestOfNHarness()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def stub(bon: BestOfNHarness) -> Iterator[router_pb2_grpc.RouterServiceStub]:
    with grpc.insecure_channel(bon.h.grpc_target) as ch:
        yield router_pb2_grpc.RouterServiceStub(ch)


def samples(call: grpc.Call) -> str:
    return str(dict(call.trailing_metadata() or ())["x-tiergate-samples"])


def test_generate_returns_the_best_sample(bon: BestOfNHarness, stub: router_pb2_grpc.RouterServiceStub) -> None:
    bon.configure()
    r, call = stub.Generate.with_call(router_pb2.GenerateRequest(prompt="easy"))
    assert r.tier == "small"
    assert r.text == BEST
    assert r.usage.completion_tokens == words(SAMPLES)
    assert samples(call) == str(N)
    [sent] = bon.small.stats.requests
    assert sent["n"] == N
    assert len(bon.reward.requests) == 1


def test_generate_stream_sends_the_best_sample(bon: BestOfNHarness, stub: router_pb2_grpc.RouterServiceStub) -> None:
    bon.configure()
    call = stub.GenerateStream(router_pb2.GenerateRequest(prompt="easy"))
    chunks = list(call)
    assert "".join(c.delta for c in chunks) == BEST
    assert {c.tier for c in chunks} == {"small"}
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == words(SAMPLES)
    assert samples(call) == str(N)
    assert bon.small.stats.requests[0]["stream"] is False


def test_one_sample_elsewhere(bon: BestOfNHarness, stub: router_pb2_grpc.RouterServiceStub) -> None:
    bon.configure()
    r, call = stub.Generate.with_call(router_pb2.GenerateRequest(prompt="HARD"))
    assert r.tier == "large"
    assert samples(call) == "1"
    call = stub.GenerateStream(router_pb2.GenerateRequest(prompt="easy", tier="small"))
    assert list(call)
    assert samples(call) == "1"
    assert bon.reward.requests == []


def test_reward_model_down_the_reference_tier_answers(
    bon: BestOfNHarness, stub: router_pb2_grpc.RouterServiceStub
) -> None:
    bon.configure(reward_url=closed_port_url())
    before = bon.metric("tiergate_router_best_of_n_escalations_total", {"reason": "unavailable"})
    r, call = stub.Generate.with_call(router_pb2.GenerateRequest(prompt="easy"))
    assert r.tier == "large"
    assert r.text.startswith("large")
    assert samples(call) == "1"
    chunks = list(stub.GenerateStream(router_pb2.GenerateRequest(prompt="easy")))
    assert "".join(c.delta for c in chunks).startswith("large")
    assert bon.metric("tiergate_router_best_of_n_escalations_total", {"reason": "unavailable"}) == before + 2


def test_errors_carry_the_samples_metadata(bon: BestOfNHarness, stub: router_pb2_grpc.RouterServiceStub) -> None:
    bon.configure()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(router_pb2.GenerateRequest(prompt="x", tier="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(err.value.trailing_metadata() or ())["x-tiergate-samples"] == "0"  # type: ignore[attr-defined]
