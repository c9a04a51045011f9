"""The reward Deployment's command line, run by the real vLLM (the CPU build, vLLM 0.32): the operator's own args
(`builders.build_reward_deployment`, `--runner pooling` and all), only the listen address moved to loopback, serve a
tiny random reward model built here, and its `/pooling` API scores a batch the way the model itself does.

Slow: the first run builds vLLM's virtual environment (scripts/vllm_cpu_venv.sh, cached under ~/.cache/tiergate);
vLLM takes a minute or more to start on a busy CPU. CI runs it (the `slow` marker is not deselected).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.router_serve import free_port
from tiergate.api.policy import parse_policy
from tiergate_operator import builders

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"
pytestmark = pytest.mark.slow

# A Llama with a one-label classification head, as reward models are (Skywork-Reward, the sample's, is one), small
# enough to start in seconds; SmolLM2's tokenizer, which the demo already keeps on disk. Random weights, fixed seed.
_BUILD_MODEL = """
import sys, torch, transformers
out = sys.argv[1]
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, num_labels=1, pad_token_id=2,
    architectures=["LlamaForSequenceClassification"], torch_dtype="float32")
transformers.LlamaForSequenceClassification(cfg).eval().save_pretrained(out)
"""
# The model's own score for each text: what the reward Deployment must return for it (vLLM's classify pooler takes
# the last token's logit and, for one label, its sigmoid).
_SCORE = """
import json, sys, torch, transformers
m = transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
out = []
for text in json.loads(sys.argv[2]):
    with torch.no_grad():
        out.append(float(torch.sigmoid(m(**tok(text, return_tensors="pt")).logits[0, 0])))
print(json.dumps(out))
"""
TEXTS = [
    "User: What is 2 + 2?\nAssistant: 4",
    "User: What is 2 + 2?\nAssistant: It is five, I think.",
    "User: Name a colour.\nAssistant: Blue.",
]


def _venv() -> Path:
    built = subprocess.run(
        [str(ROOT / "scripts" / "vllm_cpu_venv.sh")], check=True, capture_output=True, text=True, timeout=1800
    )
    return Path(built.stdout.strip().splitlines()[-1])


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def reward_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, str, Path]]:
    """(root URL, the model folder, the served model name, vLLM's python) of vLLM started with the reward
    Deployment's args."""
    from tiergate_router.demo.models import ensure_smollm2

    venv = _venv()
    model = tmp_path_factory.mktemp("reward-model")
    subprocess.run([str(venv / "bin" / "python"), "-c", _BUILD_MODEL, str(model)], check=True, timeout=300)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_smollm2() / name, model / name)

    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update(namespace="check", uid="check")
    port = free_port()
    # What a user adds for a small CPU model; the operator's own args come first, unchanged.
    extra = ["--enforce-eager", "--max-model-len", "512"]
    doc["spec"]["bestOfN"]["rewardModel"].update(model=str(model), port=port, args=extra)
    policy = parse_policy(doc)
    (container,) = builders.build_reward_deployment(policy)["spec"]["template"]["spec"]["containers"]
    args = list(container["args"])
    assert args[args.index("--runner") + 1] == "pooling"
    args[args.index("--host") + 1] = "127.0.0.1"  # the pod listens on all addresses; a test host, on loopback only
    served = args[args.index("--served-model-name") + 1]

    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        # The image's entry point is `vllm serve`; its CLI asks for the distribution `vllm`, which the CPU build's
        # `vllm-cpu` is not, so the server module the test of the tiers runs, which takes the same arguments
        # (`vllm serve` parses with this module's make_arg_parser).
        proc = subprocess.Popen(
            [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                # The path of the pod's readiness probe.
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"vLLM did not start: {log.read_text()[-6000:]}") from None
                time.sleep(1)
        yield url, model, served, venv / "bin" / "python"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _score(item: dict[str, Any]) -> float:
    value = item["data"]
    if isinstance(value, list):
        (value,) = value
    assert isinstance(value, float | int)
    return float(value)


def test_reward_deployment_args_serve_the_pooling_api(reward_server: tuple[str, Path, str, Path]) -> None:
    url, model, served, python = reward_server
    assert served == str(model), "served under the policy's rewardModel.model, the name the router sends"
    models = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=10).read())
    assert [m["id"] for m in models["data"]] == [served]

    # One call scores the whole batch, in order: what the router's reward client sends.
    resp = _post(f"{url}/pooling", {"model": served, "input": TEXTS})
    got = [_score(item) for item in sorted(resp["data"], key=lambda d: d["index"])]
    assert [d["index"] for d in sorted(resp["data"], key=lambda d: d["index"])] == [0, 1, 2]
    assert all(math.isfinite(s) for s in got)

    ran = subprocess.run(
        [str(python), "-c", _SCORE, str(model), json.dumps(TEXTS)], check=True, capture_output=True, text=True
    )
    want = json.loads(ran.stdout.strip().splitlines()[-1])
    assert got == pytest.approx(want, abs=1e-3), (got, want)
    assert len(set(round(s, 6) for s in want)) == len(TEXTS), "the texts score differently, so order is checked"
