"""Real small models behind the OpenAI chat protocol, as specialist tiers for the multimodal tests. Both run offline
on a CPU from what their wheels ship:

- `SpeechServer`: PocketSphinx (CMU's recogniser; the wheel ships a small US-English model) transcribes the
  `input_audio` parts (base64 WAV, 16-bit mono, any sample rate) of a chat request.
- `OcrServer`: RapidOCR (PP-OCR detection and recognition models in ONNX, shipped in the wheel) reads the text in the
  `image_url` parts (data: URLs) and "describes" the image by it: the one kind of image description a small offline
  model gives.

They stand in for an audio-language or vision-language model served by vLLM: the same request shape at the network
boundary, a real (if weak) model behind it. Their outputs are what they are; tests never assert their wording.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import threading
import wave
from typing import Any

from aiohttp import web

from tiergate_router.openai_server import HTTPServer, ModelServer, completion_body, error_response


class SpecialistServer(ModelServer):
    """One model reading one kind of content part; `read` turns a part's bytes into text."""

    part_type = ""

    def __init__(self, model: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(model, owned_by="tests")
        self.server = HTTPServer(self.app(), host, port, shutdown_timeout=0.1)
        self.requests: list[dict[str, Any]] = []
        # Models load on first use (a second or two) and are not thread-safe: one read at a time, in a worker thread,
        # off the event loop.
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return self.server.base_url

    async def start(self) -> str:
        await self.server.start()
        return self.base_url

    async def stop(self) -> None:
        await self.server.stop()

    def payload(self, part: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def read(self, data: bytes) -> str:
        raise NotImplementedError

    def _read_locked(self, data: bytes) -> str:
        with self._lock:
            return self.read(data)

    async def generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if not chat or body.get("stream"):
            return error_response(400, "this server reads content parts in non-streaming chat requests only")
        if body.get("model") != self.model:
            return error_response(404, f"The model `{body.get('model')}` does not exist.")
        parts = [
            part
            for m in body.get("messages", [])
            if isinstance(m.get("content"), list)
            for part in m["content"]
            if isinstance(part, dict) and part.get("type") == self.part_type
        ]
        if not parts:
            return error_response(400, f"no {self.part_type} part to read")
        try:
            texts = [await asyncio.to_thread(self._read_locked, self.payload(p)) for p in parts]
        except (ValueError, KeyError, TypeError, binascii.Error, wave.Error, EOFError) as e:
            return error_response(400, f"unreadable {self.part_type}: {e}")
        text = " ".join(texts)
        answer = completion_body(
            self.model,
            chat=True,
            text=text,
            finish_reason="stop",
            prompt_tokens=1,
            completion_tokens=max(1, len(text.split())),
        )
        return web.json_response(answer)


class SpeechServer(SpecialistServer):
    part_type = "input_audio"

    def __init__(self, model: str = "pocketsphinx-en-us", **kw: Any) -> None:
        super().__init__(model, **kw)
        # One decoder per sample rate (the decoder is told the rate it reads).
        self._decoders: dict[int, Any] = {}

    def payload(self, part: dict[str, Any]) -> bytes:
        return base64.b64decode(part["input_audio"]["data"], validate=True)

    def read(self, data: bytes) -> str:
        from pocketsphinx import Decoder

        with wave.open(io.BytesIO(data)) as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise ValueError("expected 16-bit mono WAV")
            rate, frames = w.getframerate(), w.readframes(w.getnframes())
        decoder = self._decoders.get(rate)
        if decoder is None:
            decoder = self._decoders[rate] = Decoder(samprate=rate)
        decoder.start_utt()
        decoder.process_raw(frames, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return str(hyp.hypstr) if hyp is not None else ""


class OcrServer(SpecialistServer):
    part_type = "image_url"

    def __init__(self, model: str = "rapidocr-ppocr", **kw: Any) -> None:
        super().__init__(model, **kw)
        self._engine: Any = None

    def payload(self, part: dict[str, Any]) -> bytes:
        url = part["image_url"]["url"]
        head, sep, data = url.partition(",")
        if not head.startswith("data:") or not sep:
            raise ValueError("this server reads data: URLs only")
        return base64.b64decode(data, validate=True)

    def read(self, data: bytes) -> str:
        if self._engine is None:
            from rapidocr_onnxruntime import RapidOCR

            self._engine = RapidOCR()
        found, _ = self._engine(data)
        lines = [str(line[1]) for line in found or []]
        return f"An image showing the text: {' / '.join(lines)}" if lines else "An image without legible text."
