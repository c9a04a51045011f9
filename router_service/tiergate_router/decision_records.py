"""Request ids, decision records, feedback and the implicit re-query signal: what the router learns from production.

Both front ends give every request an id (`request_id`: the client's `x-request-id` when it is sane, else a new
one) and, once the request is over, hand the facts to `Recorder.decision`, which writes one `"kind": "decision"`
record to the decision log (`decision_log.DecisionLog`, never blocking) and remembers a small summary of the
request for feedback. `Recorder.feedback` (POST /v1/feedback) writes a `"kind": "feedback"` record against a
remembered request, at most once per request and source.

The implicit signal: the same user (the OpenAI `user` field, else the tenant; anonymous requests have none)
asking a similar prompt again within `REQUERY_WINDOW_S` counts against the earlier answer, as a
`{"kind": "feedback", "source": "requery", "rating": -1}` record. "Similar" is cheap on purpose: the same prompt
after normalisation (`normalised_digest`: case folded, punctuation dropped, whitespace collapsed). An embedding
cosine would also catch paraphrases, but the classifier's embedding is not at hand here (its cache holds verdicts,
not vectors) and a second encoder pass per request would cost more than the router's whole overhead.

State is bounded whatever the traffic: `RECENT_REQUESTS` summaries and `REQUERY_KEYS` (user, prompt) keys, each
dropped oldest first; a request pushed out cannot take feedback any more (404).
"""

from __future__ import annotations

import hashlib
import logging
import string
import time
import unicodedata
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from tiergate_router.decision_log import DecisionLog, DecisionLogConfig
from tiergate_router.errors import BadRequestError
from tiergate_router.personalize import ProfileRef

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# A client's id is kept when it is at most this long and printable ASCII without spaces: long enough for a UUID, a
# W3C trace id or a ULID with a prefix, short enough that a hostile client cannot bloat every log line and header.
MAX_REQUEST_ID = 128
# Requests remembered for feedback, and (user, prompt) keys kept for the re-query signal. Measured with tracemalloc
# (uuid ids, distinct users, 2026-12-02): 35 MB with both full, ~0.7 KB per request remembered. At 500 requests
# a second that is the last ~100 s of traffic, at 50/s the last quarter of an hour: explicit feedback comes while the
# user still looks at the answer; on a router busier than ~170 requests a second a re-ask late in REQUERY_WINDOW_S
# may find its key gone (a missed signal, never a wrong one).
RECENT_REQUESTS = 50_000
REQUERY_KEYS = 50_000
# A re-ask within five minutes reads as dissatisfaction with the answer; later it is more likely a new session.
REQUERY_WINDOW_S = 300.0
# Largest POST /v1/feedback body: `{"request_id": <128 chars>, "rating": <number>}` fits many times over.
MAX_FEEDBACK_BYTES = 4096

# Characters of a prompt normalised for the re-query key (~50 us of work); a question is usually far shorter.
NORMALISED_CHARS = 2048
# Characters after those hashed as sent (~0.1 ms).
RAW_CHARS = 64 * 1024
_DROP_PUNCT = str.maketrans(dict.fromkeys(string.punctuation, " "))


def request_id(sent: str | None) -> str:
    """The client's id when it is sane (1..MAX_REQUEST_ID printable ASCII characters, no spaces), else a new one
    (a uuid4 in hex), so an id can always go back in a header and a log line unescaped."""
    if sent is not None and 0 < len(sent) <= MAX_REQUEST_ID and all("!" <= ch <= "~" for ch in sent):
        return sent
    return uuid.uuid4().hex


def rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def prompt_sha256(prompt_text: str) -> str:
    return hashlib.sha256(prompt_text.encode("utf-8", "surrogatepass")).hexdigest()


def normalised_digest(prompt_text: str) -> bytes:
    """The re-query key of a prompt: sha256 of its NFKC, case-folded text with ASCII punctuation dropped and
    whitespace collapsed ("What is 2+2?" and "what is 2 + 2" match; a paraphrase does not). The work on the event
    loop stays bounded whatever the prompt's size: the first NORMALISED_CHARS characters are normalised, the next
    RAW_CHARS hashed as sent, and the rest only counted, so two prompts that differ only beyond ~66,000 characters
    (at equal length) count as the same question, a rare miss for a signal."""
    head = prompt_text[:NORMALISED_CHARS]
    text = " ".join(unicodedata.normalize("NFKC", head).casefold().translate(_DROP_PUNCT).split())
    h = hashlib.sha256(text.encode("utf-8", "surrogatepass"))
    if len(prompt_text) > NORMALISED_CHARS:
        tail = prompt_text[NORMALISED_CHARS : NORMALISED_CHARS + RAW_CHARS]
        h.update(f"\0{len(prompt_text)}\0".encode() + tail.encode("utf-8", "surrogatepass"))
    # 16 bytes: collisions among the keys one router holds (REQUERY_KEYS) are out of reach, at half the memory.
    return h.digest()[:16]


