"""Prometheus metrics of one router instance, on a registry of its own (no module-level collectors).

Names follow Prometheus conventions: `tiergate_router_` prefix, base units (seconds, dollars), `_total` for
counters. Label sets stay small and bounded: tier names come from the policy, `decision` is the tier the
classifier chose (or `forced` when the client named a tier), `outcome` is one of OUTCOMES.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

OUTCOMES = ("success", "client_error", "upstream_error", "unavailable", "deadline_exceeded", "cancelled")
# Latency buckets from 0.5 ms: classification and router overhead live in the low milliseconds, generation in
# seconds; one bucket set covers both so that dashboards can compare them.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))
# Best-of-N: samples per request (1..16, the policy's bound).
SAMPLE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)
# Reward scores have no common scale (a logit of one reward model, a probability of another): symmetric buckets
# around 0 that resolve both the usual logit range (a few units) and a probability's [0, 1]. With buckets below 0
# the client exports no `_sum` (OpenMetrics: a sum of signed values is no counter), only the buckets and count.
REWARD_BUCKETS = (-10.0, -5.0, -2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        p = "tiergate_router"
        self.requests = Counter(
            f"{p}_requests",
            "Client requests by answering tier, classifier decision and outcome",
            ["tier", "decision", "outcome"],
            registry=r,
        )
        self.score = Histogram(
            f"{p}_score", "Router score (probability the strong tier is needed)", buckets=SCORE_BUCKETS, registry=r
        )
        self.classification_seconds = Histogram(
            f"{p}_classification_seconds",
            "Time to classify one prompt, queueing for a batch included",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.classifier_batch_size = Histogram(
            f"{p}_classifier_batch_size", "Prompts scored per classifier batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.upstream_seconds = Histogram(
            f"{p}_upstream_seconds",
            "Time from sending to a tier to its full response (or stream end)",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            f"{p}_time_to_first_token_seconds",
            "Time from the client request to the first streamed token",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_seconds = Histogram(
            f"{p}_request_duration_seconds",
            "End-to-end time of a client request in the router",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(f"{p}_tokens", "Tokens reported by tiers", ["tier", "kind"], registry=r)
        self.cost = Counter(
            f"{p}_estimated_cost_dollars", "Estimated spend from token counts and tier prices", ["tier"], registry=r
        )
        self.fallbacks = Counter(
            f"{p}_fallbacks", "Requests moved from one tier to the next", ["from_tier", "to_tier", "reason"], registry=r
        )
        self.retries = Counter(
            f"{p}_retries", "Requests retried on another endpoint of the same tier", ["tier", "reason"], registry=r
        )
        self.retry_overflow = Counter(
            f"{p}_retry_budget_exhausted",
            "Failed tries not retried because the retry budget was spent (Envoy's upstream_rq_retry_overflow)",
            ["tier"],
            registry=r,
        )
        self.try_timeouts = Counter(
            f"{p}_try_timeouts",
            "Tries cut short by a time limit: the per-try timeout, or the request's deadline",
            ["tier", "limit"],
            registry=r,
        )
        self.breaker_state = Gauge(
            f"{p}_circuit_breaker_state",
            "Circuit breaker per endpoint: 0 closed, 1 half-open, 2 open",
            ["tier", "endpoint"],
            registry=r,
        )
        self.endpoints = Gauge(f"{p}_endpoints", "Known backend endpoints per tier", ["tier"], registry=r)
        self.outstanding = Gauge(f"{p}_outstanding_requests", "Requests in flight to each tier", ["tier"], registry=r)
        # The demand a tier's autoscaler scales on (prometheus-adapter serves it as the External metric of the same
        # name): counted from the routing decision, so it leads the tier's own queue, and it includes requests that
        # wait at the router (e.g. for a tier scaled to zero) where `outstanding` counts only tries sent.
        self.tier_demand = Gauge(
            f"{p}_tier_demand",
            "Requests routed to each tier (their chosen tier) and not yet finished, waiting at the router included",
            ["tier"],
            registry=r,
        )
        self.holds = Counter(
            f"{p}_holds",
            "Requests held for their tier while it had no endpoint (whenScaledToZero Hold), by how the hold ended: "
            "endpoint (one appeared), expired (maxHoldSeconds passed: fallback) or deadline (the request's own)",
            ["tier", "outcome"],
            registry=r,
        )
        self.policy_reloads = Counter(f"{p}_policy_reloads", "Policy file reloads by result", ["result"], registry=r)
        # The operating point's prediction (RouterConfig.predicted_mix_bp), as a ratio: the operator reads it next to
        # tiergate_router_requests_total to write the policy's status.observedMix and its MixDrift condition.
        self.predicted_share = Gauge(
            f"{p}_predicted_share",
            "Share of routed requests (0..1) the classifier's calibration predicts for each tier at the current "
            "operating point; absent without a prediction",
            ["tier"],
            registry=r,
        )
        # When this process started (as process_start_time_seconds, which a registry of our own does not carry): a
        # reader of the counters tells a restart (counters from zero) from a quiet period by it.
        self.start_time = Gauge(f"{p}_start_time_seconds", "Start time of this router process (Unix time)", registry=r)
        self.start_time.set_to_current_time()
        # An info metric (value 1): which artifact this process serves, so a rollout that changed it can be seen.
        self.classifier_info = Gauge(
            f"{p}_classifier_info",
            "The classifier artifact this router serves (read at start): its sha256, kind and file",
            ["sha256", "kind", "source"],
            registry=r,
        )

        # Best-of-N (spec.bestOfN): what was chosen, what the reward model said, and when it could not be used.
        self.best_of_n_samples = Histogram(
            f"{p}_best_of_n_samples",
            "Samples chosen per routed request, by the tier chosen (1 = no best-of-N), while best-of-N is configured",
            ["tier"],
            buckets=SAMPLE_BUCKETS,
            registry=r,
        )
        self.reward_score = Histogram(
            f"{p}_reward_score", "Reward model scores of best-of-N samples", buckets=REWARD_BUCKETS, registry=r
        )
        self.reward_seconds = Histogram(
            f"{p}_reward_seconds",
            "Time of one batched reward call (all samples of a request), failed ones included",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.reward_errors = Counter(
            f"{p}_reward_errors", "Reward calls that gave no usable scores, by reason", ["reason"], registry=r
        )
        self.best_of_n_escalations = Counter(
            f"{p}_best_of_n_escalations",
            "Best-of-N requests answered by the reference tier instead, by reason (a reward error's reason, or "
            "below_min_reward)",
            ["reason"],
            registry=r,
        )
        self.best_of_n_skipped = Counter(
            f"{p}_best_of_n_skipped",
            "Requests chosen for best-of-N that were answered without reranking, by reason (tier_ignored_n: the "
            "tier sent one choice back; client_n: the client asked for n itself; fallback: another tier answered)",
            ["tier", "reason"],
            registry=r,
        )
        # Multimodal requests (modality.py, decompose.py): few labels by construction (3 modalities, the tiers,
        # 2 modes, a handful of outcomes).
        self.attachments = Counter(
            f"{p}_attachments",
            "Image and audio parts of chat requests, by modality and how they were served (routed: the answering "
            "tier took them; decomposed: a specialist tier described or transcribed them; refused: a 4xx)",
            ["modality", "handling"],
            registry=r,
        )
        self.decomposition_steps = Counter(
            f"{p}_decomposition_steps",
            "Specialist calls of decomposed requests, by modality, specialist tier (none when no tier answered) and "
            "outcome (success, failed, timeout)",
            ["modality", "tier", "outcome"],
            registry=r,
        )
        self.decomposition_seconds = Histogram(
            f"{p}_decomposition_seconds",
            "Time of each decomposition step: one specialist call (step=image/audio) and all of a request's "
            "specialist calls together (step=all), before the answering tier is asked",
            ["step"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decision_log_dropped = Counter(
            f"{p}_decision_log_dropped",
            "Decision log records dropped because the writer's queue was full (a slow disk or log collector)",
            registry=r,
        )
        self.feedback = Counter(
            f"{p}_feedback", "Feedback recorded on answers, by source (explicit, requery)", ["source"], registry=r
        )
        self.user_profiles = Gauge(
            f"{p}_user_profiles", "Users with a routing profile in this router's table (personalization)", registry=r
        )
        self.user_profile_evictions = Counter(
            f"{p}_user_profile_evictions",
            "User profiles replaced by another user's (their set of the table was full: least recently used first)",
            registry=r,
        )
        self.personalized_decisions = Counter(
            f"{p}_personalized_decisions",
            "N-tier decisions a user's routing profile adjusted, by whether the adjustment changed the tier chosen",
            ["changed"],
            registry=r,
        )

    def set_predicted_mix(self, tiers: tuple[str, ...], shares_bp: tuple[int, ...] | None) -> None:
        """Publish a config's predicted mix (basis points per tier), replacing the previous one."""
        self.predicted_share.clear()
        for tier, bp in zip(tiers, shares_bp or (), strict=False):
            self.predicted_share.labels(tier).set(bp / 10_000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
