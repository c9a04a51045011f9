"""Shadow routing and the router canary on the request path (`spec.shadow`, `spec.router.canary`).

Shadow modes (`config.ShadowConfig`):
- Baseline: every routed request is answered by the baseline tier; `Route.decision` keeps the router's own choice
  (what the decision log records), so a week of logs says what the router would have done.
- Mirror: the router's tier answers as usual.

In both, a share of routed requests (`sample_rate_bp`, chosen by a hash of the request id) is judged: the answer the
client got is paired with a second one fetched in the background, and the reward model scores both in one call. The
pair is always (the router's decision, the baseline tier); when the router itself chose the baseline tier, (the
cheapest tier, the baseline tier) instead: those pairs measure what routing everything cheap would lose, the
denominator of the estimated PGR. The background call starts only once the client's answer is complete (the front
end submits it after the last byte), never delays the client, and at most `max_concurrent` run at once: a sampled
request beyond that is dropped, not queued, and counted (`tiergate_router_shadow_dropped_total{reason="overload"}`).

Judgement of a pair where the router chose a tier other than the baseline (`judge`): it *agrees* when the routed
answer scores at least as high as the baseline's, and its *quality loss* is max(0, baseline - routed).

Estimated PGR (performance gap recovered) of the live router against the baseline, per artifact (`ShadowStats`):
with g_i = reward(baseline answer) - reward(cheaper answer) over judged pairs,

    PGR ~ sum of g_i over pairs the router sent to the baseline tier / sum of g_i over all judged pairs

i.e. of the quality an all-cheap deployment would lose against the baseline, the share the router's choices keep.
Both groups are sampled at the same rate, so the ratio of sample sums estimates the ratio of traffic sums. Exact
for two tiers; with more, a request routed to a middle tier counts that tier as its "cheap" answer (the
approximation says so: the middle tier's gap is counted as not recovered). Undefined (not reported) until the
denominator is positive. The gauge is this replica's since it started; the sums themselves are counters
(`tiergate_router_shadow_reward_gap_total{artifact,pair,sign}`), so Prometheus or the operator (status.shadow) can
take the ratio over all replicas and a window.

Canary (`config.CanaryConfig`): `in_canary(request_id, share_bp)` decides which artifact classifies a request, a
pure function of the request id (sha256; the same id is always decided by the same artifact, and the share of a
large set of ids is share_bp / 10000 within sampling error). Metrics carry the deciding artifact as the label
`artifact` (`primary`, `canary`): decisions, shadow agreement, quality loss and estimated PGR side by side.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tiergate_router.decision_records import rfc3339_now
from tiergate_router.errors import RouterError
from tiergate_router.reward import RewardClient, RewardError

if TYPE_CHECKING:
    from tiergate_router.config.types import RouterConfig, ShadowConfig
    from tiergate_router.dispatch import Dispatcher

log = logging.getLogger(__name__)

PRIMARY = "primary"
CANARY = "canary"
ARTIFACT_ROLES = (PRIMARY, CANARY)
BASELINE = "Baseline"
# The `pair` label of the judged and reward-gap counters: the router chose the baseline tier (its answer is paired
# with the cheapest tier's: PGR's numerator), or another tier (paired with the baseline's).
PAIR_BASELINE_VS_CHEAPEST = "baseline_vs_cheapest"
PAIR_ROUTED_VS_BASELINE = "routed_vs_baseline"
MIRROR = "Mirror"
# Longest routed answer kept for judging from a stream (characters): a reward model reads a few thousand tokens at
# most (the client truncates to its context anyway), so more would only be held in memory for nothing.
MAX_JUDGED_CHARS = 64 * 1024
# Quality loss buckets, in reward units (reward models publish logits: differences of a few units are large).
LOSS_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def bucket_of(key: str, salt: str) -> int:
    """A basis point 0..9999 from a stable hash of `key`: the same key always lands in the same bucket. `salt`
    keeps the canary's and the shadow sample's buckets independent of each other."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10000


def in_canary(request_id: str, share_bp: int) -> bool:
    """Whether the canary artifact decides the request with this id (share_bp of all ids)."""
    return bucket_of(request_id, "canary") < share_bp


def shadow_sampled(request_id: str, rate_bp: int) -> bool:
    """Whether the request with this id is judged (rate_bp of all ids)."""
    return bucket_of(request_id, "shadow") < rate_bp


@dataclass(frozen=True)
class ShadowPlan:
    """What shadow routing does with one routed request, decided with the route (`plan`)."""

    mode: str
    baseline: str
    # The tier the router chose (it answers in Mirror mode).
    decided: str
    # The tier that answers the client first in the chain.
    answered: str
    # The tier fetched in the background to judge against, None when the request is not judged.
    other: str | None
    artifact: str = PRIMARY
    # The request's id: the shadow record names it, so the decision log joins the two.
    request_id: str = ""

    @property
    def pair(self) -> tuple[str, str]:
        """(cheaper side, baseline) of the judged pair."""
        cheap = self.decided if self.decided != self.baseline else self.other
        assert cheap is not None
        return cheap, self.baseline