class Sha256Of:
    """A prompt's sha256, computed when the record is encoded (`json.dumps(default=str)` in the log's writer
    thread), not on the event loop: hashing a 4 MiB prompt takes ~8 ms."""

    __slots__ = ("_text",)

    def __init__(self, text: str) -> None:
        self._text = text

    def __str__(self) -> str:
        return prompt_sha256(self._text)


@dataclass(frozen=True)
class Usage:
    """What one tier's answer used, as `Router.account_usage` counted it."""

    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


@dataclass(frozen=True)
class Served:
    """What a front end knows once a routed request is over (the `Route` adds the decision)."""

    request_id: str
    prompt_text: str
    # The OpenAI `user` field when the client sent one.
    user: str | None
    tier: str
    outcome: str
    latency_s: float
    samples: int = 1
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None


@dataclass
class Tally:
    """What a front end learns while it serves a routed request: the answering tier as soon as it is known (so a
    request cancelled mid-stream still counts against it), the outcome, the samples and the usage summed."""

    tier: str = "none"
    outcome: str = "upstream_error"
    samples: int = 1
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    # Specialist tiers that described or transcribed attachments for the answering tier (`decompose`).
    specialists: tuple[str, ...] = ()

    def add(self, usage: Usage | None) -> None:
        """Sum what the tiers' answers used (best-of-N: every sample, and the reference tier's answer)."""
        if usage is None:
            return
        self.prompt_tokens = (self.prompt_tokens or 0) + usage.prompt_tokens
        self.completion_tokens = (self.completion_tokens or 0) + usage.completion_tokens
        self.cost_usd = (self.cost_usd or 0.0) + usage.cost_usd

    def served(self, request_id: str, prompt_text: str, user: object, latency_s: float) -> Served:
        """The finished request; `user` is the body's OpenAI `user` field (kept only when a non-empty string)."""
        return Served(
            request_id=request_id,
            prompt_text=prompt_text,
            user=user if isinstance(user, str) and user else None,
            tier=self.tier,
            outcome=self.outcome,
            latency_s=latency_s,
            samples=self.samples if self.tier != "none" else 0,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost_usd=self.cost_usd,
        )


@dataclass(frozen=True)
class RouteFacts:
    """The decision's side of a record (`router.Route`'s fields the log keeps), so this module needs no router."""

    score: float | None
    decision: str
    chain: tuple[str, ...]
    artifact: str
    tenant: str | None
    scores: tuple[float, ...] | None = None
    # Per-user profiles (`personalize`): what a rating of this request updates (None: nothing), and whether the
    # user's profile adjusted the choice (the record says so: `score` and `scores` stay the artifact's own).
    profile: ProfileRef | None = None
    personalized: bool = False


def decision_record(route: RouteFacts, served: Served, *, include_prompt: bool, ts: str) -> dict[str, Any]:
    """One `"kind": "decision"` record (the schema in docs/routing.md, "The decision log")."""
    tried = list(route.chain)
    fallbacks = tried[: tried.index(served.tier)] if served.tier in tried else []
    rec: dict[str, Any] = {"kind": "decision", "ts": ts, "request_id": served.request_id}
    if route.tenant is not None:
        rec["tenant"] = route.tenant
    if served.user is not None:
        rec["user"] = served.user
    rec["prompt_sha256"] = Sha256Of(served.prompt_text)
    if include_prompt:
        rec["prompt"] = served.prompt_text
    rec["score"] = route.score
    if route.scores is not None:
        rec["scores"] = list(route.scores)
    if route.personalized:
        rec["personalized"] = True
    rec.update(
        decision=route.decision,
        tier=served.tier,
        samples=served.samples,
        fallbacks=fallbacks,
        artifact=route.artifact,
        outcome=served.outcome,
        latency_ms=round(served.latency_s * 1000, 3),
        tokens={"prompt": served.prompt_tokens, "completion": served.completion_tokens},
        cost_usd=served.cost_usd,
    )
    return rec


def feedback_record(request_id: str, rating: float, source: str, ts: str) -> dict[str, Any]:
    return {"kind": "feedback", "ts": ts, "request_id": request_id, "rating": rating, "source": source}


def parse_feedback(body: object) -> tuple[str, float]:
    """(request_id, rating) from a POST /v1/feedback body; BadRequestError (400) naming the field otherwise."""
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object", param="body")
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise BadRequestError("'request_id' must be a non-empty string", param="request_id")
    rating = body.get("rating")
    # bool is an int in Python; `true` is not a rating.
    if isinstance(rating, bool) or not isinstance(rating, int | float) or not -1.0 <= float(rating) <= 1.0:
        raise BadRequestError("'rating' must be a number from -1 to 1", param="rating")
    unknown = sorted(set(body) - {"request_id", "rating"})
    if unknown:
        raise BadRequestError(f"unknown field {unknown[0]!r}", param=unknown[0])
    return rid, float(rating)


