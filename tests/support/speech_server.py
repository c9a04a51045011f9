"""A real speech model behind the OpenAI chat protocol: PocketSphinx (CMU's recogniser, whose wheel ships a small
US-English acoustic and language model, so it runs offline on a CPU) transcribing the `input_audio` parts of chat
requests. It stands in for an audio-language model served by vLLM: the same request shape at the network boundary,
a real (if weak) model behind it. Its transcripts are what they are; tests never assert their wording.

Audio: base64 WAV, 16-bit mono (any sample rate: the decoder is told the rate of each file).
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


class SpeechServer(ModelServer):
    def __init__(self, model: str = "pocketsphinx-en-us", *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(model, owned_by="tests")
        self.server = HTTPServer(self.app(), host, port, shutdown_timeout=0.1)
        self.requests: list[dict[str, Any]] = []
        # One decoder per sample rate, made on first use (loading the model takes a second or two); the decoder is
        # not thread-safe, so transcriptions run one at a time in a worker thread, off the event loop.
        self._decoders: dict[int, Any] = {}
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return self.server.base_url

    async def start(self) -> str:
        await self.server.start()
        return self.base_url

    async def stop(self) -> None:
        await self.server.stop()

    def transcribe(self, wav_bytes: bytes) -> str:
        from pocketsphinx import Decoder

        with wave.open(io.BytesIO(wav_bytes)) as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise ValueError("expected 16-bit mono WAV")
            rate, frames = w.getframerate(), w.readframes(w.getnframes())
        with self._lock:
            decoder = self._decoders.get(rate)
            if decoder is None:
                decoder = self._decoders[rate] = Decoder(samprate=rate)
            decoder.start_utt()
            decoder.process_raw(frames, full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp()
        return str(hyp.hypstr) if hyp is not None else ""

    async def generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if not chat or body.get("stream"):
            return error_response(400, "this server transcribes audio in non-streaming chat requests only")
        if body.get("model") != self.model:
            return error_response(404, f"The model `{body.get('model')}` does not exist.")
        clips = [
            part["input_audio"]["data"]
            for m in body.get("messages", [])
            if isinstance(m.get("content"), list)
            for part in m["content"]
            if isinstance(part, dict) and part.get("type") == "input_audio"
        ]
        if not clips:
            return error_response(400, "no input_audio part to transcribe")
        try:
            texts = [await asyncio.to_thread(self.transcribe, base64.b64decode(c, validate=True)) for c in clips]
        except (ValueError, binascii.Error, wave.Error, EOFError) as e:
            return error_response(400, f"unreadable audio: {e}")
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
