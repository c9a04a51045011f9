"""The OpenAI-compatible HTTP front end (aiohttp): /v1/chat/completions, /v1/completions, /v1/models, /metrics,
/health, /ready. Handlers only translate: validation is in `validation`, decisions in `router`, sending in
`dispatch`.

Every response carries `x-tiergate-tier` (the tier that answered, or `none`), `x-tiergate-tiers` (the tiers that
contributed, comma-separated: the answering tier first, then the specialists that described or transcribed
attachments for it; `none` when no tier answered) and `x-tiergate-samples` (the samples
the answer was chosen from: 1 without best-of-N, 0 when no tier answered); routed answers also carry
`x-tiergate-score`, `x-tiergate-decision` and `x-tiergate-fallback` (and `x-tiergate-escalation` when best-of-N
handed the request to the reference tier), and non-streaming JSON answers an extra top-level `tiergate` object with
the same facts (OpenAI clients ignore unknown fields). Every response, errors included, carries `x-request-id`: the
client's own when it sent a sane one (`decision_records.request_id`), else a new one; that id names the request in
the decision log and in POST /v1/feedback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from tiergate_router.admission import BudgetTimeout, ByteBudget
from tiergate_router.best_of_n import ESCALATION_HEADER, SAMPLES_HEADER, Answer, BestOfN, chosen, wants_best_of_n
from tiergate_router.decision_records import (
    MAX_FEEDBACK_BYTES,
    REQUEST_ID_HEADER,
    FeedbackResult,
    Tally,
    parse_feedback,
    request_id,
)
from tiergate_router.decompose import TIERS_HEADER, Decomposer, SpecialistFailedError
from tiergate_router.errors import (
    BadRequestError,
    NoTierAvailableError,
    TenantRefusedError,
    UpstreamStreamError,
    outcome_of,
)
from tiergate_router.metrics import CONTENT_TYPE
from tiergate_router.modality import TEXT_ONLY, Attachment, check_attachments, find_attachments, modalities_of
from tiergate_router.openai_server import (
    CompletionStream,
    build_openai_app,
    error_response,
    models_body,
    sse_event,
    wants_usage,
)
from tiergate_router.router import Route, Router, SSEUsageScanner
from tiergate_router.shadow import StreamText, answer_text
from tiergate_router.tenants import Principal
from tiergate_router.validation import ParsedRequest, decode_json_object, parse_chat, parse_completion

log = logging.getLogger(__name__)

ROUTER_KEY: web.AppKey[Router] = web.AppKey("router", Router)
BUDGET_KEY: web.AppKey[ByteBudget] = web.AppKey("body_budget", ByteBudget)
TIER_HEADER = "x-tiergate-tier"
# A client's own deadline in milliseconds (like Envoy's x-envoy-upstream-rq-timeout-ms): it can shorten the
# router's deadline for this request (spec.router.timeouts.requestSeconds), never lengthen it.
TIMEOUT_HEADER = "x-tiergate-timeout-ms"
# On every answer that no tier gave: errors, /v1/models, /metrics, /health, /ready.
NO_TIER: Mapping[str, str] = {TIER_HEADER: "none", TIERS_HEADER: "none", SAMPLES_HEADER: "0"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("request_id", str)


def request_id_of(request: web.Request) -> str:
    """This request's id: the client's sane `x-request-id`, else a new one; the same on every call."""
    rid = request.get(REQUEST_ID_KEY)
    if rid is None:
        rid = request[REQUEST_ID_KEY] = request_id(request.headers.get(REQUEST_ID_HEADER))
    return rid


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp's on_response_prepare: runs before any response's headers go out, streams and errors included."""
    response.headers[REQUEST_ID_HEADER] = request_id_of(request)


def _from_bad_request(e: BadRequestError) -> web.Response:
    return error_response(e.status, e.message, type_=e.type, param=e.param, code=e.code, headers=NO_TIER)


def _refused(e: TenantRefusedError) -> web.Response:
    """A tenant refusal: OpenAI's error body; Retry-After (seconds) on 429/503 and `x-tiergate-limit` naming the limit
    hit; 401 also carries WWW-Authenticate, as RFC 6750 asks."""
    headers = dict(NO_TIER)
    if e.retry_after_s is not None:
        headers["Retry-After"] = str(e.retry_after_s)
    if e.limit is not None:
        headers["x-tiergate-limit"] = e.limit
    if e.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tiergate"'
    return error_response(e.status, e.message, type_=e.type, param=e.param, code=e.code, headers=headers)


