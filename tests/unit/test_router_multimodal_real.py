"""Real small models as the specialist tiers (tests/support/specialist_servers.py, offline on this CPU): with only a
text tier and a vision tier, an image + text request through the official `openai` client is decomposed, RapidOCR
reads the image and the text tier answers with that description inlined; an audio + text request likewise with
PocketSphinx as the speech tier. The models' wording is never asserted: only that a non-empty description or
transcript came back from the specialist and reached the text tier, and that the header names both tiers."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image, ImageDraw, ImageFont

from tests.support.harness import Harness, LoopThread
from tests.support.specialist_servers import OcrServer, SpeechServer
from tiergate_router.modality import DECOMPOSE, AttachmentPolicy

SPEECH_WAV = Path(__file__).resolve().parents[1] / "support" / "data" / "speech-16k.wav"


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Harness, OcrServer, SpeechServer]]:
    """small: a fake text tier; vision and speech: the real models, each taking text and its own modality. The
    default policy (RouteToCapableTier) would send these requests whole to the tier that takes them, so this
    router's policy says Decompose: the real models describe and transcribe, they cannot answer questions."""
    loop = LoopThread()
    ocr, speech = OcrServer(), SpeechServer()
    loop.call(ocr.start())
    loop.call(speech.start())
    h = Harness(
        (("small", 1), ("vision", 0), ("speech", 0)),
        grpc=False,
        external={"vision": [ocr.base_url], "speech": [speech.base_url]},
        modalities={"vision": frozenset({"text", "image"}), "speech": frozenset({"text", "audio"})},
        config_overrides={"attachments": AttachmentPolicy(mixed_requests=DECOMPOSE)},
    ).start()
    try:
        yield h, ocr, speech
    finally:
        h.stop()
        loop.call(ocr.stop())
        loop.call(speech.stop())
        loop.close()


def png_with_text(text: str) -> bytes:
    img = Image.new("RGB", (480, 120), "white")
    ImageDraw.Draw(img).text((20, 30), text, fill="black", font=ImageFont.load_default(size=40))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def ask(part: dict[str, Any]) -> list[Any]:
    return [{"role": "user", "content": [{"type": "text", "text": "What does it say?"}, part]}]


def client(h: Harness) -> openai.OpenAI:
    # The models run on a shared CPU: a read can take tens of seconds there.
    return openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0, timeout=120)


def inlined(h: Harness, prefix: str) -> str:
    """The text part that replaced the attachment in the text tier's request, without its frame."""
    [to_small] = h.fakes["small"][0].stats.requests
    h.fakes["small"][0].stats.requests.clear()
    parts = to_small["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "text"]
    text = str(parts[1]["text"])
    assert text.startswith(prefix)
    assert text.endswith("]")
    return text[len(prefix) : -1]


def test_image_is_described_by_a_real_vision_model(setup: tuple[Harness, OcrServer, SpeechServer]) -> None:
    h, ocr, _ = setup
    url = "data:image/png;base64," + base64.b64encode(png_with_text("INVOICE 4711")).decode()
    raw = client(h).chat.completions.with_raw_response.create(
        model="tiergate", messages=ask({"type": "image_url", "image_url": {"url": url}})
    )
    assert raw.headers["x-tiergate-tier"] == "small"
    assert raw.headers["x-tiergate-tiers"] == "small,vision"
    [to_vision] = ocr.requests
    assert [p["type"] for p in to_vision["messages"][0]["content"]] == ["text", "image_url"]
    assert inlined(h, "[image 1, description by the vision tier: ").strip()


def test_audio_is_transcribed_by_a_real_speech_model(setup: tuple[Harness, OcrServer, SpeechServer]) -> None:
    h, _, speech = setup
    data = base64.b64encode(SPEECH_WAV.read_bytes()).decode()
    raw = client(h).chat.completions.with_raw_response.create(
        model="tiergate", messages=ask({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
    )
    assert raw.headers["x-tiergate-tier"] == "small"
    assert raw.headers["x-tiergate-tiers"] == "small,speech"
    [to_speech] = speech.requests
    assert [p["type"] for p in to_speech["messages"][0]["content"]] == ["text", "input_audio"]
    assert inlined(h, "[audio 1, transcript by the speech tier: ").strip()
    assert (
        h.metric(
            "tiergate_router_decomposition_steps_total", {"modality": "audio", "tier": "speech", "outcome": "success"}
        )
        == 1
    )