def plan(
    sh: ShadowConfig, tier_names: Sequence[str], decided: str, request_id: str, artifact: str = PRIMARY
) -> ShadowPlan:
    """The shadow plan of a request the router decided for `decided` (pure)."""
    answered = sh.baseline_tier if sh.mode == BASELINE else decided
    other: str | None = None
    if shadow_sampled(request_id, sh.sample_rate_bp):
        cheapest = tier_names[0]
        pair = {decided, sh.baseline_tier} if decided != sh.baseline_tier else {cheapest, sh.baseline_tier}
        rest = pair - {answered}
        other = next(iter(rest)) if len(pair) == 2 and len(rest) == 1 else None
    return ShadowPlan(sh.mode, sh.baseline_tier, decided, answered, other, artifact, request_id)


@dataclass(frozen=True)
class Judgement:
    agree: bool
    quality_loss: float


def judge(reward_routed: float, reward_baseline: float) -> Judgement:
    """A routed answer agrees with the baseline when it scores at least as high; the loss is what it scores less."""
    return Judgement(reward_routed >= reward_baseline, max(0.0, reward_baseline - reward_routed))


@dataclass
class ShadowStats:
    """Running sums of the estimated PGR (module docstring) for one artifact."""

    recovered: float = 0.0
    gap: float = 0.0
    pairs: int = 0

    def add(self, gap: float, *, routed_to_baseline: bool) -> None:
        self.gap += gap
        self.pairs += 1
        if routed_to_baseline:
            self.recovered += gap

    @property
    def pgr(self) -> float | None:
        return self.recovered / self.gap if self.gap > 0 else None


def answer_text(body: bytes) -> str | None:
    """The first choice's text of a complete OpenAI answer body, None when it has none."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    c = choices[0]
    msg = c.get("message")
    text = msg.get("content") if isinstance(msg, dict) else c.get("text")
    return text if isinstance(text, str) else None


@dataclass
class StreamText:
    """Collects the first choice's text from server-sent-event chunks (chat `delta.content` or completion `text`),
    up to MAX_JUDGED_CHARS, for a streamed answer that is judged."""

    parts: list[str] = field(default_factory=list)
    size: int = 0
    _buf: bytes = b""

    def feed(self, chunk: bytes) -> None:
        if self.size >= MAX_JUDGED_CHARS:
            return
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            try:
                obj = json.loads(line[5:])
            except ValueError:
                continue
            choices = obj.get("choices") if isinstance(obj, dict) else None
            if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
                continue
            delta = choices[0].get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choices[0].get("text")
            if isinstance(text, str):
                self.parts.append(text)
                self.size += len(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)[:MAX_JUDGED_CHARS]


class ShadowMetrics:
    """Shadow routing's and the canary's metrics, on the router's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = "tiergate_router"
        r = registry
        by_artifact = ["artifact"]
        self.decisions = Counter(
            f"{p}_artifact_decisions",
            "Routed decisions by the artifact that decided (primary, canary) and the tier",
            [*by_artifact, "tier"],
            registry=r,
        )
        self.agreement = Counter(
            f"{p}_shadow_agreement",
            "Judged pairs where the router chose a cheaper tier than the baseline: agree=true when the routed answer "
            "scored at least as high as the baseline's",
            [*by_artifact, "agree"],
            registry=r,
        )
        self.quality_loss = Histogram(
            f"{p}_shadow_quality_loss",
            "Reward the routed answer lost against the baseline's, max(0, baseline - routed), per judged pair",
            by_artifact,
            buckets=LOSS_BUCKETS,
            registry=r,
        )
        self.pgr = Gauge(
            f"{p}_shadow_pgr_estimate",
            "Estimated performance gap recovered by the live router against the baseline (docs/router.md)",
            by_artifact,
            registry=r,
        )
        self.judged = Counter(
            f"{p}_shadow_judged", "Pairs judged by the reward model", [*by_artifact, "pair"], registry=r
        )
        # The estimator's sums as counters, so PGR can be summed over replicas and taken over a window (the gauge
        # above is one replica's figure since it started). A gap can be negative (the cheaper answer scored higher)
        # and a counter only grows: each sign has its own series, the sum of the gaps is positive - negative.
        self.reward_gap = Counter(
            f"{p}_shadow_reward_gap",
            "Sum of |reward(baseline) - reward(cheaper)| over judged pairs, by the gap's sign (PGR's sums: "
            "docs/router.md)",
            [*by_artifact, "pair", "sign"],
            registry=r,
        )
        self.dropped = Counter(
            f"{p}_shadow_dropped", "Sampled shadow calls not made, by reason", ["reason"], registry=r
        )
        self.errors = Counter(
            f"{p}_shadow_errors", "Shadow calls that judged nothing, by reason", ["reason"], registry=r
        )
        self.in_flight = Gauge(f"{p}_shadow_in_flight", "Background shadow calls in flight", registry=r)


Record = Callable[[dict[str, Any]], None]