@web.middleware
async def _tier_header_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Last line of defence: no request ever ends in a bare 500 page or an unhandled exception."""
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        # Routing errors from aiohttp itself (404 path, 405 method): OpenAI-style body, same status.
        return error_response(e.status, e.reason or "request failed", code=str(e.status), headers=NO_TIER)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return error_response(
            500, "internal router error", type_="server_error", code="internal_error", headers=NO_TIER
        )
    if not resp.prepared:
        for name, value in NO_TIER.items():
            resp.headers.setdefault(name, value)
    return resp


def _admission(router: Router, budget: ByteBudget) -> Middleware:
    """Requests with a body wait for room in the router's in-flight body budget (`Router.body_budget`, shared with
    gRPC); one that waits longer than the request timeout gets 503."""

    @web.middleware
    async def admit(request: web.Request, handler: Handler) -> web.StreamResponse:
        cfg = router.config
        size = request.content_length
        if request.method != "POST" or (size is not None and size > cfg.max_body_bytes):
            return await handler(request)  # nothing to hold, or refused with 413 before it is read
        try:
            async with budget.hold(cfg.max_body_bytes if size is None else size, cfg.request_timeout_s):
                return await handler(request)
        except BudgetTimeout as e:
            headers = {**NO_TIER, "Retry-After": "1"}
            return error_response(503, f"router busy: {e}", type_="server_error", code="router_busy", headers=headers)

    return admit


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes with 413 before reading it all where possible."""
    too_big = BadRequestError(
        f"request body exceeds the router's limit of {limit} bytes", status=413, code="request_too_large"
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    buf = bytearray()
    async for chunk in request.content.iter_chunked(65536):
        buf += chunk
        if len(buf) > limit:
            raise too_big
    return bytes(buf)


def client_timeout_s(value: str | None) -> float | None:
    """The client's deadline from the `x-tiergate-timeout-ms` header, in seconds (None: not given)."""
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise BadRequestError(
            f"header {TIMEOUT_HEADER}: {value[:40]!r} is not a positive integer of milliseconds",
            param=TIMEOUT_HEADER,
            code="invalid_timeout",
        )
    return int(value) / 1000


def contributors(tier: str, specialists: tuple[str, ...]) -> str:
    """The `x-tiergate-tiers` value: the answering tier, then the specialists that helped it (each once)."""
    return ",".join(dict.fromkeys((tier, *specialists)))


def _route_headers(
    route: Route,
    tier: str,
    fallback: bool,
    samples: int = 1,
    escalation: str | None = None,
    specialists: tuple[str, ...] = (),
) -> dict[str, str]:
    h = {
        TIER_HEADER: tier,
        TIERS_HEADER: contributors(tier, specialists),
        SAMPLES_HEADER: str(samples),
        "x-tiergate-decision": route.decision,
        "x-tiergate-fallback": str(fallback).lower(),
    }
    if route.score is not None:
        h["x-tiergate-score"] = f"{route.score:.4f}"
    if escalation is not None:
        h[ESCALATION_HEADER] = escalation
    return h


def _facts(route: Route, tier: str, fallback: bool, samples: int, escalation: str | None) -> dict[str, Any]:
    """The top-level `tiergate` object of a JSON answer: the same facts as the headers."""
    out: dict[str, Any] = {
        "tier": tier,
        "score": route.score,
        "decision": route.decision,
        "fallback": fallback,
        "samples": samples,
    }
    if escalation is not None:
        out["escalation"] = escalation
    return out


@dataclass
class _Result(Tally):
    # The answer's text, kept only when shadow routing judges this request (Route.shadow.other set).
    text: str | None = None


def _judged(route: Route) -> bool:
    return route.shadow is not None and route.shadow.other is not None


class OpenAIHandlers:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.best_of_n = BestOfN(router)
        self.decomposer = Decomposer(router)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "/chat/completions", parse_chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "/completions", parse_completion)

    async def models(self, request: web.Request) -> web.StreamResponse:
        body = models_body(self.router.model_names(), owned_by="tiergate")
        return web.json_response(body, headers=NO_TIER)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        resp = web.Response(body=self.router.metrics.render(), headers=NO_TIER)
        resp.headers["Content-Type"] = CONTENT_TYPE
        return resp

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"}, headers=NO_TIER)

    async def ready(self, request: web.Request) -> web.StreamResponse:
        counts = {name: len(pool.endpoints) for name, pool in self.router.dispatcher.pools.items()}
        ok = self.router.ready
        return web.json_response({"ready": ok, "endpoints": counts}, status=200 if ok else 503, headers=NO_TIER)

    async def feedback(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/feedback `{"request_id": ID, "rating": R}` with R in -1..1: 200 recorded, 400 malformed (naming
        the field), 404 an id the router does not remember (unknown, too old, or another tenant's), 409 already
        rated. With tenants, the caller authenticates like a request and may rate only its tenant's requests."""
        try:
            principal = self.router.gate.authenticate(request.headers.get("Authorization"))
            rid, rating = parse_feedback(decode_json_object(await read_body(request, MAX_FEEDBACK_BYTES)))
        except BadRequestError as e:
            return _from_bad_request(e)
        except TenantRefusedError as e:
            return _refused(e)
        tenant = principal.tenant.name if principal.tenant is not None else None
        result = self.router.recorder.feedback(rid, rating, tenant)
        if result is FeedbackResult.UNKNOWN:
            msg, status, code = f"no recent request with id {rid!r}", 404, "request_not_found"
            return error_response(status, msg, param="request_id", code=code, headers=NO_TIER)
        if result is FeedbackResult.DUPLICATE:
            msg, status, code = f"request {rid!r} already has feedback", 409, "feedback_exists"
            return error_response(status, msg, param="request_id", code=code, headers=NO_TIER)
        return web.json_response({"object": "feedback", "request_id": rid, "rating": rating}, headers=NO_TIER)

    async def _proxy(
        self, request: web.Request, path: str, parse: Callable[[dict[str, Any]], ParsedRequest]
    ) -> web.StreamResponse:
        t0 = time.perf_counter()
        m = self.router.metrics
        try:
            # Before the body is read: an unauthenticated client costs the router no more than its headers.
            principal = self.router.gate.authenticate(request.headers.get("Authorization"))
            timeout_s = client_timeout_s(request.headers.get(TIMEOUT_HEADER))
            raw = await read_body(request, self.router.config.max_body_bytes)
            parsed = parse(decode_json_object(raw))
            attachments = find_attachments(parsed.body.get("messages")) if path == "/chat/completions" else ()
            route = await self._route(parsed, principal, attachments, request_id_of(request))
        except BadRequestError as e:
            m.requests.labels("none", "none", "client_error").inc()
            return _from_bad_request(e)
        except TenantRefusedError as e:
            m.requests.labels("none", "none", "client_error").inc()
            return _refused(e)
        # The answering tier is known before the response ends; record it as soon as it is, so that a request
        # cancelled mid-stream is still counted against the tier that was serving it.
        res = _Result()
        demand = m.tier_demand.labels(route.chain[0])
        demand.inc()
        try:
            if route.specialists:
                parsed, timeout_s = await self._decompose(route, parsed, attachments, res, t0, timeout_s)
            if wants_best_of_n(self.router, route, parsed.body):
                answer = await self.best_of_n.answer(route, path, parsed.body, parsed.prompt_text, timeout_s=timeout_s)
                res.tier = answer.tier
                if parsed.stream and answer.obj is not None:
                    return await self._answer_stream(request, route, path, parsed, answer, t0, res)
                return self._answer_response(route, answer, res)
            if not parsed.stream:
                resp = await self._complete(route, path, parsed, res, timeout_s)
                if _judged(route):
                    # Sent now rather than by aiohttp after the handler returns: the whole answer is on the wire
                    # before the judgement (submitted below) starts. aiohttp skips a response already sent.
                    await resp.prepare(request)
                    await resp.write_eof()
                return resp
            return await self._stream(request, route, path, parsed, t0, res, timeout_s)
        except NoTierAvailableError as e:
            res.outcome = outcome_of(e)
            return error_response(e.status, str(e), type_="server_error", code=e.code, headers=NO_TIER)
        except SpecialistFailedError as e:
            res.outcome = "deadline_exceeded" if e.status == 504 else "upstream_error"
            return error_response(e.status, str(e), type_="server_error", code=e.code, headers=NO_TIER)
        except (asyncio.CancelledError, ConnectionResetError):
            res.outcome = "cancelled"
            raise
        finally:
            demand.dec()
            elapsed = time.perf_counter() - t0
            m.requests.labels(res.tier, route.decision, res.outcome).inc()
            m.e2e_seconds.labels(res.tier).observe(elapsed)
            self.router.record(
                route, res.served(request_id_of(request), parsed.prompt_text, parsed.body.get("user"), elapsed)
            )
            if res.outcome == "success" and _judged(route):
                # Never awaited: the judgement runs in the background, bounded (shadow.Shadower.submit).
                self.router.shadow.submit(route.shadow, path, parsed.body, parsed.prompt_text, res.tier, res.text)

    async def _route(
        self, parsed: ParsedRequest, principal: Principal, attachments: tuple[Attachment, ...], rid: str
    ) -> Route:
        """The route, with a request's attachments checked against the policy first (count, size, URL hosts) and
        counted per modality. The body's OpenAI `user` field keys the user's routing profile (`personalize`)."""
        router = self.router
        user = parsed.body.get("user")
        if not attachments:
            return await router.route(parsed.model, parsed.prompt_text, principal, TEXT_ONLY, request_id=rid, user=user)
        m = router.metrics
        try:
            check_attachments(attachments, router.config.attachments)
            needed = modalities_of(attachments)
            route = await router.route(parsed.model, parsed.prompt_text, principal, needed, request_id=rid, user=user)
        except BadRequestError:
            for a in attachments:
                m.attachments.labels(a.modality, "refused").inc()
            raise
        decomposed = {s.modality for s in route.specialists}
        for a in attachments:
            m.attachments.labels(a.modality, "decomposed" if a.modality in decomposed else "routed").inc()
        return route

    async def _decompose(
        self,
        route: Route,
        parsed: ParsedRequest,
        attachments: tuple[Attachment, ...],
        res: Tally,
        t0: float,
        timeout_s: float | None,
    ) -> tuple[ParsedRequest, float]:
        """The request for the answering tier once the specialists have read its attachments, and what is left of
        the request's deadline (the config's, or the client's shorter one) for that tier."""
        deadline_s = self.router.config.request_timeout_s if timeout_s is None else timeout_s
        deadline_s = min(deadline_s, self.router.config.request_timeout_s)
        done = await self.decomposer.run(route, parsed.body, attachments, deadline_s - (time.perf_counter() - t0))
        res.specialists = done.tiers
        # Never zero: the dispatcher then answers 504 itself, as for any request whose deadline has passed.
        left = max(deadline_s - (time.perf_counter() - t0), 0.001)
        return dataclasses.replace(parsed, body=done.body), left

    async def _complete(
        self, route: Route, path: str, parsed: ParsedRequest, res: _Result, timeout_s: float | None
    ) -> web.Response:
        reply = await self.router.dispatcher.complete(route.chain, path, parsed.body, timeout_s=timeout_s)
        res.tier = reply.tier
        headers = _route_headers(route, reply.tier, reply.fallback, specialists=res.specialists)
        body = reply.body
        if reply.status == 200 and reply.content_type.startswith("application/json"):
            try:
                obj = json.loads(body)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                if _judged(route):
                    res.text = answer_text(reply.body)
                res.add(self.router.account_usage(reply.tier, obj.get("usage"), route.access))
                obj["tiergate"] = _facts(route, reply.tier, reply.fallback, 1, None)
                body = json.dumps(obj, ensure_ascii=False).encode()
        res.outcome = _outcome(reply.status)
        resp = web.Response(body=body, status=reply.status, headers=headers)
        resp.headers["Content-Type"] = reply.content_type
        return resp

    def _answer_response(self, route: Route, answer: Answer, res: Tally) -> web.Response:
        """A best-of-N answer as one JSON response (also to a streaming client when a tier answered an error)."""
        for tier, usage in answer.usages:
            res.add(self.router.account_usage(tier, usage, route.access))
        res.samples = answer.samples
        headers = _route_headers(
            route, answer.tier, answer.fallback, answer.samples, answer.escalation, res.specialists
        )
        body = answer.body
        if answer.obj is not None:
            facts = _facts(route, answer.tier, answer.fallback, answer.samples, answer.escalation)
            body = json.dumps(dict(answer.obj, tiergate=facts), ensure_ascii=False).encode()
        res.outcome = _outcome(answer.status)
        resp = web.Response(body=body, status=answer.status, headers=headers)
        resp.headers["Content-Type"] = answer.content_type
        return resp

    async def _answer_stream(
        self,
        request: web.Request,
        route: Route,
        path: str,
        parsed: ParsedRequest,
        answer: Answer,
        t0: float,
        res: Tally,
    ) -> web.StreamResponse:
        """A best-of-N answer to a streaming client: sampled whole upstream, then sent as server-sent events in the
        usual shape (role, the chosen text in one chunk, the finish reason, the usage when asked for, [DONE])."""
        for tier, usage in answer.usages:
            res.add(self.router.account_usage(tier, usage, route.access))
        res.samples = answer.samples
        text, finish_reason, usage = chosen(answer)
        headers = _route_headers(
            route, answer.tier, answer.fallback, answer.samples, answer.escalation, res.specialists
        )
        headers["Cache-Control"] = "no-cache"
        model = str((answer.obj or {}).get("model") or parsed.model)
        stream = await CompletionStream.open(request, model, chat=path == "/chat/completions", headers=headers)
        self.router.metrics.ttft_seconds.labels(answer.tier).observe(time.perf_counter() - t0)
        await stream.text(text)
        await stream.finish(finish_reason, usage if wants_usage(parsed.body) else None)
        res.outcome = "success"
        return stream.response

    async def _stream(
        self,
        request: web.Request,
        route: Route,
        path: str,
        parsed: ParsedRequest,
        t0: float,
        res: _Result,
        timeout_s: float | None,
    ) -> web.StreamResponse:
        up = await self.router.dispatcher.open_stream(route.chain, path, parsed.body, timeout_s=timeout_s)
        res.tier = up.tier
        m = self.router.metrics
        scanner = SSEUsageScanner()
        collected = StreamText() if _judged(route) else None
        try:
            headers = _route_headers(route, up.tier, up.fallback, specialists=res.specialists)
            resp = web.StreamResponse(status=up.status, headers=headers)
            resp.headers["Content-Type"] = up.content_type
            resp.headers["Cache-Control"] = "no-cache"
            await resp.prepare(request)
            first = True
            accounted = False
            t_up = time.perf_counter()
            try:
                async for chunk in up.chunks():
                    if first:
                        m.ttft_seconds.labels(up.tier).observe(time.perf_counter() - t0)
                        first = False
                    scanner.feed(chunk)
                    if collected is not None:
                        collected.feed(chunk)
                    if not accounted and scanner.usage is not None:
                        # Counted as soon as the usage event is seen, before it (and the `[DONE]` after it) reaches
                        # the client: a client that hangs up at `[DONE]` cancels this handler before the upstream
                        # stream's end, and whoever reads /metrics once the stream is over must see the tokens.
                        res.add(self.router.account_usage(up.tier, scanner.usage, route.access))
                        accounted = True
                    await resp.write(chunk)
            except UpstreamStreamError as e:
                # Headers are gone already: end the stream with an error event the client can see.
                log.warning("%s", e)
                event = {"error": {"message": str(e), "type": "server_error", "code": "upstream_stream_failed"}}
                await resp.write(sse_event(event))
                await resp.write_eof()
                res.outcome = "upstream_error"
                return resp
            m.upstream_seconds.labels(up.tier).observe(time.perf_counter() - t_up)
            await resp.write_eof()
        finally:
            up.close()
        res.text = collected.text if collected is not None else None
        res.outcome = "success"
        return resp


def _outcome(status: int) -> str:
    return "success" if status < 400 else "client_error" if status < 500 else "upstream_error"


def build_app(router: Router) -> web.Application:
    # client_max_size only bounds aiohttp's own body reads; read_body enforces the router's limit itself so the
    # client gets an OpenAI-style 413 instead of a plain-text one.
    h = OpenAIHandlers(router)
    budget = router.body_budget  # shared with the gRPC front end
    app = build_openai_app(
        h,
        middlewares=[_tier_header_and_errors, _admission(router, budget)],
        client_max_size=router.config.max_body_bytes + 1,
    )
    app[ROUTER_KEY] = router
    app[BUDGET_KEY] = budget
    app.on_response_prepare.append(_add_request_id)
    app.router.add_get("/ready", h.ready)
    app.router.add_post("/v1/feedback", h.feedback)
    return app
