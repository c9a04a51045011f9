"""A small OpenAI-compatible server that stands in for one tier pod's model server on the dev cluster.

kwok runs pods without containers, so nothing listens at a tier pod's IP. This server, started inside the pod
network namespace (`ip netns exec NS python -m tiergate.devcluster.pod_server --host POD_IP ...`), answers there
what the router asks of vLLM: `GET /v1/models`, `POST /v1/chat/completions` and `/v1/completions` (plain or
streamed), `/health`, and `/metrics` with vLLM's queue gauges. Its answer names the pod, so whoever reads it sees
which pod served. The standard library only: the dev cluster's package carries no web framework.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ANSWER_PREFIX = "answered by "
# A request asking for more tokens than this is held as if it asked for this many: a stuck client cannot hold a
# server thread for minutes.
MAX_HELD_TOKENS = 4096


def answering_pod(text: str) -> str:
    """The pod named in an answer's text (what `completion` wrote)."""
    if not text.startswith(ANSWER_PREFIX):
        raise ValueError(f"not a pod server's answer: {text[:80]!r}")
    return text[len(ANSWER_PREFIX) :].split(" ", 1)[0]


def completion(model: str, pod: str, chat: bool, prompt_words: int) -> dict[str, Any]:
    text = f"{ANSWER_PREFIX}{pod} ({model})"
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {
        "id": f"cmpl-{time.monotonic_ns()}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_words,
            "completion_tokens": len(text.split()),
            "total_tokens": prompt_words + len(text.split()),
        },
    }


def make_handler(model: str, pod: str, seconds_per_token: float = 0.0) -> type[BaseHTTPRequestHandler]:
    """`seconds_per_token`: each answer is held `max_tokens` times this long, as a model generating that many tokens
    would be: requests asking for long answers stay in flight, and the router's demand for the tier shows them."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:  # one line per request would drown the demo's output
            return

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                card = {"id": model, "object": "model", "owned_by": "tiergate-devcluster", "root": model}
                self._send(200, json.dumps({"object": "list", "data": [card]}).encode())
            elif self.path == "/health":
                self._send(200, b"")
            elif self.path == "/metrics":
                text = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n"
                self._send(200, text.encode(), "text/plain; version=0.0.4")
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self) -> None:
            chat = self.path == "/v1/chat/completions"
            if not chat and self.path != "/v1/completions":
                self._send(404, b'{"error": "not found"}')
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            except ValueError:
                self._send(400, b'{"error": "invalid JSON"}')
                return
            if not isinstance(body, dict) or body.get("model") != model:
                self._send(404, json.dumps({"error": f"model {body.get('model')!r} is not served here"}).encode())
                return
            if seconds_per_token > 0:
                tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
                time.sleep(seconds_per_token * min(int(tokens), MAX_HELD_TOKENS))
            prompt = json.dumps(body.get("messages") or body.get("prompt") or "")
            answer = completion(model, pod, chat, max(1, len(prompt.split())))
            if not body.get("stream"):
                self._send(200, json.dumps(answer).encode())
                return
            choice = answer["choices"][0]
            delta = {"index": 0, "delta": {"content": choice["message"]["content"]}} if chat else choice
            chunk = {**answer, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [delta]}
            events = [f"data: {json.dumps(chunk)}\n\n", "data: [DONE]\n\n"]
            payload = "".join(events).encode()
            self._send(200, payload, "text/event-stream")

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="OpenAI-compatible stand-in for a tier pod's model server")
    p.add_argument("--host", required=True, help="the pod's IP (inside the pod network namespace)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", required=True, help="the served model name the router asks for")
    p.add_argument("--pod", required=True, help="the pod's name, put into every answer")
    p.add_argument(
        "--seconds-per-token", type=float, default=0.0, help="hold each answer max_tokens times this long (default 0)"
    )
    args = p.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.model, args.pod, args.seconds_per_token))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"READY http://{args.host}:{args.port}/v1", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
