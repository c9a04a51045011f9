"""`tiergate reward-server`: vLLM's pooling API for reward models, served on a CPU with transformers, for local mode
and tests (in a cluster the operator runs vLLM itself with `--runner pooling`; the router cannot tell them apart).

Routes (the subset of vLLM 0.32's `vllm/entrypoints/pooling/pooling` the router and its users need):

- `POST /pooling`, batch form `{"model", "input": str | [str, ...]}`: one score per text, all in one request
  (the router's best-of-n path sends its n rendered answers this way); chat form `{"model", "messages": [...]}`:
  one conversation, rendered through the model's chat template (vLLM's default: no extra special tokens).
  Also read, as vLLM reads them: `use_activation` (default true: a sigmoid over the one logit, vLLM's default
  for a one-label classifier; false: the raw logit), `truncate_prompt_tokens` (-1: cut to the model's context,
  k: to k tokens; absent: a text longer than the context is refused with 400, as vLLM does),
  `truncation_side`, `add_special_tokens`, `encoding_format` ("float" only), `task` ("classify" only).
  Other fields are ignored, as vLLM ignores unknown ones. Token-id inputs are refused (400): send texts.
  Answer: `{"id", "object": "list", "created", "model", "data": [{"index", "object": "pooling", "data": [score]}],
  "usage": {"prompt_tokens", "total_tokens", "completion_tokens": 0}}`.
- `GET /v1/models` (one model; the stand-in says so in its entry), `GET /health`.

Errors are OpenAI's envelope (`{"error": {"message", "type", "param", "code"}}`) with `param` naming the field
that is wrong; a model name the server does not serve is a 404, as in vLLM.

Scorers: `TransformersScorer`, any `AutoModelForSequenceClassification` folder with one label (the score is its
logit), batched; `StandInScorer` without `--model`, a documented stand-in that is NOT a reward model (see its
docstring). torch and transformers are imported only when a scorer is built.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from tiergate_router.errors import BadRequestError, ConfigError
from tiergate_router.openai_server import error_response, models_body
from tiergate_router.reward import render_pair

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# Texts one /pooling request may carry. One request is scored as one job in memory (activations of the whole
# batch), so an unbounded list could take the server down; the router sends at most 16 (best-of-N's cap).
MAX_INPUTS = 256
# Body size aiohttp accepts: 16 texts of a long answer each (tens of kB) fit many times over.
MAX_BODY_BYTES = 16 * 1024**2
STAND_IN_NAME = "tiergate-stand-in-reward"
STAND_IN_NOTICE = (
    "STAND-IN scorer, not a reward model: no --model was given, so answers are scored by their relevance to the "
    "prompt ({how}). Good for offline demos and tests of the plumbing only; serve a real reward model with --model "
    "PATH (a sequence-classification folder) or vLLM --runner pooling."
)


class UnscorableInputError(Exception):
    """A text the model cannot score as asked: no tokens at all, or longer than its context and no cut asked for
    (the message says which; the server answers 400 naming `input`)."""


@dataclass(frozen=True)
class Scored:
    scores: list[float]  # the raw score (logit) of each text, in order
    prompt_tokens: int  # tokens read, for `usage`


@dataclass(frozen=True)
class TokenLimit:
    """How texts are cut: to `max_tokens` from `side` ("right" keeps the start), or refused when `max_tokens` is None
    and a text exceeds the scorer's context."""

    max_tokens: int | None
    side: str = "right"


class RewardScorer(Protocol):
    """What the server needs from a scorer. `score` runs in a worker thread (one call at a time)."""

    name: str  # the served model name
    max_model_len: int
    stand_in: bool
    description: str

    def render_chat(self, messages: Sequence[dict[str, str]]) -> tuple[str, bool]:
        """One conversation as text, and whether special tokens are still to be added to it."""
        ...

    def score(self, texts: Sequence[str], *, add_special_tokens: bool, limit: TokenLimit) -> Scored: ...


# -- the transformers scorer ----------------------------------------------------------------------------------