class Shadower:
    """The background half of shadow routing for one router: `submit` after a client's answer is complete."""

    def __init__(self, dispatcher: Dispatcher, registry: CollectorRegistry) -> None:
        self.dispatcher = dispatcher
        self.metrics = ShadowMetrics(registry)
        self.stats: dict[str, ShadowStats] = {a: ShadowStats() for a in ARTIFACT_ROLES}
        # Where shadow records go (the decision log's `write`); None: metrics only.
        self.record: Record | None = None
        # Counts what a shadow call used (tier, OpenAI `usage`): the router's token and cost metrics.
        self.account: Callable[[str, object], object] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: RewardClient | None = None
        self._client_key: tuple[str, str | None] | None = None

    @property
    def config(self) -> RouterConfig:
        return self.dispatcher.config

    def reward_client(self, sh: ShadowConfig) -> RewardClient:
        assert sh.reward_url is not None
        key = (sh.reward_url, sh.reward_model)
        if self._client is None or self._client_key != key:
            self._client = RewardClient(sh.reward_url, sh.reward_model, session=self.dispatcher.session)
            self._client_key = key
        return self._client

    def submit(
        self,
        shadow: ShadowPlan | None,
        path: str,
        body: Mapping[str, Any],
        prompt: str,
        answered_tier: str,
        text: str | None,
    ) -> bool:
        """Start judging a complete answer in the background when its plan says so; never waits. False when
        nothing was started (not sampled, the answer came from another tier, no text, or dropped under load)."""
        sh = self.config.shadow
        if shadow is None or shadow.other is None or sh is None:
            return False
        if answered_tier != shadow.answered or text is None:
            self.metrics.dropped.labels("not_comparable").inc()
            return False
        if len(self._tasks) >= sh.max_concurrent:
            self.metrics.dropped.labels("overload").inc()
            return False
        task = asyncio.get_running_loop().create_task(self._judge(sh, shadow, path, dict(body), prompt, text))
        self._tasks.add(task)
        self.metrics.in_flight.set(len(self._tasks))
        task.add_done_callback(self._done)
        return True

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.metrics.in_flight.set(len(self._tasks))

    async def _judge(
        self,
        sh: ShadowConfig,
        shadow: ShadowPlan,
        path: str,
        body: dict[str, Any],
        prompt: str,
        answered_text: str,
    ) -> None:
        other = shadow.other
        assert other is not None
        plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        plain["stream"] = False
        try:
            reply = await self.dispatcher.complete([other], path, plain)
            other_text = answer_text(reply.body) if reply.status == 200 else None
            if self.account is not None and other_text is not None:
                self.account(reply.tier, json.loads(reply.body).get("usage"))
            if other_text is None:
                self.metrics.errors.labels("tier_answer").inc()
                return
            texts = {shadow.answered: answered_text, other: other_text}
            cheap, base = shadow.pair
            scores = await self.reward_client(sh).score(
                prompt, [texts[cheap], texts[base]], timeout_s=sh.reward_timeout_s
            )
        except RewardError as e:
            self.metrics.errors.labels(f"reward_{e.reason}").inc()
            return
        except RouterError as e:
            log.debug("shadow call to %s failed: %s", other, e)
            self.metrics.errors.labels("tier_unavailable").inc()
            return
        self._account(shadow, cheap, base, scores[0], scores[1])

    def _account(self, shadow: ShadowPlan, cheap: str, base: str, r_cheap: float, r_base: float) -> None:
        routed_to_baseline = shadow.decided == shadow.baseline
        m = self.metrics
        a = shadow.artifact
        stats = self.stats[a]
        stats.add(r_base - r_cheap, routed_to_baseline=routed_to_baseline)
        if stats.pgr is not None:
            m.pgr.labels(a).set(stats.pgr)
        rec: dict[str, Any] = {
            "kind": "shadow",
            "ts": rfc3339_now(),
            "request_id": shadow.request_id,
            "mode": shadow.mode,
            "artifact": a,
            "routed_tier": shadow.decided,
            "baseline_tier": base,
        }
        if routed_to_baseline:
            rec.update(reward_routed=r_base, reward_baseline=r_base, agree=True, quality_loss=0.0)
            rec.update(weak_tier=cheap, reward_weak=r_cheap)
        else:
            j = judge(r_cheap, r_base)
            m.agreement.labels(a, str(j.agree).lower()).inc()
            m.quality_loss.labels(a).observe(j.quality_loss)
            rec.update(reward_routed=r_cheap, reward_baseline=r_base, agree=j.agree, quality_loss=j.quality_loss)
        if self.record is not None:
            self.record(rec)
        # Last: once a pair counts as judged, its record and every other figure of it are out.
        pair = PAIR_BASELINE_VS_CHEAPEST if routed_to_baseline else PAIR_ROUTED_VS_BASELINE
        gap = r_base - r_cheap
        m.reward_gap.labels(a, pair, "positive" if gap >= 0 else "negative").inc(abs(gap))
        m.judged.labels(a, pair).inc()

    async def drain(self) -> None:
        """Wait for the background calls in flight (tests and shutdown; requests never wait on them)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._tasks.clear()
