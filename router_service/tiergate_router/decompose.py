"""Decomposition of a chat request whose answering tier cannot take some of its attachments.

Each such image goes to a tier that accepts images, with a request to describe it; each audio part to a tier that
accepts audio, with a request to transcribe it (chat with the `input_audio` part, the protocol every tier in the
fallback machinery speaks). The calls run in parallel, within a share of the request's deadline; then the body for
the answering tier is the client's with each part replaced by a text part carrying the description or transcript
(or, when a specialist failed and the policy says Annotate, a note that the part could not be read).

The pure builders (`specialist_body`, `inlined_body`, `result_text`) are separate from the one async step that
calls the tiers (`Decomposer.run`), so that the shapes are unit-tested without servers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tiergate_router.errors import DeadlineExceededError, NoTierAvailableError, RouterError
from tiergate_router.modality import AUDIO, FAIL, Attachment, Specialist

if TYPE_CHECKING:
    from tiergate_router.router import Route, Router
    from tiergate_router.tenants import Access

# On every answer (HTTP header; gRPC trailing metadata): the tiers that contributed, the answering tier first.
TIERS_HEADER = "x-tiergate-tiers"
# What a specialist is asked. Plain instructions any instruction-tuned vision or audio model follows; the answer is
# inlined for the answering tier, which sees only text, so a description must carry what a reader needs.
DESCRIBE_PROMPT = (
    "Describe this image in detail for someone who cannot see it: objects, people, any text it contains (verbatim), "
    "numbers, charts and layout. Only the description."
)
TRANSCRIBE_PROMPT = "Transcribe this audio verbatim. Only the transcript."
# Room for a detailed description or a few minutes of speech; the answering tier's context pays for it.
SPECIALIST_MAX_TOKENS = 1024
# The specialists' share of what is left of the request's deadline when they start: the answering tier needs the
# rest to answer at all, and a description is usually much quicker than the answer built on it.
SPECIALIST_DEADLINE_SHARE = 0.5


class SpecialistFailedError(RouterError):
    """A specialist could not read a part and the policy says Fail; the message names the part."""

    def __init__(self, message: str, *, timed_out: bool) -> None:
        super().__init__(message)
        self.status = 504 if timed_out else 502
        self.code = "specialist_timeout" if timed_out else "specialist_failed"


@dataclass(frozen=True)
class StepResult:
    attachment: Attachment
    # The specialist tier that answered; None when none did.
    tier: str | None
    text: str | None
    # Why no text came back (None on success).
    error: str | None = None
    timed_out: bool = False


@dataclass(frozen=True)
class Decomposed:
    # The request for the answering tier: the client's, attachments replaced by text.
    body: dict[str, Any]
    # Specialist tiers that contributed a description or transcript, in the order of first use.
    tiers: tuple[str, ...]
    results: tuple[StepResult, ...]


def specialist_body(body: dict[str, Any], a: Attachment) -> dict[str, Any]:
    """The chat request asking a specialist to describe or transcribe attachment `a` of `body` (its part sent as
    the client sent it)."""
    part = body["messages"][a.message]["content"][a.part]
    prompt = TRANSCRIBE_PROMPT if a.modality == AUDIO else DESCRIBE_PROMPT
    return {
        "model": body.get("model"),
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}, part]}],
        "max_tokens": SPECIALIST_MAX_TOKENS,
        "stream": False,
    }


def result_text(r: StepResult, number: int) -> str:
    """The text part that replaces attachment number `number` (1-based, per modality) in the answering request."""
    kind = "audio" if r.attachment.modality == AUDIO else "image"
    what = "transcript" if r.attachment.modality == AUDIO else "description"
    if r.text is not None:
        return f"[{kind} {number}, {what} by the {r.tier} tier: {r.text}]"
    return f"[{kind} {number} could not be read: {r.error}]"


def inlined_body(body: dict[str, Any], results: Sequence[StepResult]) -> dict[str, Any]:
    """`body` with each result's attachment part replaced by its text; other messages and parts are kept as they
    are (copied only where changed)."""
    by_place = {(r.attachment.message, r.attachment.part): r for r in results}
    counters: dict[str, int] = {}
    numbers: dict[tuple[int, int], int] = {}
    for r in sorted(results, key=lambda r: (r.attachment.message, r.attachment.part)):
        counters[r.attachment.modality] = counters.get(r.attachment.modality, 0) + 1
        numbers[(r.attachment.message, r.attachment.part)] = counters[r.attachment.modality]
    messages = list(body["messages"])
    for i in sorted({m for m, _ in by_place}):
        msg = dict(messages[i])
        msg["content"] = [
            {"type": "text", "text": result_text(by_place[(i, j)], numbers[(i, j)])} if (i, j) in by_place else part
            for j, part in enumerate(msg["content"])
        ]
        messages[i] = msg
    return dict(body, messages=messages)


def answer_text(reply_body: bytes) -> tuple[str | None, object]:
    """(the text of a chat answer's first choice or None when there is none, its `usage`)."""
    try:
        obj = json.loads(reply_body)
        text = obj["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None, None
    return (text if isinstance(text, str) and text.strip() else None), obj.get("usage")


class Decomposer:
    """Runs the specialist calls of a routed request (`Route.specialists`) on the router's dispatcher."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def run(
        self, route: Route, body: dict[str, Any], attachments: Sequence[Attachment], remaining_s: float
    ) -> Decomposed:
        """Describe/transcribe the attachments the answering tier cannot take, in parallel, within
        SPECIALIST_DEADLINE_SHARE of `remaining_s`. SpecialistFailedError (naming the part) when one fails and
        the policy says Fail."""
        chains = {s.modality: s for s in route.specialists}
        todo = [a for a in attachments if a.modality in chains]
        budget_s = remaining_s * SPECIALIST_DEADLINE_SHARE
        m = self.router.metrics
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self._step(body, a, chains[a.modality], budget_s, route.access) for a in todo))
        m.decomposition_seconds.labels("all").observe(time.perf_counter() - t0)
        policy = self.router.config.attachments
        for r in results:
            if r.text is None and policy.on_specialist_failure == FAIL:
                raise SpecialistFailedError(
                    f"'{r.attachment.where}' ({r.attachment.modality}) could not be read: {r.error}",
                    timed_out=r.timed_out,
                )
        tiers = tuple(dict.fromkeys(r.tier for r in results if r.tier is not None and r.text is not None))
        return Decomposed(inlined_body(body, results), tiers, tuple(results))

    async def _step(
        self, body: dict[str, Any], a: Attachment, s: Specialist, budget_s: float, access: Access
    ) -> StepResult:
        m = self.router.metrics
        t0 = time.perf_counter()
        try:
            reply = await self.router.dispatcher.complete(
                list(s.chain), "/chat/completions", specialist_body(body, a), timeout_s=budget_s
            )
        except NoTierAvailableError as e:
            timed_out = isinstance(e, DeadlineExceededError)
            m.decomposition_steps.labels(a.modality, "none", "timeout" if timed_out else "failed").inc()
            what = f"no {a.modality} tier answered within {budget_s:.3g} s" if timed_out else str(e)
            return StepResult(a, None, None, what, timed_out=timed_out)
        finally:
            m.decomposition_seconds.labels(a.modality).observe(time.perf_counter() - t0)
        text, usage = answer_text(reply.body) if reply.status == 200 else (None, None)
        if text is None:
            m.decomposition_steps.labels(a.modality, reply.tier, "failed").inc()
            why = f"HTTP {reply.status}" if reply.status != 200 else "an answer without text"
            return StepResult(a, reply.tier, None, f"the {reply.tier} tier sent {why}")
        m.decomposition_steps.labels(a.modality, reply.tier, "success").inc()
        self.router.account_usage(reply.tier, usage, access)
        return StepResult(a, reply.tier, text)
