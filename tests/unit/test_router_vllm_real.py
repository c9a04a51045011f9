"""The router in front of a real vLLM: the CPU build of vLLM serving SmolLM2-135M-Instruct as the small tier; and
best-of-N on it (n = 4 samples from vLLM, scored by `tiergate reward-server` with the tiny reward model).

Slow: the first run builds vLLM's own virtual environment (scripts/vllm_cpu_venv.sh, ~4 minutes, cached under
~/.cache/tiergate), and vLLM takes about a minute to start. CI runs it (the `slow` marker is not deselected).
"""

from __future__ import annotations

import dataclasses
import json
import urllib.request
from collections.abc import Iterator

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.support.harness import Harness
from tests.support.reward import RewardServerProcess, reward_server, tiny_reward_model
from tests.support.vllm_real import vllm_server
from tiergate_router.config import BestOfNConfig
from tiergate_router.dispatch import parse_waiting
from tiergate_router.openai_server import HTTPServer
from tiergate_router.reward import parse_scores, render_pair

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tiergate_router.demo.models import ensure_smollm2

    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    args = ("--served-model-name", "smollm2", "--enforce-eager", "--max-model-len", "2048")
    with vllm_server(ensure_smollm2(), *args, log=log) as root:
        yield f"{root}/v1"


def test_router_in_front_of_real_vllm(vllm_url: str) -> None:
    """What the router is responsible for, not what a 135M model says: the same greedy request gives other words on
    another CPU (vLLM's CPU kernels differ by instruction set), so no assertion reads the answer's wording. vLLM's
    `min_tokens` keeps the end-of-sequence token away for a few tokens, so an answer of some length exists by
    construction, whatever the model would have said."""
    h = Harness(tiers=(("small", 0), ("large", 1)), grpc=False, external={"small": [vllm_url]}).start()
    try:
        c = openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0, timeout=300)
        raw = c.chat.completions.with_raw_response.create(
            model="tiergate",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
            extra_body={"min_tokens": 4},
        )
        comp = raw.parse()
        assert raw.headers["x-tiergate-tier"] == "small"
        assert comp.model == "smollm2"  # the router asked vLLM for its served model name
        choice = comp.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content  # an answer came back (its words are the model's business)
        assert choice.finish_reason in ("stop", "length")
        assert comp.usage is not None
        assert 4 <= comp.usage.completion_tokens <= 16  # min_tokens and max_tokens both reached vLLM
        assert comp.usage.prompt_tokens > 0
        assert comp.usage.total_tokens == comp.usage.prompt_tokens + comp.usage.completion_tokens
        assert h.metric("tiergate_router_tokens_total", {"tier": "small", "kind": "completion"}) == (
            comp.usage.completion_tokens
        )

        with c.chat.completions.with_streaming_response.create(
            model="tiergate",
            messages=[{"role": "user", "content": "Count from 1 to 5."}],
            max_tokens=24,
            extra_body={"min_tokens": 8},
            stream=True,
            stream_options={"include_usage": True},
        ) as resp:
            assert resp.headers["x-tiergate-tier"] == "small"
            assert resp.headers["content-type"].startswith("text/event-stream")
            chunks = list(resp.parse())
        assert chunks, "no chunk streamed"
        assert all(ch.object == "chat.completion.chunk" and ch.model == "smollm2" for ch in chunks)
        assert len({ch.id for ch in chunks}) == 1  # one completion, one id
        deltas = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
        assert len(deltas) > 1  # token by token, not one blob (at least 8 tokens were generated)
        finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finals in (["stop"], ["length"])
        usage = chunks[-1].usage
        assert usage is not None
        assert 8 <= usage.completion_tokens <= 24
        assert h.metric("tiergate_router_tokens_total", {"tier": "small", "kind": "completion"}) == (
            comp.usage.completion_tokens + usage.completion_tokens
        )

        # vLLM's own metrics, as the router's saturation check reads them
        root = vllm_url.removesuffix("/v1")
        text = urllib.request.urlopen(f"{root}/metrics").read().decode()
        assert "vllm:num_requests_waiting" in text
        assert "vllm:num_requests_running" in text
        assert parse_waiting(text) == 0

        # vLLM rejecting a request (too long for its 2048-token context) is the client's problem: passed through
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="small", prompt="word " * 5000, max_tokens=4)
    finally:
        h.stop()


_JSON = {"Content-Type": "application/json"}


class RewardTee:
    """Passes `/pooling` through to the real reward server and keeps what went by (the rendered samples and their
    scores), so the test knows which of vLLM's n samples the reward model preferred."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.seen: list[tuple[list[str], list[float]]] = []
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.forward)
        self.server = HTTPServer(app, "127.0.0.1", 0, shutdown_timeout=0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with (
            aiohttp.ClientSession() as s,
            s.request(request.method, f"{self.target}{request.path}", data=body, headers=_JSON) as r,
        ):
            out = await r.read()
            status, ctype = r.status, r.content_type
        if request.path == "/pooling" and status == 200:
            texts = json.loads(body)["input"]
            self.seen.append((texts, parse_scores(json.loads(out), len(texts))))
        return web.Response(body=out, status=status, content_type=ctype)


@pytest.fixture(scope="module")
def tiny_reward(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RewardServerProcess]:
    with reward_server("--model", str(tiny_reward_model(tmp_path_factory.mktemp("reward")))) as s:
        yield s


def test_best_of_n_on_real_vllm_with_the_reward_server(vllm_url: str, tiny_reward: RewardServerProcess) -> None:
    """n = 4 samples in one request to vLLM, scored by `tiergate reward-server` in one batch, the best returned. No
    assertion reads the wording; the samples differ or not as the model pleases (temperature 1), what is checked is
    that the answer is the one the reward model scored highest among what vLLM sent back."""
    h = Harness(tiers=(("small", 0), ("large", 1)), grpc=False, external={"small": [vllm_url]}).start()
    tee = RewardTee(tiny_reward.url)
    try:
        h.call(tee.server.start())
        server = h.server
        assert server is not None
        b = BestOfNConfig("small", 4, tee.url, None, "large", timeout_s=60.0)
        cfg = dataclasses.replace(server.router.config, best_of_n=b)

        async def apply() -> None:
            server.router.apply_config(cfg)

        h.call(apply())
        c = openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0, timeout=300)
        prompt = "Name a colour."
        raw = c.chat.completions.with_raw_response.create(
            model="tiergate",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=12,
            temperature=1.0,
            extra_body={"min_tokens": 2},
        )
        comp = raw.parse()
        assert raw.headers["x-tiergate-tier"] == "small"
        assert raw.headers["x-tiergate-samples"] == "4"  # vLLM honoured n
        assert "x-tiergate-escalation" not in raw.headers
        assert [ch.index for ch in comp.choices] == [0]
        content = comp.choices[0].message.content
        assert content is not None
        [(texts, scores)] = tee.seen  # one batched reward call with every sample
        assert len(texts) == 4
        assert render_pair(prompt, content) == texts[max(range(4), key=lambda i: (scores[i], -i))]
        assert comp.usage is not None
        assert 4 * 2 <= comp.usage.completion_tokens <= 4 * 12  # all four samples counted
    finally:
        h.call(tee.server.stop())
        h.stop()
