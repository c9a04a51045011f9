"""The router core shared by the HTTP and gRPC front ends: decide a tier for a request, account for the answer.

Front ends stay thin: they validate and translate, then call `Router.route()` and the dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tiergate_router.admission import ByteBudget
from tiergate_router.classifier import Classifier, MicroBatcher, Verdict
from tiergate_router.config import RouterConfig
from tiergate_router.config.types import allowed_candidates
from tiergate_router.decision import choose_multi_tier, choose_tier, fallback_chain
from tiergate_router.decision_log import DecisionLog
from tiergate_router.decision_records import Recorder, RecorderSettings, RouteFacts, Served, Usage
from tiergate_router.dispatch import Dispatcher
from tiergate_router.errors import BadRequestError, ClassifierError
from tiergate_router.metrics import RouterMetrics
from tiergate_router.modality import (
    DECOMPOSE,
    TEXT_ONLY,
    Specialist,
    capable_tiers,
    narrowed,
    refuse_unservable,
    specialists_for,
    unservable,
)
from tiergate_router.personalize import Personalizer, ProfileDraft, user_key
from tiergate_router.shadow import BASELINE, CANARY, PRIMARY, Shadower, ShadowPlan, in_canary, plan
from tiergate_router.tenants import (
    OPEN,
    UNAUTHENTICATED,
    Access,
    Principal,
    TenantGate,
    restrict_chain,
    restrict_choice,
)

log = logging.getLogger(__name__)

# Other names a client may send for a routed answer: vLLM's semantic-router calls its routed model `auto`, so clients
# written for it work unchanged. Listed in /v1/models beside the routed model name.
ROUTED_ALIASES = ("auto",)


@dataclass(frozen=True)
class Route:
    # None when the client forced a tier (no classification happened).
    score: float | None
    # The tier the classifier chose, or "forced" / "classifier_error".
    decision: str
    chain: list[str]
    # What the tenant may use, and whom to charge (tenants.Access); OPEN without tenants.
    access: Access = OPEN
    # Samples to draw on the chosen tier (chain[0]) for best-of-N; 1: one answer, as always.
    samples: int = 1
    # Attachments the chosen tier cannot take, per modality, and the tiers that describe or transcribe them
    # (decompose.py); empty: the chosen tier takes the request as it is.
    specialists: tuple[Specialist, ...] = ()
    # The classifier artifact that decided (its sha256, as tiergate_router_classifier_info reports it); "" when no
    # classifier decided (a forced tier, one tier, a classifier error).
    artifact: str = ""
    # N-tier and candidates artifacts: the artifact's per-tier (per-candidate) predictions, for the decision log.
    scores: tuple[float, ...] | None = None
    # Which artifact decided, as the metrics' `artifact` label: shadow.PRIMARY, or shadow.CANARY (spec.router.canary).
    artifact_role: str = PRIMARY
    # What shadow routing does with this request (spec.shadow); None: not shadowed (off, or not a routed request).
    shadow: ShadowPlan | None = None
    # Per-user profiles (personalize.py): whose N-tier decision this was, for feedback on it; None without a user
    # or profiles. `personalized`: the user's profile adjusted the predictions the choice weighed.
    profile: ProfileDraft | None = None
    personalized: bool = False


class Router:
    def __init__(
        self,
        config: RouterConfig,
        classifier: Classifier,
        metrics: RouterMetrics | None = None,
        *,
        canary_classifier: Classifier | None = None,
    ) -> None:
        self.metrics = metrics or RouterMetrics()
        self.classifier = classifier
        # The canary artifact's classifier (spec.router.canary), loaded at start like the primary one.
        self.canary_classifier = canary_classifier
        if isinstance(classifier, MicroBatcher) and classifier.on_batch is None:
            batch_hist = self.metrics.classifier_batch_size
            classifier.on_batch = lambda n, _seconds: batch_hist.observe(n)
        self.dispatcher = Dispatcher(config, self.metrics)
        self.shadow = Shadower(self.dispatcher, self.metrics.registry)
        self._canary_view = _canary_view(config)
        # Request bodies held at once, by both front ends (admission.py); resized when a reload changes the limit.
        self.body_budget = ByteBudget(config.max_inflight_body_bytes)
        self.gate = TenantGate(config.tenancy, self.metrics.registry)
        self.metrics.set_predicted_mix(config.tier_names, config.predicted_mix_bp)
        self._background: list[asyncio.Task[None]] = []
        # Charges to tenants still being written to the limit store (kept referenced until done).
        self._charges: set[asyncio.Task[None]] = set()
        self._size_cache(config)
        # The sha256 of the classifier artifact serving (cmd_serve sets it, as it reports classifier_info); routes
        # the classifier decided carry it, so the decision log says which artifact decided.
        self.artifact_id = "none"
        # The canary artifact's sha256 (spec.router.canary; cmd_serve sets it too).
        self.canary_artifact_id = "none"
        m = self.metrics
        self.recorder = Recorder(
            _recorder_settings(config),
            on_drop=m.decision_log_dropped.inc,
            on_feedback=lambda source, _rating: m.feedback.labels(source).inc(),
            on_profile_rating=lambda ref, rating: self.personalizer.observe(ref, rating),
        )
        # Shadow judgements go to the decision log beside the decision records (joined by request id).
        self.shadow.record = self._write_record
        # What shadow calls use is counted in the tokens and cost metrics (charged to no tenant: the policy's cost).
        self.shadow.account = lambda tier, usage: self.account_usage(tier, usage)
        self.personalizer = Personalizer(m)
        self.personalizer.apply(config)

    @property
    def decision_log(self) -> DecisionLog | None:
        """The decision log (None when off): other record kinds (shadow judgements) are written to it too."""
        return self.recorder.log

    def _write_record(self, record: dict[str, Any]) -> None:
        log = self.decision_log
        if log is not None:
            log.write(record)

    def record(self, route: Route, served: Served) -> None:
        """The request is over: its decision record, and what feedback on it needs (`decision_records`)."""
        facts = RouteFacts(
            score=route.score,
            decision=route.decision,
            chain=tuple(route.chain),
            artifact=route.artifact,
            tenant=route.access.tenant,
            scores=route.scores,
            profile=self.personalizer.ref(route.profile, route.scores, served.tier),
            personalized=route.personalized,
        )
        self.recorder.decision(facts, served)

    @property
    def config(self) -> RouterConfig:
        return self.dispatcher.config

    async def start(self, *, scrape_interval_s: float = 1.0) -> None:
        await self.dispatcher.start()
        await self.gate.start()
        if self.config.saturation_waiting > 0:
            self._background.append(
                asyncio.get_running_loop().create_task(self.dispatcher.run_scraper(scrape_interval_s))
            )

    async def aclose(self) -> None:
        for t in self._background:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._background.clear()
        await self.gate.aclose()
        await self.shadow.aclose()
        await self.dispatcher.aclose()
        await self.classifier.aclose()
        if self.canary_classifier is not None:
            await self.canary_classifier.aclose()
        self.recorder.close()

    def apply_config(self, config: RouterConfig) -> None:
        """Swap the policy; requests already routed keep their chain and endpoints."""
        self.dispatcher.apply_config(config)
        self.gate.apply(config.tenancy)
        self._canary_view = _canary_view(config)
        self._size_cache(config)
        self.body_budget.resize(config.max_inflight_body_bytes)
        self.metrics.set_predicted_mix(config.tier_names, config.predicted_mix_bp)
        self.recorder.apply(_recorder_settings(config))
        self.personalizer.apply(config)

    def _size_cache(self, config: RouterConfig) -> None:
        if isinstance(self.classifier, MicroBatcher):
            self.classifier.cache.resize(config.classifier_cache_entries, config.classifier_cache_bytes)

    @property
    def ready(self) -> bool:
        """Whether the router can serve: some tier has at least one endpoint. A static URL counts as one without a
        probe (an external API, or a Service's DNS name without discovery): its failures are the breakers' and the
        fallback chain's to handle, and a readiness that followed a hosted API's blips would take every router
        replica out of its Service at once. Tiers discovered through EndpointSlices count their ready pods. A tier
        that may be scaled to zero counts as ready without any: the requests routed to it are the demand that wakes
        it (held or falling back meanwhile), and a router out of its Service would never see them."""
        if any(t.scales_to_zero for t in self.config.tiers):
            return True
        return any(pool.endpoints for pool in self.dispatcher.pools.values())

    def _routed_names(self) -> list[str]:
        """The names that ask for a routed answer: the policy's routed model name, and `auto` (what clients written
        for vLLM's semantic-router send) unless a tier answers to that name, since a tier is never shadowed."""
        cfg = self.config
        tier_names = {n for t in cfg.tiers for n in (t.name, t.served_model)}
        aliases = [a for a in ROUTED_ALIASES if a != cfg.routed_model_name and a not in tier_names]
        return [cfg.routed_model_name, *aliases]

    def model_names(self) -> list[str]:
        return [*self._routed_names(), *self.config.tier_names]

    def resolve_model(self, model: str) -> str | None:
        """None = route with the classifier; a tier name = the client forced that tier. Unknown -> 404."""
        cfg = self.config
        if model == cfg.routed_model_name:
            return None
        for t in cfg.tiers:
            if model in (t.name, t.served_model):
                return t.name
        routed = self._routed_names()
        if model in routed:
            return None
        raise BadRequestError(
            f"The model '{model}' does not exist; use {' or '.join(repr(n) for n in routed)} for routed "
            f"requests or a tier name ({', '.join(cfg.tier_names)})",
            status=404,
            param="model",
            code="model_not_found",
        )

    async def route(
        self,
        model: str,
        prompt_text: str,
        principal: Principal = UNAUTHENTICATED,
        modalities: frozenset[str] = TEXT_ONLY,
        *,
        request_id: str = "",
        user: object = None,
    ) -> Route:
        """Decide the tier chain for a request. With a tenant (`principal`, from `gate.authenticate`) the gate
        admits it first (403 for a tier it may not name, 429 over a limit or budget: TenantRefusedError) and the
        decision keeps to what it may use (`tenants.restrict_choice`, `restrict_chain`). A request with images or
        audio (`modalities`, from `modality.find_attachments`) is routed among the tiers that accept them all
        (RouteToCapableTier), and what the chosen tier cannot take goes to specialists (`Route.specialists`).
        `request_id` chooses the artifact under a canary and the shadow sample (shadow.in_canary,
        shadow.shadow_sampled). `user` is the request's OpenAI `user` field: with per-user profiles on, an N-tier
        decision is adjusted by that user's own ratings (`personalize`)."""
        cfg = self.config
        forced = self.resolve_model(model)
        if modalities != TEXT_ONLY:
            missing = unservable(cfg.tier_modalities, modalities)
            if missing:
                raise refuse_unservable(missing)
        access = await self.gate.admit(principal, forced)
        # Without an id (a front end that has none) each request draws its own: assignment stays a fair sample.
        request_id = request_id or uuid.uuid4().hex
        key = user_key(access.tenant, user)
        if modalities == TEXT_ONLY:
            return await self._routed(cfg, forced, prompt_text, access, request_id, key)
        return await self._routed_multimodal(cfg, forced, prompt_text, access, modalities, request_id, key)

    async def _routed_multimodal(
        self,
        cfg: RouterConfig,
        forced: str | None,
        prompt_text: str,
        access: Access,
        needed: frozenset[str],
        request_id: str,
        key: str | None = None,
    ) -> Route:
        """Routing with attachments: the choice kept to tiers that accept every modality present (the tenant's, when
        it has tiers) unless none does or the policy says Decompose; then the specialists for the rest."""
        routed_access = access
        if forced is None and cfg.attachments.mixed_requests != DECOMPOSE:
            capable = narrowed(access.tiers, capable_tiers(cfg.tier_modalities, needed))
            if capable is not None:
                routed_access = dataclasses.replace(access, tiers=capable)
        route = await self._routed(cfg, forced, prompt_text, routed_access, request_id, key)
        specialists = specialists_for(cfg.tier(route.chain[0]).modalities, needed, cfg.tier_modalities, access.tiers)
        if specialists:
            # The answering tier gets text only once the parts are described: any tier of the usual chain will do.
            chain = restrict_chain(fallback_chain(route.chain[0], cfg.tier_names, cfg.fallback_order), access)
        else:
            chain = [t for t in route.chain if needed <= cfg.tier(t).modalities]
        shadow = self._judged_with_attachments(cfg, route.shadow, needed, chain[0], described=bool(specialists))
        return dataclasses.replace(route, chain=chain, access=access, specialists=specialists, shadow=shadow)

    def _judged_with_attachments(
        self, cfg: RouterConfig, shadow: ShadowPlan | None, needed: frozenset[str], first: str, *, described: bool
    ) -> ShadowPlan | None:
        """The shadow plan of a request with attachments: not judged (and counted) when the background call would
        carry them as they are (`described`: specialists turned them into text) to a tier that cannot take them, or
        when the tier meant to answer (Baseline's baseline) cannot and another capable tier answers first."""
        other = None if shadow is None else shadow.other
        if shadow is None or other is None:
            return shadow
        if shadow.answered == first and (described or needed <= cfg.tier(other).modalities):
            return shadow
        self.shadow.metrics.dropped.labels("attachments").inc()
        return dataclasses.replace(shadow, other=None)

    async def _routed(
        self,
        cfg: RouterConfig,
        forced: str | None,
        prompt_text: str,
        access: Access,
        request_id: str,
        key: str | None = None,
    ) -> Route:
        """The route of the tier choice: the classifier's (or the canary's) decision, kept to what the tenant may use,
        then, under spec.shadow, the baseline answering (Baseline mode) and the plan of what is judged."""
        route = await self._route(cfg, forced, prompt_text, access, request_id, key)
        if access is not OPEN:
            route = self._restrict(cfg, forced, route, access)
        if cfg.shadow is None or forced is not None:
            return route
        if route.decision in cfg.tier_names:
            return self._shadowed(cfg, route, request_id)
        if route.decision == "classifier_error" and cfg.shadow.mode == BASELINE:
            # Baseline mode answers every routed request from the baseline, also when no decision was made.
            return dataclasses.replace(route, chain=self._baseline_chain(cfg, cfg.shadow.baseline_tier, route.access))
        return route

    @staticmethod
    def _baseline_chain(cfg: RouterConfig, first: str, access: Access) -> list[str]:
        chain = fallback_chain(first, cfg.tier_names, cfg.fallback_order)
        return chain if access is OPEN else restrict_chain(chain, access)

    def _shadowed(self, cfg: RouterConfig, route: Route, request_id: str) -> Route:
        """A routed request under spec.shadow: Baseline mode answers from the baseline tier (the decision stays the
        router's, for the log); both modes carry the plan of what is judged in the background."""
        sh = cfg.shadow
        assert sh is not None
        shadow = plan(sh, cfg.tier_names, route.chain[0], request_id, route.artifact_role)
        if shadow.answered == route.chain[0]:
            return dataclasses.replace(route, shadow=shadow)
        chain = self._baseline_chain(cfg, shadow.answered, route.access)
        return dataclasses.replace(route, chain=chain, samples=samples_without_heads(cfg, chain[0]), shadow=shadow)

    def _restrict(self, cfg: RouterConfig, forced: str | None, route: Route, access: Access) -> Route:
        # A tier the client named (and may use) is served as named, also while the budget is low; once it is spent
        # with CheapestTier, the cheapest allowed tier serves whatever was asked.
        chosen = route.chain[0]
        if forced is None or access.cheapest_only:
            chosen = restrict_choice(chosen, cfg.tier_names, access)
        chain = restrict_chain(fallback_chain(chosen, cfg.tier_names, cfg.fallback_order), access)
        decision = "budget_spent" if access.cheapest_only else "budget_low" if access.cheaper else route.decision
        # The samples were chosen for the classifier's tier; a tier the tenant's limits chose instead draws one.
        samples = route.samples if chain[0] == route.chain[0] else 1
        return dataclasses.replace(route, decision=decision, chain=chain, access=access, samples=samples)

    async def _route(
        self,
        cfg: RouterConfig,
        forced: str | None,
        prompt_text: str,
        access: Access,
        request_id: str = "",
        key: str | None = None,
    ) -> Route:
        if forced is not None:
            return Route(None, "forced", fallback_chain(forced, cfg.tier_names, cfg.fallback_order))
        if len(cfg.tiers) == 1 or access.cheapest_only:
            # A spent budget (CheapestTier) draws one sample: best-of-N multiplies what is spent.
            only = cfg.tiers[0].name
            return Route(None, only, [only], samples=1 if access.cheapest_only else samples_without_heads(cfg, only))
        role, classifier = PRIMARY, self.classifier
        canary = cfg.canary
        if canary is not None and self.canary_classifier is not None and in_canary(request_id, canary.share_bp):
            role, classifier = CANARY, self.canary_classifier
            cfg = self._canary_view or cfg
            # Profiles are residuals against the primary artifact's head: the canary's predictions neither use nor
            # feed them (no draft, so no adjustment and no rating observed).
            key = None
        t0 = time.perf_counter()
        draft, personalized = None, False
        try:
            verdict = (await classifier.score([prompt_text]))[0]
            if cfg.candidates is not None:
                chosen, score, samples = _decide_candidate(verdict, cfg, prompt_text, access)
            else:
                chosen, score, draft, personalized = self._decide_for_user(verdict, cfg, access, key)
                samples = samples_without_heads(cfg, chosen)
        except ClassifierError as e:
            # Availability over cost: without a score the strongest tier is the one sure to answer well.
            log.warning("classification failed, routing to the strongest tier: %s", e)
            strongest = cfg.tiers[-1].name
            chain = fallback_chain(strongest, cfg.tier_names, cfg.fallback_order)
            return Route(None, "classifier_error", chain, artifact_role=role)
        self.metrics.classification_seconds.observe(time.perf_counter() - t0)
        self.shadow.metrics.decisions.labels(role, chosen).inc()
        self.metrics.score.observe(score)
        if cfg.best_of_n is not None:
            self.metrics.best_of_n_samples.labels(chosen).observe(samples)
        chain = fallback_chain(chosen, cfg.tier_names, cfg.fallback_order)
        scores = tuple(float(v) for v in verdict) if isinstance(verdict, tuple) else None
        return Route(
            score,
            chosen,
            chain,
            samples=samples,
            artifact=self.canary_artifact_id if role == CANARY else self.artifact_id,
            scores=scores,
            profile=draft,
            personalized=personalized,
            artifact_role=role,
        )

    def _decide_for_user(
        self, verdict: Verdict, cfg: RouterConfig, access: Access, key: str | None
    ) -> tuple[str, float, ProfileDraft | None, bool]:
        """`_decide`, and with per-user profiles the user's adjusted choice (`personalize`): (tier, score, what
        feedback on the request needs, whether the user's profile adjusted the choice)."""
        chosen, score = self._decide(verdict, cfg, access)
        if not isinstance(verdict, tuple):
            return chosen, score, None, False
        draft = self.personalizer.draft(key, cfg)
        # Not on a low budget's decision: the budget decides that one (and labels it budget_low).
        adjusted = None if access.cheaper else self.personalizer.adjust(draft, verdict)
        if adjusted is None:
            return chosen, score, draft, False
        personal, score = self._decide(verdict, cfg, access, adjusted)
        self.personalizer.counted(personal != chosen)
        return personal, score, draft, True

    @staticmethod
    def _decide(
        verdict: Verdict, cfg: RouterConfig, access: Access = OPEN, quality: Sequence[float] | None = None
    ) -> tuple[str, float]:
        """(chosen tier, score). Two tiers: the score against the thresholds. N tiers: the artifact's choice by
        cost weight (the tenant's, when it has one), among the tiers the tenant may use, and the score is the
        chosen tier's predicted quality; `quality` (a user's adjusted predictions) replaces the verdict in the
        choice, while the score stays the artifact's own prediction (what the decision log and calibration read)."""
        mt = cfg.multi_tier
        if mt is None:
            if isinstance(verdict, tuple):
                raise ClassifierError("an N-tier classifier's output reached a two-tier config")
            score = min(max(float(verdict), 0.0), 1.0)
            return choose_tier(score, cfg.tier_names, cfg.thresholds_bp), score
        if not isinstance(verdict, tuple) or len(verdict) <= max(mt.columns):
            raise ClassifierError("a two-tier score reached an N-tier config")
        served = [i for i, t in enumerate(cfg.tiers) if access.tiers is None or t.name in access.tiers]
        if not served:
            served = list(range(len(cfg.tiers)))  # restrict_choice refuses this tenant with 403
        # A tenant's weight is against the policy's prices; the choice weighs `mt.prices` (MultiTier.price_scale).
        weight = mt.cost_weight_bp if access.cost_weight_bp is None else round(access.cost_weight_bp * mt.price_scale)
        j, _ = choose_multi_tier(
            verdict if quality is None else quality, mt.prices, [mt.columns[i] for i in served], weight
        )
        return cfg.tiers[served[j]].name, float(verdict[mt.columns[served[j]]])

    def account_usage(self, tier: str, usage: object, access: Access = OPEN) -> Usage | None:
        """Count tokens and estimated cost from an OpenAI `usage` object (ignored when malformed), and charge them to
        the request's tenant (`gate.charge`, a task whose first step writes its Redis command: on the loop's next turn,
        before anything read after this). Returns what it counted (None: nothing, the usage was malformed)."""
        if not isinstance(usage, dict):
            return None
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not isinstance(p, int) or not isinstance(c, int) or p < 0 or c < 0:
            return None
        try:
            t = self.config.tier(tier)
        except KeyError:
            return None
        self.metrics.tokens.labels(tier, "prompt").inc(p)
        self.metrics.tokens.labels(tier, "completion").inc(c)
        dollars = (p * t.input_price_per_mtok + c * t.output_price_per_mtok) / 1e6
        self.metrics.cost.labels(tier).inc(dollars)
        if access.tenant is not None:
            self._charges.add(charge := asyncio.get_running_loop().create_task(self.gate.charge(access, p, c, dollars)))
            charge.add_done_callback(self._charges.discard)
        return Usage(p, c, dollars)


def _recorder_settings(config: RouterConfig) -> RecorderSettings:
    return RecorderSettings(target=config.decision_log, include_prompts=config.decision_log_prompts)


def _canary_view(cfg: RouterConfig) -> RouterConfig | None:
    """The config the canary artifact decides with: the primary's, with the canary's decision knobs (made once per
    config, not per request)."""
    c = cfg.canary
    if c is None:
        return None
    return dataclasses.replace(
        cfg, thresholds_bp=c.thresholds_bp, multi_tier=c.multi_tier, candidates=c.candidates, canary=None
    )


def samples_without_heads(cfg: RouterConfig, chosen: str) -> int:
    """The documented rule for classifiers without candidate heads (two_tier and multi_tier artifacts, the shipped
    defaults): a prompt the classifier sends to the best-of-N tier gets maxSamples samples, any other tier one."""
    b = cfg.best_of_n
    return b.max_samples if b is not None and chosen == b.tier else 1


def _decide_candidate(
    verdict: Verdict, cfg: RouterConfig, prompt_text: str, access: Access = OPEN
) -> tuple[str, float, int]:
    """(tier, score, n) with a `candidates` artifact: `tiergate.routing.candidates.choose_candidate` over the
    allowed candidates (`allowed_candidates`: served, and n > 1 only on the best-of-N tier within maxSamples; with
    a tenant, only on its tiers, at its cost weight when it has one); the score is the chosen candidate's head
    output."""
    from tiergate.routing.candidates import choose_candidate, input_tokens
    from tiergate.routing.errors import RoutingError

    cr = cfg.candidates
    assert cr is not None
    if not isinstance(verdict, tuple) or len(verdict) != len(cr.candidates):
        raise ClassifierError("the classifier's output does not match the candidates artifact")
    try:
        allowed = allowed_candidates(cfg)
        if access.tiers is not None:
            allowed = tuple(
                ok and t is not None and cfg.tiers[t].name in access.tiers
                for ok, t in zip(allowed, cr.tier_of, strict=True)
            )
        weight = cr.cost_weight_bp if access.cost_weight_bp is None else access.cost_weight_bp
        k = choose_candidate(verdict, cr.candidates, input_tokens(prompt_text), weight, allowed)
    except (ValueError, RoutingError) as e:
        raise ClassifierError(f"no candidate to choose: {e}") from e
    tier_index = cr.tier_of[k]
    assert tier_index is not None  # choose_candidate never picks a disallowed candidate
    return cfg.tiers[tier_index].name, float(verdict[k]), cr.candidates[k].n


# Longest partial SSE line kept while scanning for usage. A usage event is a few hundred bytes; a tier that streams
# a line longer than this (a huge token, or no newlines at all) has its line skipped rather than buffered whole.
MAX_SSE_LINE = 64 * 1024


class SSEUsageScanner:
    """Finds the `usage` object in an OpenAI server-sent-event stream fed chunk by chunk (chunks may split
    lines anywhere), so streamed requests are accounted like non-streamed ones when the backend reports usage.
    It keeps at most MAX_SSE_LINE bytes of an unfinished line."""

    def __init__(self) -> None:
        self._buf = b""
        self._skipping = False
        self.usage: dict[str, Any] | None = None
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        # While skipping, the first line to end is the rest of the line too long to keep.
        skip_first, self._skipping = self._skipping, self._skipping and not lines
        if len(self._buf) > MAX_SSE_LINE:
            self._buf = b""
            self._skipping = True
        for i, line in enumerate(lines):
            if i == 0 and skip_first:
                continue
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            self.events += 1
            data = line[5:].strip()
            if b'"usage"' not in data or data == b"[DONE]":
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                self.usage = obj["usage"]
