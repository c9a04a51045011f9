"""A small OpenAI-compatible server over a local transformers causal LM (the demo's tiers).

Speaks the same API as vLLM's OpenAI server for what the router uses: /v1/models, /v1/chat/completions and
/v1/completions (streaming and not), /health, and /metrics with vLLM's metric names. One generation runs at a
time (two CPU cores: a second one would only halve the speed of both); the others queue and are reported as
`vllm:num_requests_waiting`. A client that disconnects stops its generation at the next token.

    python -m tiergate_router.demo.lm_server --model-dir DIR --served-model-name NAME --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from pathlib import Path
from typing import Any, cast

from aiohttp import web

from tiergate_router.openai_server import (
    CompletionStream,
    HTTPServer,
    ModelServer,
    completion_body,
    error_response,
    serve_until_signalled,
    usage_body,
    wants_usage,
)

# Bounds for a demo on two cores: long answers would take a minute each.
MAX_NEW_TOKENS = 256
DEFAULT_NEW_TOKENS = 64


class LocalLM:
    def __init__(self, model_dir: Path, *, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        # float32 on the CPU: bf16 matmuls are emulated on CPUs without AMX and run several times slower.
        self.model: Any = cast(Any, AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32))
        self.model.eval()

    def encode(self, messages: list[dict[str, str]] | None, prompt: str | None) -> Any:
        if messages is not None:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        return self.tokenizer(prompt or "", return_tensors="pt")

    def generate(
        self, inputs: Any, max_new_tokens: int, temperature: float, cancel: threading.Event, on_text: Any = None
    ) -> tuple[str, int, str]:
        """Generate; `on_text(piece)` is called as text becomes available. Returns (text, tokens, finish)."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return cancel.is_set()

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs: dict[str, Any] = dict(
            inputs,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Cancelled()]),
            pad_token_id=self.tokenizer.eos_token_id,
        )
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False)
        result: dict[str, Any] = {}

        def run() -> None:
            with self._torch.inference_mode():
                result["out"] = self.model.generate(**kwargs)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            if on_text is not None and piece:
                on_text(piece)
        t.join()
        out = result["out"][0][inputs["input_ids"].shape[1] :]
        n = int(out.shape[0])
        finish = "length" if n >= max_new_tokens else "stop"
        return "".join(pieces), n, finish


class LMServer(ModelServer):
    def __init__(self, lm: LocalLM, served_model_name: str) -> None:
        super().__init__(served_model_name, owned_by="tiergate-demo")
        self.lm = lm
        self.lock = asyncio.Lock()

    async def generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return error_response(400, "body must be a JSON object")
        if body.get("model") != self.model:
            return error_response(404, f"The model `{body.get('model')}` does not exist.", type_="NotFoundError")
        messages = body.get("messages") if chat else None
        if chat and not (
            isinstance(messages, list)
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
        ):
            return error_response(400, "messages must be a list of {role, content: str}")
        prompt = body.get("prompt") if not chat else None
        if not chat and not isinstance(prompt, str):
            return error_response(400, "prompt must be a string")
        try:
            max_new = min(int(body.get("max_tokens") or DEFAULT_NEW_TOKENS), MAX_NEW_TOKENS)
            temperature = float(body.get("temperature") or 0.0)
        except (TypeError, ValueError):
            return error_response(400, "max_tokens/temperature must be numbers")
        inputs = self.lm.encode(messages, prompt)
        n_prompt = int(inputs["input_ids"].shape[1])
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        self.load.waiting += 1
        try:
            async with self.lock:
                self.load.waiting -= 1
                self.load.running += 1
                try:
                    if not body.get("stream"):
                        text, n, finish = await loop.run_in_executor(
                            None, self.lm.generate, inputs, max_new, temperature, cancel
                        )
                        self._count(n_prompt, n)
                        return web.json_response(
                            completion_body(
                                self.model,
                                chat=chat,
                                text=text,
                                finish_reason=finish,
                                prompt_tokens=n_prompt,
                                completion_tokens=n,
                            )
                        )
                    return await self._stream(request, body, inputs, max_new, temperature, cancel, chat, n_prompt)
                finally:
                    self.load.running -= 1
        except asyncio.CancelledError:
            cancel.set()  # the client left: stop generating at the next token
            raise

    def _count(self, n_prompt: int, n: int) -> None:
        self.load.prompt_tokens += n_prompt
        self.load.generation_tokens += n

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        inputs: Any,
        max_new: int,
        temperature: float,
        cancel: threading.Event,
        chat: bool,
        n_prompt: int,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        stream = await CompletionStream.open(request, self.model, chat=chat)

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        fut = loop.run_in_executor(None, self.lm.generate, inputs, max_new, temperature, cancel, on_text)
        fut.add_done_callback(lambda _f: loop.call_soon_threadsafe(queue.put_nowait, None))
        try:
            while (piece := await queue.get()) is not None:
                await stream.text(piece)
            _, n, finish = await fut
        except BaseException:
            cancel.set()
            raise
        self._count(n_prompt, n)
        await stream.finish(finish, usage_body(n_prompt, n) if wants_usage(body) else None)
        return stream.response


async def serve(model_dir: Path, name: str, host: str, port: int, threads: int | None) -> None:
    lm = await asyncio.get_running_loop().run_in_executor(None, lambda: LocalLM(model_dir, threads=threads))
    await serve_until_signalled(HTTPServer(LMServer(lm, name).app(), host, port))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="OpenAI-compatible server over a local transformers causal LM")
    p.add_argument("--model-dir", type=Path, default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default="smollm2-135m-instruct")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    model_dir = args.model_dir
    if model_dir is None:
        from tiergate_router.demo.models import ensure_smollm2

        model_dir = ensure_smollm2()
    asyncio.run(serve(model_dir, args.served_model_name, args.host, args.port, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
