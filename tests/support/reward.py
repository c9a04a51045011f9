"""Reward-model doubles for the tests: a tiny random reward model built in-process, `tiergate reward-server` in a
subprocess, and a scripted in-process pooling server that misbehaves on demand (garbage, holding, dropping).

`tiny_reward_model(dir)` is a `LlamaForSequenceClassification` (num_labels 1, hidden 128, 2 layers, 2 heads of
64: vLLM's CPU attention refuses a head size of 16, so the same folder also serves under real vLLM) with a
byte-level BPE tokenizer trained by `tokenizers` on a few sentences and a plain chat template. Random weights,
seeded: its scores mean nothing, but they are a deterministic function of the text that tests can recompute with
transformers directly.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tiergate_router.openai_server import HTTPServer, error_response, models_body

ROOT = Path(__file__).resolve().parents[2]

# The tokenizer's training text: enough byte pairs for a few hundred merges, so texts tokenise to fewer tokens
# than bytes (the model's context is small on purpose).
_CORPUS = [
    "User: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "User: Count from 1 to 5.\n\nAssistant: 1, 2, 3, 4, 5.",
    "The quick brown fox jumps over the lazy dog. A reward model scores answers to prompts.",
    "Best-of-n sampling draws several answers and keeps the one the reward model likes best.",
] * 4
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
MAX_POSITIONS = 1024


def tiny_reward_model(directory: Path) -> Path:
    """Write the tiny reward model and its tokenizer into `directory`/tiny-reward (built once; ~0.5 s) and return
    that folder, loadable by `AutoModelForSequenceClassification`, `tiergate reward-server --model` and vLLM."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    out = directory / "tiny-reward"
    if (out / "config.json").exists():
        return out
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        _CORPUS,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    # transformers' tokenizer and model constructors are untyped (its kwargs flow through **kwargs).
    tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=raw,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        model_max_length=MAX_POSITIONS,
    )
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    shape: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForSequenceClassification(LlamaConfig(**shape))  # type: ignore[no-untyped-call]
    # The default init (std 0.02) gives every text nearly the same logit; a wider score head spreads them, so a
    # test that compares orders or picks a best answer sees clear differences.
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def direct_scores(model_dir: Path, texts: list[str]) -> list[float]:
    """The reference: each text's logit from transformers, one text at a time (no padding), with the tokenizer's
    special tokens, as the reward server's batch form scores them."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return [float(model(**tok(t, return_tensors="pt")).logits[0, 0]) for t in texts]


# -- `tiergate reward-server` in a subprocess ----------------------------------------------------------------------


@dataclass
class RewardServerProcess:
    proc: subprocess.Popen[str]
    url: str  # the server root, what RewardClient takes
    banner: str  # what it printed before it was ready


@contextmanager
def reward_server(*args: str) -> Iterator[RewardServerProcess]:
    """`tiergate reward-server ARGS --host 127.0.0.1 --port 0` as a user runs it; ready once it prints its `READY`
    line (it is listening then), stopped with SIGTERM at the end, which must exit 0."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiergate.cli", "reward-server", *args, "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    banner: list[str] = []
    try:
        for line in proc.stdout:
            if line.startswith("READY "):
                url = line.split()[1].removesuffix("/v1")
                break
            banner.append(line)
        else:
            raise AssertionError(f"tiergate reward-server did not start: {''.join(banner)[-3000:]}")
        yield RewardServerProcess(proc, url, "".join(banner))
    finally:
        if proc.poll() is None:
            proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, f"tiergate reward-server exited {proc.returncode}: {out[-3000:]}"


# -- a scripted pooling server --------------------------------------------------------------------------------------

# What `FakeRewardServer.mode` can be: a correct answer, or one of the ways a reward server goes wrong.
FAKE_MODES = ("ok", "wrong_count", "nan", "not_json", "http_500", "hold", "drop", "huge")


def length_score(text: str) -> float:
    """The fake's default score: longer rendered pairs score higher (easy to predict in a test)."""
    return float(len(text))


@dataclass
class FakeRewardServer:
    """vLLM's `/pooling` (batch `input` form) and `/v1/models` on a loopback port of the running event loop.

    `mode` (FAKE_MODES) scripts the answer: `hold` never answers (until `stop`), `drop` closes the connection,
    `huge` sends the right scores inside a body over the client's size limit.
    `requests` keeps every `/pooling` body.
    """

    model: str = "fake-reward"
    mode: str = "ok"
    score: Callable[[str], float] = length_score
    requests: list[dict[str, Any]] = field(default_factory=list)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _server: HTTPServer | None = None

    async def start(self) -> str:
        """Listen; returns the server root URL."""
        app = web.Application()
        app.router.add_post("/pooling", self._pooling)
        app.router.add_get("/v1/models", self._models)
        self._server = HTTPServer(app, "127.0.0.1", 0, shutdown_timeout=0.1)
        await self._server.start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.port}"

    async def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            await self._server.stop()

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(models_body([self.model], owned_by="vllm"))

    async def _pooling(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if body.get("model") != self.model:
            return error_response(404, f"The model `{body.get('model')}` does not exist.", param="model")
        texts = body["input"]
        scores = [self.score(t) for t in texts]
        if self.mode == "hold":
            await self._released.wait()
        elif self.mode == "drop":
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        elif self.mode == "http_500":
            return error_response(500, "scripted failure", type_="InternalServerError")
        elif self.mode == "not_json":
            return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")
        elif self.mode == "wrong_count":
            scores = scores[:-1]
        elif self.mode == "nan":
            scores[0] = math.nan
        elif self.mode == "huge":  # right scores, then 2 MiB of padding in a field nobody reads
            return web.json_response(
                {"data": [{"index": i, "data": [s]} for i, s in enumerate(scores)], "pad": "x" * 2**21}
            )
        items = [{"index": i, "object": "pooling", "data": [s]} for i, s in enumerate(scores)]
        # json.dumps writes NaN as the bare token NaN (not JSON, but what a careless server sends).
        return web.json_response(
            {"id": "pool-fake", "object": "list", "created": 0, "model": self.model, "data": items, "usage": {}}
        )
