"""The router's reward client against the real vLLM pooling runner (the CPU build), serving the tiny random reward
model: what the operator's reward Deployment runs. It pins the wire contract `tiergate reward-server` copies: the
batch form with raw logits and truncation, the chat form through the chat template, and the default sigmoid.

Slow, like tests/unit/test_router_vllm_real.py (same vLLM venv, built on first use): vLLM takes ~25 s to start
with this model on two cores. CI runs it (the `slow` marker is not deselected).
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.reward import direct_scores, tiny_reward_model
from tests.support.vllm_real import vllm_server
from tiergate_router.reward import RewardClient, render_pair

pytestmark = pytest.mark.slow

# float32 in vLLM and in transformers, but not the same kernels: agreement to about 1e-3 of a logit of a few units.
TOL = 2e-3


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{url}/pooling", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        reply: dict[str, Any] = json.loads(r.read())
        return reply


def test_reward_client_against_vllm_pooling(tmp_path: Path) -> None:
    model = tiny_reward_model(tmp_path)
    args = ("--runner", "pooling", "--enforce-eager", "--dtype", "float32", "--max-model-len", "1024")
    with vllm_server(model, *args, "--served-model-name", "tiny-rm", log=tmp_path / "vllm.log") as url:
        prompt = "What is the capital of France?"
        # the last answer is far longer than the model's 1024 positions: truncated, not refused
        answers = ["Paris.", "The capital of France is Paris.", "I like trains.", "word " * 3000]

        async def score() -> list[float]:
            client = RewardClient(url, None)  # the served name looked up through /v1/models
            try:
                return await client.score(prompt, answers, timeout_s=120)
            finally:
                await client.aclose()

        got = asyncio.run(score())
        texts = [render_pair(prompt, a) for a in answers]
        want = direct_scores(model, texts[:3])
        assert got[:3] == pytest.approx(want, abs=TOL)
        assert math.isfinite(got[3])

        # The chat form renders through the model's chat template, without extra special tokens.
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answers[1]}]
        from transformers import AutoTokenizer

        rendered = AutoTokenizer.from_pretrained(model).apply_chat_template(messages, tokenize=False)
        chat = _post(url, {"model": "tiny-rm", "messages": messages, "use_activation": False})
        assert chat["data"][0]["data"][0] == pytest.approx(direct_scores(model, [rendered])[0], abs=TOL)

        # Without use_activation, vLLM applies a sigmoid to a one-label classifier (the reward server does too).
        default = _post(url, {"model": "tiny-rm", "input": [texts[0]]})
        assert default["data"][0]["data"][0] == pytest.approx(1 / (1 + math.exp(-want[0])), abs=TOL)
        assert default["object"] == "list"
        assert default["data"][0]["object"] == "pooling"
