"""The router's reward-model client: scores one prompt's n sampled answers with ONE batched call to the reward
model's server, which speaks vLLM's pooling API (vLLM's `--runner pooling`, or `tiergate reward-server`).

The wire form (vLLM 0.32, `vllm/entrypoints/pooling/pooling/protocol.py`):

    POST {url}/pooling  {"model": M, "input": [text_1, ..., text_n], "use_activation": false,
                         "truncate_prompt_tokens": -1}
    200  {"data": [{"index": i, "object": "pooling", "data": [score_i]}, ...], "model": M, "usage": {...}, ...}

- `input` as a list of texts is vLLM's batch form: the server scores all n in one engine step. The chat form
  (`messages`) renders through the reward model's chat template but takes one conversation per call, so n answers
  would be n calls; the router needs one. Each (prompt, answer) pair is therefore rendered to text by `render_pair`
  ("User: …\\n\\nAssistant: …"): a neutral form any reward model can read. It is model-agnostic on purpose: the
  router does not have the reward model's tokenizer to apply its chat template. A model scored outside its own
  template may rank answers somewhat less well (not measured here: no real reward model is available offline);
  what best-of-N uses is the order of one prompt's answers, all rendered alike, and the floor `minReward` is set
  against scores of this same rendering.
- `use_activation: false` asks for the raw logit (vLLM applies a sigmoid to a one-label classifier by default):
  reward models publish their scores as logits, and a sigmoid squashes the differences between good answers.
- `truncate_prompt_tokens: -1` cuts a pair longer than the reward model's context to that context instead of
  failing the whole batch (vLLM answers 400 otherwise, and one long sample would send every request of that kind
  to the reference tier).
- `model` None asks `GET {url}/v1/models` once (vLLM serves one model; its name is whatever the operator set).

Every failure is a `RewardError` whose `reason` (REWARD_ERROR_REASONS, a metric label) says what happened:
`timeout` (the deadline passed), `unavailable` (connection refused, reset or dropped), `bad_response` (an HTTP
error status, a body that is not JSON or over MAX_RESPONSE_BYTES, or scores that are not one finite number per
answer).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from typing import Any

import aiohttp

from tiergate_router.errors import RouterError

REWARD_ERROR_REASONS = ("timeout", "unavailable", "bad_response")
# The largest answer read: 16 scores take ~2 KB; a server sending megabytes is broken, and the router must not hold
# them (one per request in flight).
MAX_RESPONSE_BYTES = 1024**2


class RewardError(RouterError):
    """Scoring failed; `reason` is one of REWARD_ERROR_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REWARD_ERROR_REASONS:
            raise ValueError(f"unknown reward error reason {reason!r}")
        super().__init__(f"reward model {reason}: {message}")
        self.reason = reason


def render_pair(prompt: str, answer: str) -> str:
    """The text the reward model scores for one (prompt, answer) pair (see the module docstring for why this form)."""
    return f"User: {prompt}\n\nAssistant: {answer}"


def pooling_body(model: str, texts: Sequence[str]) -> dict[str, Any]:
    """The `/pooling` request scoring `texts` in one batch, as raw logits, each cut to the model's context."""
    return {"model": model, "input": list(texts), "use_activation": False, "truncate_prompt_tokens": -1}