class FeedbackResult(Enum):
    RECORDED = "recorded"
    UNKNOWN = "unknown"
    DUPLICATE = "duplicate"


# Feedback sources, as bits of `_Summary.rated` (a set per request would cost ~200 bytes).
_SOURCES = {"explicit": 1, "requery": 2}


@dataclass(slots=True)
class _Summary:
    tenant: str | None
    # Feedback sources already recorded for this request (bits of _SOURCES).
    rated: int = 0
    # What a rating updates in the user's routing profile (None: no user, or profiles off).
    profile: ProfileRef | None = None


@dataclass(frozen=True)
class RecorderSettings:
    # The decision log's target (a path, or "-" for stdout); None: no log (feedback is still counted).
    target: str | None = None
    include_prompts: bool = False
    recent_requests: int = RECENT_REQUESTS
    requery_keys: int = REQUERY_KEYS
    requery_window_s: float = REQUERY_WINDOW_S


class Recorder:
    """The decision log of one router, the recent requests feedback may name, and the re-query signal.

    Runs on the event loop only (no locks): the log's own queue hands records to its writer thread."""

    def __init__(
        self,
        settings: RecorderSettings,
        *,
        on_drop: Callable[[], None] | None = None,
        on_feedback: Callable[[str, float], None] | None = None,
        on_profile_rating: Callable[[ProfileRef, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], str] = rfc3339_now,
    ) -> None:
        self.settings = settings
        self.on_drop = on_drop
        self.on_feedback = on_feedback
        self.on_profile_rating = on_profile_rating
        self._clock = clock
        self._now = now
        self.log: DecisionLog | None = None
        self._recent: OrderedDict[str, _Summary] = OrderedDict()
        # (user, normalised prompt digest) -> (request id, monotonic time it was answered).
        self._asked: OrderedDict[tuple[str, bytes], tuple[str, float]] = OrderedDict()
        self.apply(settings)

    def apply(self, settings: RecorderSettings) -> None:
        """A new policy: a changed target closes the old log and opens the new one (OSError names a bad path)."""
        if self.log is not None and self.log.config.target == settings.target:
            self.settings = settings
            return
        old, self.log = self.log, None
        if settings.target is not None:
            self.log = DecisionLog(DecisionLogConfig(settings.target), on_drop=self.on_drop)
        self.settings = settings
        if old is not None:
            old.close()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def decision(self, route: RouteFacts, served: Served) -> None:
        """Write the request's decision record, remember it for feedback, and look for an earlier request of the
        same user this one re-asks."""
        ts = self._now()
        if self.log is not None:
            self.log.write(decision_record(route, served, include_prompt=self.settings.include_prompts, ts=ts))
        summary = _Summary(route.tenant, profile=route.profile)
        _bounded_put(self._recent, served.request_id, summary, self.settings.recent_requests)
        who = served.user if served.user is not None else route.tenant
        if who is None:
            return
        key = (who, normalised_digest(served.prompt_text))
        t = self._clock()
        earlier = self._asked.get(key)
        _bounded_put(self._asked, key, (served.request_id, t), self.settings.requery_keys)
        if earlier is None or earlier[0] == served.request_id or t - earlier[1] > self.settings.requery_window_s:
            return
        self._rate(earlier[0], -1.0, "requery", ts)

    def feedback(self, request_id: str, rating: float, tenant: str | None = None) -> FeedbackResult:
        """Explicit feedback on a remembered request. A tenant may rate only its own requests (another tenant's id
        reads as unknown, so ids do not leak across tenants)."""
        summary = self._recent.get(request_id)
        if summary is None or (summary.tenant is not None and summary.tenant != tenant):
            return FeedbackResult.UNKNOWN
        if summary.rated & _SOURCES["explicit"]:
            return FeedbackResult.DUPLICATE
        self._rate(request_id, rating, "explicit", self._now())
        return FeedbackResult.RECORDED

    def _rate(self, request_id: str, rating: float, source: str, ts: str) -> None:
        summary = self._recent.get(request_id)
        if summary is None or summary.rated & _SOURCES[source]:
            return
        summary.rated |= _SOURCES[source]
        if self.on_feedback is not None:
            self.on_feedback(source, rating)
        if summary.profile is not None and self.on_profile_rating is not None:
            self.on_profile_rating(summary.profile, rating)
        if self.log is not None:
            self.log.write(feedback_record(request_id, rating, source, ts))

    def remembered(self) -> tuple[int, int]:
        """(requests remembered, re-query keys held): what the bounds bound."""
        return len(self._recent), len(self._asked)


def _bounded_put(d: OrderedDict[Any, Any], key: Any, value: Any, bound: int) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > bound:
        d.popitem(last=False)
