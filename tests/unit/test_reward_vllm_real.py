"""The reward model path against the real vLLM pooling runner (the CPU build, vLLM 0.32), one vLLM start for all:

- vLLM runs the operator's own reward Deployment command line (`builders.build_reward_deployment`: `--runner
  pooling`, `--served-model-name` = the policy's `rewardModel.model`, and the user's args), only the listen address
  moved to loopback, serving the tiny random reward model of `tests.support.reward`;
- the router's reward client (`tiergate_router.reward.RewardClient`) scores through it: one batched call, raw
  logits, truncation of an overlong pair; the chat form goes through the chat template; the default is a sigmoid.
  That is the wire contract `tiergate reward-server` copies.

Slow: the first run builds vLLM's virtual environment (scripts/vllm_cpu_venv.sh, cached under ~/.cache/tiergate);
vLLM takes ~25 s to start with this model on two idle cores. CI runs it (the `slow` marker is not deselected).
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.reward import direct_scores, tiny_reward_model
from tests.support.router_serve import free_port
from tests.support.vllm_real import vllm_server
from tiergate.api.policy import parse_policy
from tiergate_operator import builders
from tiergate_router.reward import RewardClient, render_pair

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"
pytestmark = pytest.mark.slow

# float32 in vLLM and in transformers, but not the same kernels: agreement to about 1e-3 of a logit of a few units.
TOL = 2e-3


@dataclass(frozen=True)
class Served:
    url: str  # the server root, what RewardClient takes
    model: Path  # the model folder
    served: str  # the name the Deployment serves it under


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{url}/pooling", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        reply: dict[str, Any] = json.loads(r.read())
        return reply


@pytest.fixture(scope="module")
def reward_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model = tiny_reward_model(tmp_path_factory.mktemp("reward-model"))
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update(namespace="check", uid="check")
    port = free_port()
    # What a user adds for a small CPU model; the operator's own args come first, unchanged.
    extra = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "1024"]
    doc["spec"]["bestOfN"]["rewardModel"].update(model=str(model), port=port, args=extra)
    (container,) = builders.build_reward_deployment(parse_policy(doc))["spec"]["template"]["spec"]["containers"]
    args = list(container["args"])
    assert args[args.index("--runner") + 1] == "pooling"
    assert args[args.index("--port") + 1] == str(port)
    args[args.index("--host") + 1] = "127.0.0.1"  # the pod listens on all addresses; a test host, on loopback only
    served = args[args.index("--served-model-name") + 1]
    # The image's entry point is `vllm serve`; the CPU build's CLI asks for the distribution `vllm`, which
    # `vllm-cpu` is not, so the server module runs the same arguments (`vllm serve` parses with its arg parser).
    with vllm_server(None, *args, log=tmp_path_factory.mktemp("vllm") / "vllm.log", port=port) as url:
        yield Served(url, model, served)


def test_reward_deployment_args_serve_the_policy_model_name(reward_vllm: Served) -> None:
    assert reward_vllm.served == str(reward_vllm.model), "served under rewardModel.model, the name the router sends"
    models = json.loads(urllib.request.urlopen(f"{reward_vllm.url}/v1/models", timeout=10).read())
    assert [m["id"] for m in models["data"]] == [reward_vllm.served]
    # The pod's readiness probe path.
    urllib.request.urlopen(f"{reward_vllm.url}/health", timeout=10).read()


def test_reward_client_against_vllm_pooling(reward_vllm: Served) -> None:
    url, model = reward_vllm.url, reward_vllm.model
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
    assert len(set(round(s, 4) for s in want)) == 3, "the texts score differently, so order is checked"
    assert got[:3] == pytest.approx(want, abs=TOL)
    assert math.isfinite(got[3])


def test_vllm_chat_form_and_default_sigmoid(reward_vllm: Served) -> None:
    url, model, served = reward_vllm.url, reward_vllm.model, reward_vllm.served
    prompt, answer = "What is the capital of France?", "The capital of France is Paris."
    # The chat form renders through the model's chat template, without extra special tokens.
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(model).apply_chat_template(messages, tokenize=False)
    chat = _post(url, {"model": served, "messages": messages, "use_activation": False})
    assert chat["data"][0]["data"][0] == pytest.approx(direct_scores(model, [rendered])[0], abs=TOL)

    # Without use_activation, vLLM applies a sigmoid to a one-label classifier (the reward server does too).
    text = render_pair(prompt, answer)
    default = _post(url, {"model": served, "input": [text]})
    assert default["data"][0]["data"][0] == pytest.approx(1 / (1 + math.exp(-direct_scores(model, [text])[0])), abs=TOL)
    assert default["object"] == "list"
    assert default["data"][0]["object"] == "pooling"