def _number(value: object) -> float | None:
    # bool is an int in Python but never a score; JSON's NaN/Infinity parse to floats and are refused by the caller.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def parse_scores(body: object, count: int) -> list[float]:
    """The `count` scores of a `/pooling` response, in input order (by `index`); RewardError("bad_response")
    naming what is wrong otherwise. A score is a number or a one-element list of one (vLLM's form for a
    one-label classifier); anything else (several labels, NaN, infinities, missing or repeated indices) is
    refused: picking the best of n on a made-up number would be worse than asking the reference tier."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise RewardError("bad_response", "the response has no `data` list")
    if len(data) != count:
        raise RewardError("bad_response", f"{len(data)} scores for {count} answers")
    scores: list[float | None] = [None] * count
    for item in data:
        index = item.get("index") if isinstance(item, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise RewardError("bad_response", f"data item without a valid `index`: {str(item)[:200]}")
        if scores[index] is not None:
            raise RewardError("bad_response", f"index {index} appears twice")
        raw = item.get("data")
        if isinstance(raw, list):
            raw = raw[0] if len(raw) == 1 else None
        value = _number(raw)
        if value is None or not math.isfinite(value):
            raise RewardError("bad_response", f"score {index} is not one finite number: {str(item.get('data'))[:200]}")
        scores[index] = value
    return [s for s in scores if s is not None]


def served_model(body: object) -> str:
    """The first model id of a `/v1/models` list (vLLM serves one model)."""
    data = body.get("data") if isinstance(body, dict) else None
    first = data[0] if isinstance(data, list) and data else None
    model = first.get("id") if isinstance(first, dict) else None
    if not isinstance(model, str) or not model:
        raise RewardError("bad_response", "GET /v1/models lists no model")
    return model


class RewardClient:
    """Scores answers against a reward server at `url` (its root: `http://host:port`).

    `session`: a shared aiohttp session (the caller closes it); without one the client opens its own on first use
    and `aclose` closes it. The client keeps no other state than the served model's name once it is known.
    """

    def __init__(self, url: str, model: str | None, *, session: aiohttp.ClientSession | None = None) -> None:
        self.url = url.rstrip("/")
        self._model = model
        self._session = session
        self._own_session = session is None

    async def score(self, prompt: str, answers: Sequence[str], *, timeout_s: float) -> list[float]:
        """One score per answer, in order, from one `/pooling` call, all within `timeout_s` (the model lookup
        included). Raises RewardError."""
        if not answers:
            return []
        try:
            async with asyncio.timeout(timeout_s):
                model = self._model or await self._lookup_model()
                body = await self._request(
                    "POST", "/pooling", pooling_body(model, [render_pair(prompt, a) for a in answers])
                )
        except TimeoutError as e:  # first: aiohttp's own timeouts are also connection errors
            raise RewardError("timeout", f"no answer from {self.url} within {timeout_s:g} s") from e
        return parse_scores(body, len(answers))

    async def aclose(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _lookup_model(self) -> str:
        self._model = served_model(await self._request("GET", "/v1/models", None))
        return self._model

    async def _request(self, method: str, path: str, payload: dict[str, Any] | None) -> object:
        """The JSON body of a 200 answer; RewardError("unavailable") when the connection fails,
        RewardError("bad_response") for an error status or a body that is not JSON."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.request(method, f"{self.url}{path}", json=payload) as r:
                raw = await _read_capped(r.content)
                status = r.status
        except TimeoutError:
            raise
        except aiohttp.ClientResponseError as e:  # a reply that is not HTTP: the server is there but talks nonsense
            raise RewardError("bad_response", f"{method} {path}: {e}") from e
        except (aiohttp.ClientError, OSError) as e:  # refused, reset, dropped mid-body
            raise RewardError("unavailable", f"{method} {self.url}{path}: {e!r}") from e
        if raw is None:
            raise RewardError("bad_response", f"{method} {path} answered more than {MAX_RESPONSE_BYTES} bytes")
        if status != 200:
            raise RewardError("bad_response", f"{method} {path} answered HTTP {status}: {_error_message(raw)}")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            raise RewardError("bad_response", f"{method} {path} answered a body that is not JSON: {raw[:200]!r}") from e


async def _read_capped(content: aiohttp.StreamReader) -> bytes | None:
    """The whole body, or None once it passes MAX_RESPONSE_BYTES (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.read(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI/vLLM error body, else the start of the body."""
    try:
        error = json.loads(raw).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:500]
    except (UnicodeDecodeError, ValueError, AttributeError):
        pass
    return raw[:200].decode("utf-8", "replace")