class TransformersScorer:
    """A local `AutoModelForSequenceClassification` folder with one label, on the CPU; score = the logit.

    Texts are scored in batches of `batch_size`, sorted by length so each batch pads little (a reward server's
    texts vary from a word to thousands of tokens). Models without a pad token (some Llama reward models) are run
    one text at a time: transformers finds a decoder's last token through the pad id, and a made-up pad id could
    collide with a real token.
    """

    stand_in = False

    def __init__(self, model_dir: Path, *, name: str | None = None, batch_size: int = 16) -> None:
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ModuleNotFoundError as e:
            raise ConfigError(f"--model needs torch and transformers ({e.name} is missing)") from e
        try:
            self._tok = AutoTokenizer.from_pretrained(str(model_dir))
            # float32 on the CPU: bf16 checkpoints (most reward models) would run emulated and several times slower.
            self._model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load a sequence-classification model from {model_dir}: {e}") from e
        labels = int(self._model.config.num_labels)
        if labels != 1:
            raise ConfigError(f"{model_dir} has {labels} labels; a reward model has one (its score)")
        self._torch = torch
        self.name = name or str(model_dir)
        self.max_model_len = _context_of(self._model.config, self._tok)
        self.batch_size = batch_size if self._model.config.pad_token_id is not None else 1
        self.description = f"{type(self._model).__name__} from {model_dir}"

    def render_chat(self, messages: Sequence[dict[str, str]]) -> tuple[str, bool]:
        if getattr(self._tok, "chat_template", None):
            text = self._tok.apply_chat_template(list(messages), tokenize=False)
            return str(text), False
        return render_messages(messages), True

    def score(self, texts: Sequence[str], *, add_special_tokens: bool, limit: TokenLimit) -> Scored:
        torch = self._torch
        ids: list[list[int]] = self._tok(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        ids = [cut_tokens(i, seq, limit, self.max_model_len) for i, seq in enumerate(ids)]
        pad = self._model.config.pad_token_id
        out = [0.0] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                width = max(len(ids[i]) for i in chunk)
                # Right padding: positions stay 0..len-1 for every text, as when it is scored alone.
                rows = [ids[i] + [pad] * (width - len(ids[i])) for i in chunk]
                mask = [[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in chunk]
                logits = self._model(input_ids=torch.tensor(rows), attention_mask=torch.tensor(mask)).logits
                for row, i in enumerate(chunk):
                    out[i] = float(logits[row, 0])
        return Scored(out, sum(len(s) for s in ids))


def _context_of(config: Any, tok: Any) -> int:
    """The model's context in tokens: its position table, else the tokenizer's limit (some tokenizers report a
    huge sentinel for "no limit", hence the model first)."""
    for value in (getattr(config, "max_position_embeddings", None), getattr(tok, "model_max_length", None)):
        if isinstance(value, int) and 0 < value < 1_000_000:
            return value
    return 512


def cut_tokens(index: int, ids: list[int], limit: TokenLimit, context: int) -> list[int]:
    """`ids` cut as `limit` says; UnscorableInputError when it is empty, or too long and no cut was asked for."""
    if not ids:
        raise UnscorableInputError(f"input {index} has no tokens: nothing to score")
    if limit.max_tokens is None:
        if len(ids) > context:
            raise UnscorableInputError(
                f"input {index} has {len(ids)} tokens, more than the model's context of {context} tokens "
                "(set truncate_prompt_tokens to cut it)"
            )
        return ids
    keep = min(limit.max_tokens, context)
    if len(ids) <= keep:
        return ids
    return ids[-keep:] if limit.side == "left" else ids[:keep]


def render_messages(messages: Sequence[dict[str, str]]) -> str:
    """A conversation in the batch form's rendering (tiergate_router.reward.render_pair), for models without a
    chat template: a (user, assistant) pair renders exactly as the router's batch texts do."""
    parts: list[str] = []
    for m in messages:
        role = {"user": "User", "assistant": "Assistant", "system": "System"}.get(m["role"], m["role"].title())
        parts.append(f"{role}: {m['content']}")
    return "\n\n".join(parts)


# -- the stand-in -------------------------------------------------------------------------------------------------

_PAIR = re.compile(r"\AUser: (?P<prompt>.*)\n\nAssistant: (?P<answer>.*)\Z", re.DOTALL)
_WORD = re.compile(r"\w+")


def split_pair(text: str) -> tuple[str, str]:
    """(prompt, answer) of a text in `render_pair`'s form, split at the LAST "\n\nAssistant: " (a prompt that
    flattens earlier turns holds some; a model's answer rarely does); a text in another form is all answer."""
    m = _PAIR.match(text)
    return (m["prompt"], m["answer"]) if m else ("", text)


def lexical_relevance(prompt: str, answer: str) -> float:
    """Cosine of the two texts' sets of lower-cased words: 0 for an empty answer or no word in common."""
    p, a = set(_WORD.findall(prompt.lower())), set(_WORD.findall(answer.lower()))
    if not p or not a:
        return 0.0
    return len(p & a) / math.sqrt(len(p) * len(a))


class StandInScorer:
    """The offline stand-in (no reward model ships in any package we can install): score = cosine similarity of
    all-MiniLM-L6-v2 embeddings of the prompt and the answer (the router's own encoder), or, without MiniLM, of
    their word sets. It rewards answers that stay on the prompt's topic and ranks empty ones last; it knows nothing
    of correctness or helpfulness. The prompt and answer are read back from the batch texts' "User: …\\n\\nAssistant:
    …" form (`render_pair`), and from a conversation's last user and assistant turns.
    """

    stand_in = True
    name = STAND_IN_NAME
    # What the stand-in reads of each text: MiniLM's window (tiergate.routing.encoder.MAX_TOKENS) covers it.
    max_model_len = 256

    def __init__(self, embed: Callable[[list[str]], npt.NDArray[np.float32]] | None) -> None:
        self._embed = embed
        how = "MiniLM cosine similarity" if embed is not None else "word-overlap cosine; MiniLM is not installed"
        self.description = STAND_IN_NOTICE.format(how=how)

    @classmethod
    def load(cls) -> StandInScorer:
        """With MiniLM when the encoder loads, else the word-overlap fallback."""
        from tiergate.routing.encoder import MiniLMEncoder
        from tiergate.routing.errors import EncoderError

        try:
            return cls(MiniLMEncoder().encode)
        except EncoderError:
            return cls(None)

    def render_chat(self, messages: Sequence[dict[str, str]]) -> tuple[str, bool]:
        last = {m["role"]: m["content"] for m in messages}
        return render_pair(last.get("user", ""), last.get("assistant", "")), True

    def score(self, texts: Sequence[str], *, add_special_tokens: bool, limit: TokenLimit) -> Scored:
        pairs = [split_pair(t) for t in texts]
        # Usage is an estimate (4 characters a token, how the routing data counts) since no tokenizer is involved.
        tokens = sum(math.ceil(len(t) / 4) for t in texts)
        if self._embed is None:
            return Scored([lexical_relevance(p, a) for p, a in pairs], tokens)
        # Each distinct text embedded once: best-of-n sends one prompt n times.
        unique = list(dict.fromkeys(t for pair in pairs for t in pair))
        row = {t: i for i, t in enumerate(unique)}
        vectors = self._embed(unique)
        # Unit vectors (the encoder L2-normalises), so the dot product is the cosine, in [-1, 1]; an empty answer
        # gets -1, below every answer with words (an off-topic one can score slightly under 0).
        return Scored([float(vectors[row[p]] @ vectors[row[a]]) if a.strip() else -1.0 for p, a in pairs], tokens)


# -- the request -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolingRequest:
    texts: list[str]  # batch form: the inputs; chat form: the one rendered conversation
    add_special_tokens: bool
    use_activation: bool
    limit: TokenLimit


def _field(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """`body[name]` when present and of type `kind` (a JSON true is no integer here), `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadRequestError(f"`{name}` must be a {kind.__name__}", param=name)
    return value


def _messages(value: object) -> list[dict[str, str]]:
    """The chat form's messages, each content flattened to text (OpenAI's list-of-parts form included)."""
    if not isinstance(value, list) or not value:
        raise BadRequestError("`messages` must be a non-empty list of {role, content}", param="messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(value):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            content = "".join(t for t in texts if isinstance(t, str)) if len(texts) == len(content) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadRequestError(f"messages[{i}] needs a string `role` and text `content`", param="messages")
        out.append({"role": role, "content": content})
    return out


def _inputs(value: object) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise BadRequestError("`input` must be a string or a non-empty list of strings", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise BadRequestError(
            "`input` must be a string or a list of strings (token ids are not supported here: send texts)",
            param="input",
        )
    if len(texts) > MAX_INPUTS:
        raise BadRequestError(f"`input` has {len(texts)} texts; at most {MAX_INPUTS} per request", param="input")
    return list(texts)


def parse_pooling_request(body: object, scorer: RewardScorer) -> PoolingRequest:
    """The request, checked; BadRequestError naming the field otherwise (404 for a model not served here)."""
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object")
    model = _field(body, "model", str, None)
    if model is not None and model != scorer.name:
        raise BadRequestError(f"The model `{model}` does not exist.", status=404, param="model", type_="NotFoundError")
    if _field(body, "task", str, "classify") != "classify":
        raise BadRequestError("this server serves the `classify` task only", param="task")
    if _field(body, "encoding_format", str, "float") != "float":
        raise BadRequestError("only `encoding_format` float is supported here", param="encoding_format")
    if body.get("dimensions") is not None:
        raise BadRequestError("dimensions is currently not supported", param="dimensions")
    truncate = _field(body, "truncate_prompt_tokens", int, None)
    if truncate is not None and truncate < 1 and truncate != -1:
        raise BadRequestError(
            "`truncate_prompt_tokens` must be -1 (the model's context) or a positive number of tokens",
            param="truncate_prompt_tokens",
        )
    if truncate is not None and truncate > scorer.max_model_len:
        raise BadRequestError(
            f"truncate_prompt_tokens={truncate} cannot be greater than max_model_len = {scorer.max_model_len}",
            param="truncate_prompt_tokens",
        )
    side = _field(body, "truncation_side", str, "right")
    if side not in ("left", "right"):
        raise BadRequestError("`truncation_side` must be either 'left' or 'right'", param="truncation_side")
    limit = TokenLimit(None if truncate is None else scorer.max_model_len if truncate == -1 else truncate, side)
    use_activation = _field(body, "use_activation", bool, True)
    has_input, has_messages = body.get("input") is not None, body.get("messages") is not None
    if has_input == has_messages:
        raise BadRequestError("give exactly one of `input` (texts) and `messages` (one conversation)", param="input")
    if has_input:
        texts, special = _inputs(body["input"]), True
    else:
        text, special = scorer.render_chat(_messages(body["messages"]))
        texts = [text]
    special = _field(body, "add_special_tokens", bool, special)
    return PoolingRequest(texts, special, use_activation, limit)


def pooling_response(model: str, scores: Sequence[float], prompt_tokens: int) -> dict[str, Any]:
    """vLLM's PoolingResponse for one-label scores."""
    return {
        "id": f"pool-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [{"index": i, "object": "pooling", "data": [s]} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0},
    }


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# -- the server -------------------------------------------------------------------------------------------------


class RewardServer:
    """The aiohttp handlers over one scorer. Scoring runs in a worker thread, one request at a time (torch uses
    every core for one batch already; two at once would only contend), so `/health` answers while it scores."""

    def __init__(self, scorer: RewardScorer) -> None:
        self.scorer = scorer
        # A thread lock, taken in the worker thread: a client that goes away cancels its handler, not the thread's
        # forward pass, so an asyncio lock would let the next request's pass run beside the abandoned one.
        self._lock = threading.Lock()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/pooling", self.pooling)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def pooling(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "the body is not valid JSON")
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"the body is larger than {MAX_BODY_BYTES} bytes", param="input")
        try:
            req = parse_pooling_request(body, self.scorer)
            scored = await asyncio.to_thread(self._score, req)
        except BadRequestError as e:
            return error_response(e.status, e.message, type_=e.type, param=e.param, code=e.code)
        except UnscorableInputError as e:
            return error_response(400, str(e), param="input")
        scores = [_sigmoid(s) for s in scored.scores] if req.use_activation else scored.scores
        return web.json_response(pooling_response(self.scorer.name, scores, scored.prompt_tokens))

    def _score(self, req: PoolingRequest) -> Scored:
        with self._lock:
            return self.scorer.score(req.texts, add_special_tokens=req.add_special_tokens, limit=req.limit)

    async def models(self, request: web.Request) -> web.StreamResponse:
        card: dict[str, Any] = {"root": self.scorer.name, "max_model_len": self.scorer.max_model_len}
        if self.scorer.stand_in:
            card |= {"stand_in": True, "description": self.scorer.description}
        return web.json_response(models_body([self.scorer.name], owned_by="tiergate", **card))

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="")
