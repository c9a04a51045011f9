"""Multimodal requests through the official `openai` client: routing by modality, decomposition to specialist tiers,
the `x-tiergate-tiers` header, attachment limits and URL hosts, specialist failures, metrics.

The tiers are fake vLLM servers on loopback that speak the vision/audio chat protocol at the network boundary
(`tests.support.fake_vllm`, Behaviour.modalities): a part a tier does not take is refused with 400 as vLLM refuses
it, a part it takes is "read" as `<modality>:<digest>` at the start of its answer, so every test can tell which part
reached which tier and what came back to the answering tier.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import Iterator
from typing import Any

import grpc
import openai
import pytest

from tests.support.fake_vllm import attachment_digest
from tests.support.harness import Harness
from tiergate_router._proto import router_pb2, router_pb2_grpc
from tiergate_router.modality import ANNOTATE, DECOMPOSE, FAIL, AttachmentPolicy

TEXT = frozenset({"text"})
VISION = frozenset({"text", "image"})
SPEECH = frozenset({"text", "audio"})

IMAGE_URL = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake image bytes").decode()
AUDIO_DATA = base64.b64encode(b"RIFF fake wav bytes").decode()


def image_part(url: str = IMAGE_URL) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def audio_part(data: str = AUDIO_DATA) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def ask(*parts: dict[str, Any], text: str = "What is in it?") -> list[Any]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


def client(h: Harness) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0)


def user_content(request: dict[str, Any]) -> list[Any]:
    content = request["messages"][-1]["content"]
    assert isinstance(content, list)
    return content


def part_types(request: dict[str, Any]) -> list[str]:
    return [p["type"] for p in user_content(request)]


def clear(h: Harness) -> None:
    for fakes in h.fakes.values():
        for f in fakes:
            f.stats.requests.clear()


def set_attachments(h: Harness, **changes: Any) -> None:
    assert h.server is not None
    router = h.server.router
    policy = dataclasses.replace(AttachmentPolicy(), **changes)
    h.call(_apply(router, dataclasses.replace(router.config, attachments=policy)))


async def _apply(router: Any, cfg: Any) -> None:
    router.apply_config(cfg)


# --- routing among the tiers that accept every modality (RouteToCapableTier, the default) -----------------------


@pytest.fixture(scope="module")
def three() -> Iterator[Harness]:
    """small (text), vision (text, image), speech (text, audio), cheapest first."""
    h = Harness(
        (("small", 1), ("vision", 1), ("speech", 1)), grpc=True, modalities={"vision": VISION, "speech": SPEECH}
    ).start()
    yield h
    h.stop()


def test_text_only_request_names_one_tier(three: Harness) -> None:
    set_attachments(three)
    raw = client(three).chat.completions.with_raw_response.create(
        model="tiergate", messages=[{"role": "user", "content": "What is 2+2?"}]
    )
    assert raw.headers["x-tiergate-tier"] == "small"
    assert raw.headers["x-tiergate-tiers"] == "small"
    # Answers no tier gave carry it too, as `none`.
    assert client(three).models.with_raw_response.list().headers["x-tiergate-tiers"] == "none"


def test_image_goes_to_the_vision_tier_as_it_is(three: Harness) -> None:
    set_attachments(three)
    clear(three)
    raw = client(three).chat.completions.with_raw_response.create(model="tiergate", messages=ask(image_part()))
    assert raw.headers["x-tiergate-tier"] == "vision"
    assert raw.headers["x-tiergate-tiers"] == "vision"
    # The decision is the classifier's (small, for this easy text), as with a tenant's tier restriction; the tier
    # is the cheapest one not below it that takes images.
    assert raw.headers["x-tiergate-decision"] == "small"
    content = raw.parse().choices[0].message.content
    assert content is not None
    assert content.startswith(f"image:{attachment_digest(IMAGE_URL)} ")
    [sent] = three.fakes["vision"][0].stats.requests
    assert part_types(sent) == ["text", "image_url"]
    assert not three.fakes["small"][0].stats.requests


def test_audio_goes_to_the_speech_tier(three: Harness) -> None:
    set_attachments(three)
    clear(three)
    raw = client(three).chat.completions.with_raw_response.create(model="tiergate", messages=ask(audio_part()))
    assert raw.headers["x-tiergate-tiers"] == "speech"
    content = raw.parse().choices[0].message.content
    assert content is not None
    assert content.startswith(f"audio:{attachment_digest(AUDIO_DATA)} ")


def test_image_and_audio_with_no_tier_for_both_are_decomposed(three: Harness) -> None:
    set_attachments(three)
    clear(three)
    before = three.metric(
        "tiergate_router_decomposition_steps_total", {"modality": "image", "tier": "vision", "outcome": "success"}
    )
    raw = client(three).chat.completions.with_raw_response.create(
        model="tiergate", messages=ask(image_part(), audio_part())
    )
    # The classifier chose small for the (easy) text; the parts went to the specialists.
    assert raw.headers["x-tiergate-tier"] == "small"
    assert raw.headers["x-tiergate-tiers"] == "small,vision,speech"
    [sent] = three.fakes["small"][0].stats.requests
    assert part_types(sent) == ["text", "text", "text"]
    inlined = [p["text"] for p in user_content(sent)]
    assert inlined[1].startswith("[image 1, description by the vision tier: ")
    assert f"image:{attachment_digest(IMAGE_URL)}" in inlined[1]
    assert inlined[2].startswith("[audio 1, transcript by the speech tier: ")
    assert f"audio:{attachment_digest(AUDIO_DATA)}" in inlined[2]
    # Each specialist saw its own part only, with the instruction.
    [to_vision] = three.fakes["vision"][0].stats.requests
    assert part_types(to_vision) == ["text", "image_url"]
    assert "Describe this image" in user_content(to_vision)[0]["text"]
    [to_speech] = three.fakes["speech"][0].stats.requests
    assert part_types(to_speech) == ["text", "input_audio"]
    assert "Transcribe" in user_content(to_speech)[0]["text"]
    after = three.metric(
        "tiergate_router_decomposition_steps_total", {"modality": "image", "tier": "vision", "outcome": "success"}
    )
    assert after == before + 1
    assert three.metric("tiergate_router_attachments_total", {"modality": "audio", "handling": "decomposed"}) >= 1


def test_grpc_answers_carry_the_tiers_trailer(three: Harness) -> None:
    with grpc.insecure_channel(three.grpc_target) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        r, call = stub.Generate.with_call(router_pb2.GenerateRequest(prompt="easy"))
    assert r.tier == "small"
    assert dict(call.trailing_metadata() or ())["x-tiergate-tiers"] == "small"


# --- decomposition when the chosen tier cannot take the parts (Decompose) ------------------------------------------


def test_decompose_policy_lets_the_text_choose_and_decomposes_the_image(three: Harness) -> None:
    set_attachments(three, mixed_requests=DECOMPOSE)
    clear(three)
    raw = client(three).chat.completions.with_raw_response.create(model="tiergate", messages=ask(image_part()))
    assert raw.headers["x-tiergate-tier"] == "small"
    assert raw.headers["x-tiergate-tiers"] == "small,vision"
    [sent] = three.fakes["small"][0].stats.requests
    assert f"image:{attachment_digest(IMAGE_URL)}" in user_content(sent)[1]["text"]


def test_decompose_policy_audio_goes_to_the_speech_tier(three: Harness) -> None:
    set_attachments(three, mixed_requests=DECOMPOSE)
    raw = client(three).chat.completions.with_raw_response.create(model="tiergate", messages=ask(audio_part()))
    assert raw.headers["x-tiergate-tiers"] == "small,speech"


def test_decompose_policy_leaves_parts_the_chosen_tier_takes(three: Harness) -> None:
    # HARD: the classifier chooses speech (the strongest), which takes the audio itself; only the image is described.
    set_attachments(three, mixed_requests=DECOMPOSE)
    clear(three)
    raw = client(three).chat.completions.with_raw_response.create(
        model="tiergate", messages=ask(image_part(), audio_part(), text="HARD: compare them")
    )
    assert raw.headers["x-tiergate-tiers"] == "speech,vision"
    [sent] = three.fakes["speech"][0].stats.requests
    assert part_types(sent) == ["text", "text", "input_audio"]


def test_decomposed_streaming_streams_the_final_answer(three: Harness) -> None:
    set_attachments(three, mixed_requests=DECOMPOSE)
    clear(three)
    with client(three).chat.completions.with_streaming_response.create(
        model="tiergate", messages=ask(image_part()), stream=True
    ) as resp:
        assert resp.headers["x-tiergate-tiers"] == "small,vision"
        chunks = list(resp.iter_lines())
    data = [c for c in chunks if c.startswith("data: ") and c != "data: [DONE]"]
    assert len(data) > 2  # token by token, not one block
    assert chunks[-1] == "data: [DONE]" or "data: [DONE]" in chunks
    [sent] = three.fakes["small"][0].stats.requests
    assert sent["stream"] is True
    assert part_types(sent) == ["text", "text"]


def test_a_forced_text_tier_gets_the_image_described(three: Harness) -> None:
    set_attachments(three)
    raw = client(three).chat.completions.with_raw_response.create(model="small", messages=ask(image_part()))
    assert raw.headers["x-tiergate-tiers"] == "small,vision"
    assert raw.headers["x-tiergate-decision"] == "forced"


# --- specialist failures -----------------------------------------------------------------------------------------


def test_failed_specialist_is_annotated_or_fails_naming_the_part(three: Harness) -> None:
    vision = three.fakes["vision"][0]
    vision.behaviour.fail_status = 400
    try:
        set_attachments(three, mixed_requests=DECOMPOSE, on_specialist_failure=ANNOTATE)
        clear(three)
        raw = client(three).chat.completions.with_raw_response.create(model="tiergate", messages=ask(image_part()))
        assert raw.headers["x-tiergate-tiers"] == "small"  # vision contributed nothing
        [sent] = three.fakes["small"][0].stats.requests
        note = user_content(sent)[1]["text"]
        assert note.startswith("[image 1 could not be read: the vision tier sent HTTP 400")

        set_attachments(three, mixed_requests=DECOMPOSE, on_specialist_failure=FAIL)
        with pytest.raises(openai.APIStatusError) as err:
            client(three).chat.completions.create(model="tiergate", messages=ask(image_part()))
        assert err.value.status_code == 502
        assert "'messages[0].content[1]' (image) could not be read" in str(err.value)
        assert err.value.response.headers["x-tiergate-tiers"] == "none"
    finally:
        vision.behaviour.fail_status = None


def test_specialist_that_times_out_within_the_request_deadline(three: Harness) -> None:
    vision = three.fakes["vision"][0]
    hold = asyncio.Event()
    vision.behaviour.hold = hold
    try:
        set_attachments(three, mixed_requests=DECOMPOSE, on_specialist_failure=ANNOTATE)
        clear(three)
        # A 4 s deadline: the specialists get half of it, the answering tier the rest.
        raw = client(three).chat.completions.with_raw_response.create(
            model="tiergate", messages=ask(image_part()), extra_headers={"x-tiergate-timeout-ms": "4000"}
        )
        assert raw.headers["x-tiergate-tiers"] == "small"
        [sent] = three.fakes["small"][0].stats.requests
        assert user_content(sent)[1]["text"].startswith("[image 1 could not be read: no image tier answered within")
        assert (
            three.metric(
                "tiergate_router_decomposition_steps_total", {"modality": "image", "tier": "none", "outcome": "timeout"}
            )
            >= 1
        )

        set_attachments(three, mixed_requests=DECOMPOSE, on_specialist_failure=FAIL)
        with pytest.raises(openai.APIStatusError) as err:
            client(three).chat.completions.create(
                model="tiergate", messages=ask(image_part()), extra_headers={"x-tiergate-timeout-ms": "2000"}
            )
        assert err.value.status_code == 504
        assert "'messages[0].content[1]' (image)" in str(err.value)
    finally:
        vision.behaviour.hold = None
        three.thread.loop.call_soon_threadsafe(hold.set)


# --- refusals: modalities no tier takes, URL hosts, sizes, counts ------------------------------------------------


@pytest.fixture(scope="module")
def text_and_vision() -> Iterator[Harness]:
    h = Harness((("small", 1), ("vision", 1)), grpc=False, modalities={"vision": VISION}).start()
    yield h
    h.stop()


def test_no_tier_for_the_modality_is_400_naming_it(text_and_vision: Harness) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(text_and_vision).chat.completions.create(model="tiergate", messages=ask(audio_part()))
    assert "audio input" in str(err.value)
    assert err.value.code == "unsupported_modality"
    assert err.value.response.headers["x-tiergate-tiers"] == "none"
    assert (
        text_and_vision.metric("tiergate_router_attachments_total", {"modality": "audio", "handling": "refused"}) == 1
    )


def test_url_of_a_host_not_allowed_is_refused_and_never_reaches_a_tier(text_and_vision: Harness) -> None:
    set_attachments(text_and_vision, allowed_hosts=("images.example.com", "*.cdn.example.org"))
    clear(text_and_vision)
    c = client(text_and_vision)
    for url in ("http://169.254.169.254/latest/meta-data", "https://example.com/a.png", "https://cdn.example.org/x"):
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="tiergate", messages=ask(image_part(url)))
        assert err.value.code == "attachment_host_not_allowed"
        host = url.split("/")[2]
        assert repr(host) in str(err.value)
    assert not any(f.stats.requests for fakes in text_and_vision.fakes.values() for f in fakes)
    for url in ("https://images.example.com/cat.png", "https://a.cdn.example.org/dog.png"):
        raw = c.chat.completions.with_raw_response.create(model="tiergate", messages=ask(image_part(url)))
        assert raw.headers["x-tiergate-tiers"] == "vision"
        content = raw.parse().choices[0].message.content
        assert content is not None
        assert content.startswith(f"image:{attachment_digest(url)}")


def test_oversize_attachment_is_413_and_too_many_is_400(text_and_vision: Harness) -> None:
    set_attachments(text_and_vision, max_bytes=1024, max_count=2)
    c = client(text_and_vision)
    big = "data:image/png;base64," + base64.b64encode(b"x" * 2000).decode()
    with pytest.raises(openai.APIStatusError) as err:
        c.chat.completions.create(model="tiergate", messages=ask(image_part(big)))
    assert err.value.status_code == 413
    assert "'messages[0].content[1]' (image) is 2000 bytes" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err2:
        c.chat.completions.create(model="tiergate", messages=ask(image_part(), image_part(), image_part()))
    assert "has 3 image/audio parts; the router accepts at most 2" in str(err2.value)
    raw = c.chat.completions.with_raw_response.create(model="tiergate", messages=ask(image_part(), image_part()))
    assert raw.headers["x-tiergate-tiers"] == "vision"


def test_malformed_parts_are_400_naming_the_field(text_and_vision: Harness) -> None:
    set_attachments(text_and_vision)
    c = client(text_and_vision)
    for part, field in (
        ({"type": "image_url", "image_url": {}}, "messages[0].content[1].image_url.url"),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "messages[0].content[1].image_url.url"),
        ({"type": "image_url", "image_url": {"url": "data:image/png,raw"}}, "messages[0].content[1].image_url.url"),
        ({"type": "input_audio", "input_audio": {"format": "wav"}}, "messages[0].content[1].input_audio.data"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="tiergate", messages=ask(part))
        assert err.value.param == field
