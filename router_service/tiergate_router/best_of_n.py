"""Best-of-N on the request path (`spec.bestOfN`, `tiergate serve --best-of-n TIER=N --reward-url URL`).

A request routed to the best-of-N tier with n > 1 samples (`Route.samples`):
1. one request to the tier with `"n": n`, never streamed upstream (the best answer is known only once all n are
   complete); a fallback tier, when the best-of-N tier cannot answer, gets the plain request (one sample);
2. one batched call to the reward model (`RewardClient.score`) for all the choices that came back;
3. the best-scored choice is returned as `choices[0]` (index 0) with the tier's `usage` unchanged: vLLM counts the
   prompt once and the completion tokens of all n samples, which is what the request cost.
When the reward model times out (its own deadline, and never more than half of what is left of the request's, so
the reference tier keeps time to answer), is down, answers garbage, or the best score is below `min_reward`, the
reference tier answers the original request (one sample), within the request's overall deadline; the usage
returned then counts the samples too, as they were paid for. A tier that ignores `n` (one choice back) is
answered as is, without a reward call. A client's own `n > 1` is passed through unchanged (not reranked).

Front ends (`http_api`, `grpc_api`) turn the `Answer` into their response; a streaming client gets the chosen
answer as server-sent events in the usual chunk shape (`chosen`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tiergate_router.decision import fallback_chain
from tiergate_router.dispatch import UpstreamReply
from tiergate_router.errors import DeadlineExceededError
from tiergate_router.reward import RewardClient, RewardError
from tiergate_router.router import Route, Router
from tiergate_router.tenants import Access

log = logging.getLogger(__name__)

SAMPLES_HEADER = "x-tiergate-samples"
# Set when the reference tier answered a best-of-N request instead: the reason (ESCALATION_REASONS).
ESCALATION_HEADER = "x-tiergate-escalation"
BELOW_MIN_REWARD = "below_min_reward"
# A reward error's reason (reward.REWARD_ERROR_REASONS: timeout, unavailable, bad_response) or a low best score.
ESCALATION_REASONS = ("timeout", "unavailable", "bad_response", BELOW_MIN_REWARD)
# The share of what is left of a request's deadline the reward call may use at most: the rest stays for the
# reference tier, should it have to answer instead.
REWARD_SHARE_OF_DEADLINE = 0.5


@dataclass
class Answer:
    """A complete answer to a best-of-N request, ready for a front end to send."""

    tier: str
    fallback: bool
    status: int
    content_type: str
    # The answer body (parsed JSON object, choices[0] the chosen answer) when the tier answered 200 with JSON.
    obj: dict[str, Any] | None
    # The raw body, for answers that are not a JSON object (a tier's error, passed through as is).
    body: bytes
    # Samples the returned answer was chosen from (1: one answer, not reranked).
    samples: int
    # Why the reference tier answered instead (ESCALATION_REASONS), else None.
    escalation: str | None = None
    # (tier, usage) of every answer the request cost, for the token and cost metrics.
    usages: list[tuple[str, Any]] = field(default_factory=list)


def wants_best_of_n(router: Router, route: Route, body: Mapping[str, Any]) -> bool:
    """Whether this request takes the best-of-N path: best-of-N configured, more than one sample chosen, and the
    client did not ask for several choices itself (passed through then: reranking someone else's `n` would return
    fewer choices than asked)."""
    b = router.config.best_of_n
    if b is None or route.samples <= 1:
        return False
    if client_n(body) > 1:
        router.metrics.best_of_n_skipped.labels(route.chain[0], "client_n").inc()
        return False
    return True


def client_n(body: Mapping[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) else 1


def plain_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request as sent upstream on the best-of-N path: never streamed (the answer is chosen once complete)."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    out["stream"] = False
    return out


def choice_text(choice: object) -> str | None:
    """The text of one choice (chat `message.content`, completion `text`); None when it has none."""
    if not isinstance(choice, dict):
        return None
    msg = choice.get("message")
    if isinstance(msg, dict):
        content = msg.get("content")
        return content if isinstance(content, str) else None
    text = choice.get("text")
    return text if isinstance(text, str) else None


def sum_usage(*usages: object) -> dict[str, int] | None:
    """Token counts added up over OpenAI `usage` objects (malformed ones skipped; None when none is usable)."""
    total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    seen = False
    for u in usages:
        if not isinstance(u, dict):
            continue
        p, c = u.get("prompt_tokens"), u.get("completion_tokens")
        if not isinstance(p, int) or not isinstance(c, int):
            continue
        seen = True
        total["prompt_tokens"] += p
        total["completion_tokens"] += c
        total["total_tokens"] += p + c
    return total if seen else None


def _parse(reply: UpstreamReply) -> dict[str, Any] | None:
    if reply.status != 200 or not reply.content_type.startswith("application/json"):
        return None
    try:
        obj = json.loads(reply.body)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _passthrough(reply: UpstreamReply, obj: dict[str, Any] | None) -> Answer:
    usages = [(reply.tier, obj.get("usage"))] if obj is not None else []
    return Answer(reply.tier, reply.fallback, reply.status, reply.content_type, obj, reply.body, 1, usages=usages)


class BestOfN:
    """The best-of-N path of one router. Holds the reward client, made afresh when the reward server or model of
    the config changes (a client of a replaced config holds nothing of its own: it shares the dispatcher's
    connection pool, so requests still using it finish normally)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._client: RewardClient | None = None
        self._client_key: tuple[str, str | None] | None = None

    def reward_client(self) -> RewardClient:
        b = self.router.config.best_of_n
        assert b is not None
        key = (b.reward_url, b.reward_model)
        if self._client is None or self._client_key != key:
            self._client = RewardClient(b.reward_url, b.reward_model, session=self.router.dispatcher.session)
            self._client_key = key
        return self._client

    async def answer(
        self, route: Route, path: str, body: Mapping[str, Any], prompt_text: str, *, timeout_s: float | None
    ) -> Answer:
        """The answer to a request `wants_best_of_n` accepted. Raises what `Dispatcher.complete` raises when no
        tier answers (the reference tier included, after an escalation)."""
        router = self.router
        cfg = router.config
        b = cfg.best_of_n
        assert b is not None
        clock = time.monotonic
        start = clock()
        deadline = start + (cfg.request_timeout_s if timeout_s is None else min(cfg.request_timeout_s, timeout_s))
        plain = plain_body(body)
        samples_body = dict(plain, n=route.samples)
        reply = await router.dispatcher.complete(
            route.chain, path, plain, timeout_s=timeout_s, tier_bodies={b.tier: samples_body}
        )
        obj = _parse(reply)
        if obj is None:
            return _passthrough(reply, obj)  # the tier's error, as it is
        if reply.tier != b.tier:
            router.metrics.best_of_n_skipped.labels(b.tier, "fallback").inc()
            return _passthrough(reply, obj)
        choices = obj.get("choices")
        texts = [choice_text(c) for c in choices] if isinstance(choices, list) else []
        if len(texts) < 2:
            # The tier ignored `n` (an OpenAI-compatible server that does not sample several): one answer is all.
            router.metrics.best_of_n_skipped.labels(b.tier, "tier_ignored_n").inc()
            return _passthrough(reply, obj)
        assert isinstance(choices, list)
        # A choice without text (a tool call, a refusal) scores as an empty answer: it is still a candidate.
        reason, best = await self._rerank(prompt_text, [t or "" for t in texts], deadline - clock())
        if reason is None:
            chosen = dict(choices[best], index=0)
            out = dict(obj, choices=[chosen])
            return Answer(
                reply.tier,
                reply.fallback,
                200,
                reply.content_type,
                out,
                b"",
                len(texts),
                usages=[(reply.tier, obj.get("usage"))],
            )
        return await self._escalate(reason, path, plain, obj, reply, deadline - clock(), route.access)

    async def _rerank(self, prompt: str, texts: list[str], remaining_s: float) -> tuple[str | None, int]:
        """(None, index of the best text), or (the escalation reason, -1)."""
        router = self.router
        b = router.config.best_of_n
        assert b is not None
        m = router.metrics
        limit = min(b.timeout_s, remaining_s * REWARD_SHARE_OF_DEADLINE)
        t0 = time.perf_counter()
        try:
            if limit <= 0:
                raise RewardError("timeout", "no time left of the request's deadline for the reward model")
            scores = await self.reward_client().score(prompt, texts, timeout_s=limit)
        except RewardError as e:
            m.reward_seconds.observe(time.perf_counter() - t0)
            m.reward_errors.labels(e.reason).inc()
            log.warning("best-of-N: reward model failed (%s): %s; the reference tier answers", e.reason, e)
            return e.reason, -1
        m.reward_seconds.observe(time.perf_counter() - t0)
        for s in scores:
            m.reward_score.observe(s)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties: the first sample
        if b.min_reward is not None and scores[best] < b.min_reward:
            return BELOW_MIN_REWARD, -1
        return None, best

    async def _escalate(
        self,
        reason: str,
        path: str,
        plain: dict[str, Any],
        sampled: dict[str, Any],
        reply: UpstreamReply,
        remaining_s: float,
        access: Access,
    ) -> Answer:
        """The reference tier answers the original request (one sample), in what is left of the deadline."""
        router = self.router
        cfg = router.config
        b = cfg.best_of_n
        assert b is not None
        router.metrics.best_of_n_escalations.labels(reason).inc()
        spent = (reply.tier, sampled.get("usage"))
        if remaining_s <= 0:
            router.account_usage(*spent, access)
            raise DeadlineExceededError(
                f"deadline exceeded: best-of-N on {reply.tier} needed the reference tier ({reason}) and no time was "
                "left",
                [f"{reply.tier}: {reason}"],
            )
        chain = fallback_chain(b.reference_tier, cfg.tier_names, cfg.fallback_order)
        try:
            ref = await router.dispatcher.complete(chain, path, plain, timeout_s=remaining_s)
        except BaseException:
            router.account_usage(*spent, access)
            raise
        obj = _parse(ref)
        if obj is None:
            answer = _passthrough(ref, obj)
            answer.usages.append(spent)
            answer.escalation = reason
            return answer
        usages = [(ref.tier, obj.get("usage")), spent]
        total = sum_usage(*(u for _, u in usages))
        out = dict(obj, usage=total) if total is not None else obj
        return Answer(ref.tier, ref.tier != b.reference_tier, 200, ref.content_type, out, b"", 1, reason, usages=usages)


def chosen(answer: Answer) -> tuple[str, str, dict[str, Any] | None]:
    """(text, finish reason, usage) of the answer's first choice: what a streaming client is sent (the whole text
    in one chunk, then the finish reason, then the usage when asked for) and what gRPC's Generate returns."""
    obj = answer.obj or {}
    choices = obj.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    usage = obj.get("usage")
    finish_reason = str(first.get("finish_reason") or "stop")
    return choice_text(first) or "", finish_reason, usage if isinstance(usage, dict) else None
