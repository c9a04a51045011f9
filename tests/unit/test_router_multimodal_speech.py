"""A real speech model as the speech tier: an audio + text request through the official `openai` client is
decomposed, PocketSphinx (tests/support/speech_server.py, offline on this CPU) transcribes the audio, and the text
tier answers with the transcript inlined. The transcript's wording is the model's and is never asserted: only that
a non-empty one came back from the speech tier and reached the text tier, and that the header names both tiers."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.harness import Harness, LoopThread
from tests.support.speech_server import SpeechServer
from tiergate_router.modality import DECOMPOSE, AttachmentPolicy

SPEECH_WAV = Path(__file__).resolve().parents[1] / "support" / "data" / "speech-16k.wav"
TRANSCRIPT_PREFIX = "[audio 1, transcript by the speech tier: "


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Harness, SpeechServer]]:
    loop = LoopThread()
    speech = SpeechServer()
    loop.call(speech.start())
    h = Harness(
        (("small", 1), ("speech", 0)),
        grpc=False,
        external={"speech": [speech.base_url]},
        modalities={"speech": frozenset({"text", "audio"})},
    ).start()
    try:
        yield h, speech
    finally:
        h.stop()
        loop.call(speech.stop())
        loop.close()


def audio_request(text: str) -> list[Any]:
    data = base64.b64encode(SPEECH_WAV.read_bytes()).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
            ],
        }
    ]


def test_real_speech_model_transcribes_for_the_text_tier(setup: tuple[Harness, SpeechServer]) -> None:
    h, speech = setup
    assert h.server is not None
    router = h.server.router
    cfg = dataclasses.replace(router.config, attachments=AttachmentPolicy(mixed_requests=DECOMPOSE))
    h.call(_apply(router, cfg))
    c = openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0, timeout=120)
    raw = c.chat.completions.with_raw_response.create(model="tiergate", messages=audio_request("What was said?"))
    assert raw.headers["x-tiergate-tier"] == "small"
    assert raw.headers["x-tiergate-tiers"] == "small,speech"
    # The speech tier got the audio as the client sent it.
    [to_speech] = speech.requests
    assert [p["type"] for p in to_speech["messages"][0]["content"]] == ["text", "input_audio"]
    # The text tier got a non-empty transcript in its place, and no audio.
    [to_small] = h.fakes["small"][0].stats.requests
    parts = to_small["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "text"]
    inlined = parts[1]["text"]
    assert inlined.startswith(TRANSCRIPT_PREFIX)
    assert inlined.endswith("]")
    assert inlined[len(TRANSCRIPT_PREFIX) : -1].strip()
    assert (
        h.metric(
            "tiergate_router_decomposition_steps_total", {"modality": "audio", "tier": "speech", "outcome": "success"}
        )
        == 1
    )


async def _apply(router: Any, cfg: Any) -> None:
    router.apply_config(cfg)
