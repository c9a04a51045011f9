"""`tiergate reward-server` as users start it (a subprocess), with the tiny random reward model: vLLM's pooling API
in both forms, scores equal to the model's logits computed directly with transformers, bad input refused with an
OpenAI-style error naming the field, and the router's reward client against it."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.reward import RewardServerProcess, direct_scores, reward_server, tiny_reward_model
from tiergate_router.reward import RewardClient, render_pair
from tiergate_router.reward_server import (
    MAX_BODY_BYTES,
    StandInScorer,
    TokenLimit,
    UnscorableInputError,
    cut_tokens,
    lexical_relevance,
    render_messages,
    split_pair,
)

PROMPT = "What is the capital of France?"
ANSWERS = ["Paris.", "The capital of France is Paris.", "I like trains.", ""]
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_reward_model(tmp_path_factory.mktemp("reward"))


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[RewardServerProcess]:
    # batch size 2: the 4 answers go through two padded batches, so padding must not change a score
    with reward_server("--model", str(model_dir), "--served-model-name", "tiny-rm", "--batch-size", "2") as s:
        yield s


def _post(url: str, body: object) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"{url}/pooling", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _scores(reply: dict[str, Any]) -> list[float]:
    return [item["data"][0] for item in sorted(reply["data"], key=lambda d: d["index"])]


def test_batch_form_scores_are_the_models_logits(server: RewardServerProcess, model_dir: Path) -> None:
    texts = [render_pair(PROMPT, a) for a in ANSWERS]
    status, reply = _post(server.url, {"model": "tiny-rm", "input": texts, "use_activation": False})
    assert status == 200, reply
    want = direct_scores(model_dir, texts)
    assert len(set(want)) == len(want)  # the model tells these texts apart, so the order below means something
    assert _scores(reply) == pytest.approx(want, abs=TOL)
    assert reply["object"] == "list"
    assert reply["model"] == "tiny-rm"
    assert [d["index"] for d in reply["data"]] == [0, 1, 2, 3]
    assert all(d["object"] == "pooling" for d in reply["data"])
    assert reply["usage"]["prompt_tokens"] == reply["usage"]["total_tokens"] > len(texts)

    # vLLM's default for a one-label classifier: the sigmoid of the logit
    status, reply = _post(server.url, {"input": texts[0]})  # one string, no model name: both allowed
    assert status == 200
    assert _scores(reply) == pytest.approx([1 / (1 + math.exp(-want[0]))], abs=TOL)


def test_chat_form_goes_through_the_chat_template(server: RewardServerProcess, model_dir: Path) -> None:
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWERS[1]}]
    status, reply = _post(server.url, {"model": "tiny-rm", "messages": messages, "use_activation": False})
    assert status == 200, reply
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(messages, tokenize=False)
    assert rendered.startswith("<|user|>")  # the tiny model's own template, not the batch form's rendering
    assert _scores(reply) == pytest.approx(direct_scores(model_dir, [rendered]), abs=TOL)
    # OpenAI's list-of-parts content is the same conversation
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    assert _scores(_post(server.url, {"messages": parts, "use_activation": False})[1]) == _scores(reply)


def test_too_long_is_refused_unless_truncation_is_asked_for(server: RewardServerProcess, model_dir: Path) -> None:
    long = "word " * 3000  # far beyond the tiny model's 1024 positions
    status, reply = _post(server.url, {"input": [long]})
    assert status == 400
    assert reply["error"]["param"] == "input"
    assert "context" in reply["error"]["message"]
    status, reply = _post(server.url, {"input": [long], "truncate_prompt_tokens": -1, "use_activation": False})
    assert status == 200
    assert reply["usage"]["prompt_tokens"] == 1024
    status, reply = _post(server.url, {"input": [long], "truncate_prompt_tokens": 8})
    assert status == 200
    assert reply["usage"]["prompt_tokens"] == 8


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "other", "input": ["x"]}, 404, "model"),
        ({"input": []}, 400, "input"),
        ({"input": [1, 2, 3]}, 400, "input"),
        ({"input": ["ok", 7]}, 400, "input"),
        ({"input": [""]}, 400, "input"),
        ({"input": ["x"] * 257}, 400, "input"),
        ({}, 400, "input"),
        ({"input": ["x"], "messages": [{"role": "user", "content": "x"}]}, 400, "input"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user"}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
        ({"input": ["x"], "use_activation": "no"}, 400, "use_activation"),
        ({"input": ["x"], "model": 3}, 400, "model"),
        ({"input": ["x"], "truncate_prompt_tokens": -2}, 400, "truncate_prompt_tokens"),
        ({"input": ["x"], "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
        ({"input": ["x"], "truncate_prompt_tokens": 5000}, 400, "truncate_prompt_tokens"),
        ({"input": ["x"], "truncate_prompt_tokens": True}, 400, "truncate_prompt_tokens"),
        ({"input": ["x"], "truncation_side": "middle"}, 400, "truncation_side"),
        ({"input": ["x"], "encoding_format": "base64"}, 400, "encoding_format"),
        ({"input": ["x"], "task": "embed"}, 400, "task"),
        ({"input": ["x"], "dimensions": 8}, 400, "dimensions"),
        ([1, 2], 400, None),
    ],
)
def test_bad_input_names_the_field(server: RewardServerProcess, body: object, status: int, param: str | None) -> None:
    got, reply = _post(server.url, body)
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["message"]


def test_not_json_is_a_400(server: RewardServerProcess) -> None:
    req = urllib.request.Request(
        f"{server.url}/pooling", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400
    assert "not valid JSON" in json.loads(e.value.read())["error"]["message"]


def test_a_body_over_the_limit_is_413(server: RewardServerProcess) -> None:
    # Just over the limit: the few bytes the server leaves unread fit in the socket buffers, so the client has sent
    # everything when the 413 comes (a body far over it could meet a reset while still sending).
    status, reply = _post(server.url, {"input": ["x" * (MAX_BODY_BYTES + 1)]})
    assert status == 413
    assert reply["error"]["param"] == "input"


def test_models_and_health(server: RewardServerProcess) -> None:
    models = json.loads(urllib.request.urlopen(f"{server.url}/v1/models", timeout=30).read())
    assert [m["id"] for m in models["data"]] == ["tiny-rm"]
    assert models["data"][0]["max_model_len"] == 1024
    assert "stand_in" not in models["data"][0]
    assert "stand-in" not in server.banner.lower().replace("the stand-in scorer", "")
    assert urllib.request.urlopen(f"{server.url}/health", timeout=30).status == 200


def test_router_client_against_the_server(server: RewardServerProcess, model_dir: Path) -> None:
    """The reward client, model name looked up, scores equal to the logits of the rendered pairs."""

    async def score() -> list[float]:
        client = RewardClient(server.url, None)
        try:
            return await client.score(PROMPT, ANSWERS[:3], timeout_s=60)
        finally:
            await client.aclose()

    got = asyncio.run(score())
    assert got == pytest.approx(direct_scores(model_dir, [render_pair(PROMPT, a) for a in ANSWERS[:3]]), abs=TOL)


def test_stand_in_says_so_and_ranks_relevant_answers_first() -> None:
    """Without --model: the stand-in announces itself (start-up and /v1/models) and prefers the on-topic answer.
    MiniLM's similarity of a sentence about Paris to a question about France's capital is far above that of one
    about bananas; an empty answer gets the lowest cosine, -1."""
    with reward_server() as s:
        assert "STAND-IN" in s.banner
        assert "not a reward model" in s.banner
        card = json.loads(urllib.request.urlopen(f"{s.url}/v1/models", timeout=30).read())["data"][0]
        assert card["stand_in"] is True
        assert "not a reward model" in card["description"]

        async def score() -> list[float]:
            client = RewardClient(s.url, None)
            try:
                return await client.score(
                    PROMPT, ["Paris is the capital of France.", "Bananas are a yellow fruit.", ""], timeout_s=60
                )
            finally:
                await client.aclose()

        on_topic, off_topic, empty = asyncio.run(score())
    assert on_topic > off_topic > empty == -1.0


def test_a_bad_model_folder_exits_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "tiergate.cli", "reward-server", "--model", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert r.returncode == 2
    assert "cannot load a sequence-classification model" in r.stderr


# -- the pure parts, without a server ------------------------------------------------------------------------------


def test_stand_in_reads_the_rendered_pair_back() -> None:
    # the last "Assistant:" turn is the answer: a flattened conversation before it belongs to the prompt
    history = "a\n\nAssistant: b\n\nUser: c"
    assert split_pair(render_pair(history, "d\n\ne")) == (history, "d\n\ne")
    assert split_pair("no such form") == ("", "no such form")
    assert render_messages([{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}]) == (
        render_pair("p", "a")
    )


def test_stand_in_without_minilm_scores_word_overlap() -> None:
    scorer = StandInScorer(None)
    assert "word-overlap" in scorer.description
    assert "not a reward model" in scorer.description
    texts = [render_pair(PROMPT, a) for a in ("the capital of France is Paris", "bananas are yellow", "")]
    scored = scorer.score(texts, add_special_tokens=True, limit=TokenLimit(None))
    on_topic, off_topic, empty = scored.scores
    assert on_topic > off_topic == empty == 0.0
    assert lexical_relevance("a b", "a b") == pytest.approx(1.0)


def test_stand_in_embeds_each_distinct_text_once() -> None:
    import numpy as np

    seen: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray[Any, np.dtype[np.float32]]:
        seen.append(texts)
        # unit vectors: the prompt on the x axis, answers at a known angle to it
        return np.array([[1.0, 0.0] if t == "p" else [0.6, 0.8] for t in texts], dtype=np.float32)

    scored = StandInScorer(embed).score(
        [render_pair("p", "x"), render_pair("p", "x"), render_pair("p", " ")],
        add_special_tokens=True,
        limit=TokenLimit(None),
    )
    assert seen == [["p", "x", " "]]
    assert scored.scores == pytest.approx([0.6, 0.6, -1.0])


@pytest.mark.parametrize(
    ("limit", "want"),
    [
        (TokenLimit(None), None),
        (TokenLimit(3), [1, 2, 3]),
        (TokenLimit(3, "left"), [4, 5, 6]),
        (TokenLimit(9), [1, 2, 3, 4, 5]),
    ],
)
def test_cut_tokens(limit: TokenLimit, want: list[int] | None) -> None:
    ids = [1, 2, 3, 4, 5, 6]
    if want is None:
        with pytest.raises(UnscorableInputError, match="more than the model's context of 5"):
            cut_tokens(0, ids, limit, 5)
    else:
        assert cut_tokens(0, ids, limit, 5) == want
    with pytest.raises(UnscorableInputError, match="no tokens"):
        cut_tokens(2, [], limit, 5)
