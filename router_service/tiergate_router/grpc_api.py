"""The gRPC front end (tiergate.v1.RouterService) on grpc.aio, with grpc.health.v1 and server reflection.

Messages are converted to the same OpenAI chat body the HTTP API forwards, so both front ends share routing,
dispatch, fallback and metrics; upstream answers are converted back to messages here, at the edge.
Every Generate / GenerateStream call ends with the trailing metadata `x-tiergate-samples` (as the HTTP header: the
samples the answer was chosen from, 1 without best-of-N, 0 when no tier answered) and `x-tiergate-tiers` (the tiers
that contributed: the answering tier, `none` when none answered; gRPC messages carry text only, so nothing is ever
decomposed here); a best-of-N answer streamed
comes as one chunk with the whole chosen text (`tiergate_router.best_of_n`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tiergate.api.naming import ROUTER_LIVENESS_SERVICE
from tiergate_router._proto import router_pb2, router_pb2_grpc
from tiergate_router.admission import BudgetTimeout
from tiergate_router.best_of_n import SAMPLES_HEADER, Answer, BestOfN, chosen, wants_best_of_n
from tiergate_router.decompose import TIERS_HEADER
from tiergate_router.errors import (
    BadRequestError,
    DeadlineExceededError,
    NoTierAvailableError,
    TenantRefusedError,
    UpstreamStreamError,
    outcome_of,
)
from tiergate_router.router import Route, Router
from tiergate_router.validation import parse_chat

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


def request_to_body(
    req: router_pb2.GenerateRequest | router_pb2.ClassifyRequest, *, stream: bool, model: str
) -> dict[str, Any]:
    """An OpenAI chat body from a request message (pure; raises BadRequestError naming the field)."""
    has_messages, has_prompt = len(req.messages) > 0, bool(req.prompt)
    if has_messages == has_prompt:
        raise BadRequestError("exactly one of 'messages' and 'prompt' must be set", param="messages")
    if has_messages:
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
    else:
        messages = [{"role": "user", "content": req.prompt}]
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    if isinstance(req, router_pb2.GenerateRequest):
        if req.max_tokens:
            body["max_tokens"] = req.max_tokens
        if req.HasField("temperature"):
            body["temperature"] = req.temperature
        if stream:
            body["stream_options"] = {"include_usage": True}
    return body


def _unavailable_status(e: NoTierAvailableError) -> grpc.StatusCode:
    """The gRPC status of a request no tier answered: DEADLINE_EXCEEDED when its deadline passed, else UNAVAILABLE."""
    return grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(e, DeadlineExceededError) else grpc.StatusCode.UNAVAILABLE


def _status(e: BadRequestError) -> grpc.StatusCode:
    if e.status == 404:
        return grpc.StatusCode.NOT_FOUND
    if e.status == 413:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INVALID_ARGUMENT


_REFUSED_STATUS = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _authorization(context: Any) -> str | None:
    """The `authorization` metadata (`Bearer KEY`, as HTTP's header); gRPC metadata keys are lower case."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


async def _abort_refused(context: Any, e: TenantRefusedError) -> None:
    """A tenant refusal as a gRPC status, with `retry-after` (seconds) and `x-tiergate-limit` trailing metadata."""
    trailers = []
    if e.retry_after_s is not None:
        trailers.append(("retry-after", str(e.retry_after_s)))
    if e.limit is not None:
        trailers.append(("x-tiergate-limit", e.limit))
    if trailers:
        context.set_trailing_metadata(tuple(trailers))
    await context.abort(_REFUSED_STATUS.get(e.status, grpc.StatusCode.UNAVAILABLE), e.message)


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router
        self.best_of_n = BestOfN(router)

    async def _best_of_n(
        self, route: Route, body: dict[str, Any], prompt_text: str, context: Any
    ) -> tuple[Answer, str, str, dict[str, Any]]:
        """A best-of-N answer and its (text, finish reason, usage) (aborts when the tier answered an error); the
        caller counts the request."""
        answer = await self.best_of_n.answer(
            route, "/chat/completions", body, prompt_text, timeout_s=context.time_remaining()
        )
        for tier, usage in answer.usages:
            self.router.account_usage(tier, usage, route.access)
        _samples(context, answer.samples, answer.tier)
        if answer.obj is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT if answer.status < 500 else grpc.StatusCode.UNAVAILABLE,
                f"tier {answer.tier} answered HTTP {answer.status}: {answer.body[:500]!r}",
            )
        text, finish_reason, usage = chosen(answer)
        return answer, text, finish_reason, usage or {}

    @contextlib.asynccontextmanager
    async def _admitted(self, req: Message, context: Any) -> AsyncIterator[None]:
        """Hold the request's bytes in the router's body budget (`Router.body_budget`, shared with HTTP) until its
        answer is done. gRPC has read the whole message already; what the budget bounds is everything made from it
        (the OpenAI body, the prompt, the forwarded JSON) while the request is in flight. RESOURCE_EXHAUSTED when no
        room comes within the request timeout, as HTTP's 503."""
        cfg = self.router.config
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.router.body_budget.hold(req.ByteSize(), cfg.request_timeout_s))
            except BudgetTimeout as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"router busy: {e}")
            yield

    async def _prepare(
        self, req: router_pb2.GenerateRequest | router_pb2.ClassifyRequest, context: Any, *, stream: bool
    ) -> tuple[dict[str, Any], Any, str]:
        cfg = self.router.config
        _samples(context, 0)
        model = req.tier if isinstance(req, router_pb2.GenerateRequest) and req.tier else cfg.routed_model_name
        try:
            principal = self.router.gate.authenticate(_authorization(context))
            body = request_to_body(req, stream=stream, model=model)
            if req.ByteSize() > cfg.max_body_bytes:
                raise BadRequestError(f"request exceeds the router's limit of {cfg.max_body_bytes} bytes", status=413)
            parsed = parse_chat(body)
            route = await self.router.route(parsed.model, parsed.prompt_text, principal)
        except BadRequestError as e:
            self.router.metrics.requests.labels("none", "none", "client_error").inc()
            await context.abort(_status(e), e.message)
            raise AssertionError("unreachable") from e
        except TenantRefusedError as e:
            self.router.metrics.requests.labels("none", "none", "client_error").inc()
            await _abort_refused(context, e)
            raise AssertionError("unreachable") from e
        return body, route, parsed.prompt_text

    async def Classify(self, request: router_pb2.ClassifyRequest, context: Any) -> router_pb2.ClassifyResponse:
        async with self._admitted(request, context):
            return await self._classify(request, context)

    async def _classify(self, request: router_pb2.ClassifyRequest, context: Any) -> router_pb2.ClassifyResponse:
        cfg = self.router.config
        try:
            principal = self.router.gate.authenticate(_authorization(context))
            body = request_to_body(request, stream=False, model=cfg.routed_model_name)
            parsed = parse_chat(body)
            route = await self.router.route(parsed.model, parsed.prompt_text, principal)
        except BadRequestError as e:
            await context.abort(_status(e), e.message)
            raise AssertionError("unreachable") from e
        except TenantRefusedError as e:
            await _abort_refused(context, e)
            raise AssertionError("unreachable") from e
        score = route.score if route.score is not None else 1.0
        tier = route.chain[0]
        return router_pb2.ClassifyResponse(
            score=score,
            tier=tier,
            # N-tier artifacts choose by cost weight, not a threshold: 0 there.
            threshold_bp=cfg.thresholds_bp[-1] if cfg.thresholds_bp and cfg.multi_tier is None else 0,
        )

    async def Generate(self, request: router_pb2.GenerateRequest, context: Any) -> router_pb2.GenerateResponse:
        async with self._admitted(request, context):
            return await self._generate(request, context)

    async def _generate(self, request: router_pb2.GenerateRequest, context: Any) -> router_pb2.GenerateResponse:
        t0 = time.perf_counter()
        body, route, prompt_text = await self._prepare(request, context, stream=False)
        m = self.router.metrics
        tier, outcome = "none", "upstream_error"
        demand = m.tier_demand.labels(route.chain[0])
        demand.inc()
        try:
            if wants_best_of_n(self.router, route, body):
                answer, text, finish_reason, usage = await self._best_of_n(route, body, prompt_text, context)
                tier, outcome = answer.tier, "success"
                return router_pb2.GenerateResponse(
                    text=text,
                    tier=answer.tier,
                    score=route.score or 0.0,
                    finish_reason=finish_reason,
                    usage=_usage(usage),
                    model=str((answer.obj or {}).get("model", "")),
                    fallback=answer.fallback,
                )
            reply = await self.router.dispatcher.complete(
                route.chain, "/chat/completions", body, timeout_s=context.time_remaining()
            )
            tier = reply.tier
            _samples(context, 1, reply.tier)
            if reply.status != 200:
                outcome = "client_error" if reply.status < 500 else "upstream_error"
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT if reply.status < 500 else grpc.StatusCode.UNAVAILABLE,
                    f"tier {reply.tier} answered HTTP {reply.status}: {reply.body[:500]!r}",
                )
            try:
                obj = json.loads(reply.body)
                choice = obj["choices"][0]
                text = choice["message"].get("content") or ""
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"tier {reply.tier} sent an unreadable answer")
                raise
            usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
            self.router.account_usage(reply.tier, usage, route.access)
            outcome = "success"
            return router_pb2.GenerateResponse(
                text=text,
                tier=reply.tier,
                score=route.score or 0.0,
                finish_reason=choice.get("finish_reason") or "",
                usage=_usage(usage),
                model=str(obj.get("model", "")),
                fallback=reply.fallback,
            )
        except NoTierAvailableError as e:
            outcome = outcome_of(e)
            await context.abort(_unavailable_status(e), str(e))
            raise
        finally:
            demand.dec()
            m.requests.labels(tier, route.decision, outcome).inc()
            m.e2e_seconds.labels(tier).observe(time.perf_counter() - t0)

    async def GenerateStream(
        self, request: router_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[router_pb2.GenerateChunk]:
        async with self._admitted(request, context):
            async for chunk in self._generate_stream(request, context):
                yield chunk

    async def _generate_stream(
        self, request: router_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[router_pb2.GenerateChunk]:
        t0 = time.perf_counter()
        body, route, prompt_text = await self._prepare(request, context, stream=True)
        m = self.router.metrics
        tier, outcome = "none", "upstream_error"
        demand = m.tier_demand.labels(route.chain[0])
        demand.inc()
        try:
            if wants_best_of_n(self.router, route, body):
                try:
                    answer, text, finish_reason, usage = await self._best_of_n(route, body, prompt_text, context)
                except NoTierAvailableError as e:
                    outcome = outcome_of(e)
                    await context.abort(_unavailable_status(e), str(e))
                    raise
                tier = answer.tier
                m.ttft_seconds.labels(tier).observe(time.perf_counter() - t0)
                yield router_pb2.GenerateChunk(
                    delta=text,
                    tier=tier,
                    score=route.score or 0.0,
                    finish_reason=finish_reason,
                    usage=_usage(usage),
                    fallback=answer.fallback,
                )
                outcome = "success"
                return
            try:
                up = await self.router.dispatcher.open_stream(
                    route.chain, "/chat/completions", body, timeout_s=context.time_remaining()
                )
            except NoTierAvailableError as e:
                outcome = outcome_of(e)
                await context.abort(_unavailable_status(e), str(e))
                raise
            tier = up.tier
            _samples(context, 1, up.tier)
            score = route.score or 0.0
            buf = b""
            first = True
            try:
                async for chunk in up.chunks():
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        msg = _sse_to_chunk(line, up.tier, score, up.fallback)
                        if msg is None:
                            continue
                        if first:
                            m.ttft_seconds.labels(up.tier).observe(time.perf_counter() - t0)
                            first = False
                        if msg.usage.completion_tokens or msg.usage.prompt_tokens:
                            self.router.account_usage(
                                up.tier,
                                {
                                    "prompt_tokens": msg.usage.prompt_tokens,
                                    "completion_tokens": msg.usage.completion_tokens,
                                },
                                route.access,
                            )
                        yield msg
            except UpstreamStreamError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            finally:
                up.close()
            outcome = "success"
        finally:
            demand.dec()
            m.requests.labels(tier, route.decision, outcome).inc()
            m.e2e_seconds.labels(tier).observe(time.perf_counter() - t0)


def _samples(context: Any, n: int, tier: str = "none") -> None:
    """The `x-tiergate-samples` and `x-tiergate-tiers` trailing metadata (sent with the status, also when the call
    is aborted)."""
    context.set_trailing_metadata(((SAMPLES_HEADER, str(n)), (TIERS_HEADER, tier)))


def _usage(usage: dict[str, Any]) -> router_pb2.Usage:
    return router_pb2.Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0), completion_tokens=int(usage.get("completion_tokens") or 0)
    )


def _sse_to_chunk(line: bytes, tier: str, score: float, fallback: bool) -> router_pb2.GenerateChunk | None:
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if data == b"[DONE]":
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    chunk = router_pb2.GenerateChunk(tier=tier, score=score, fallback=fallback)
    choices = obj.get("choices") or []
    if choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta") or {}
        chunk.delta = (delta.get("content") if isinstance(delta, dict) else None) or ""
        chunk.finish_reason = choices[0].get("finish_reason") or ""
    usage = obj.get("usage")
    if isinstance(usage, dict):
        chunk.usage.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        chunk.usage.completion_tokens = int(usage.get("completion_tokens") or 0)
    if not chunk.delta and not chunk.finish_reason and not chunk.HasField("usage"):
        return None
    return chunk


def strict_decoding_handler(servicer: RouterServicer) -> grpc.GenericRpcHandler:
    """The RouterService handlers, decoding requests in our code rather than grpc's.

    grpc answers an undecodable request with UNKNOWN and logs a traceback; a client sending bad bytes deserves
    INVALID_ARGUMENT naming the problem, like any other bad input. Method names come from the generated
    descriptor, so the set of methods cannot drift from the proto.
    """
    req_types: dict[str, Any] = {
        "Classify": router_pb2.ClassifyRequest,
        "Generate": router_pb2.GenerateRequest,
        "GenerateStream": router_pb2.GenerateRequest,
    }

    async def decode(name: str, raw: bytes, context: Any) -> Any:
        try:
            return req_types[name].FromString(raw)
        except DecodeError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode {req_types[name].__name__}: {e}")

    async def classify(raw: bytes, context: Any) -> router_pb2.ClassifyResponse:
        return await servicer.Classify(await decode("Classify", raw, context), context)

    async def generate(raw: bytes, context: Any) -> router_pb2.GenerateResponse:
        return await servicer.Generate(await decode("Generate", raw, context), context)

    async def generate_stream(raw: bytes, context: Any) -> AsyncIterator[router_pb2.GenerateChunk]:
        async for chunk in servicer.GenerateStream(await decode("GenerateStream", raw, context), context):
            yield chunk

    ser = _serialize
    handlers = {
        "Classify": grpc.unary_unary_rpc_method_handler(classify, response_serializer=ser),
        "Generate": grpc.unary_unary_rpc_method_handler(generate, response_serializer=ser),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(generate_stream, response_serializer=ser),
    }
    declared = {m.name for m in router_pb2.DESCRIPTOR.services_by_name["RouterService"].methods}
    assert declared == set(handlers), f"RouterService methods changed: {declared}"
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _serialize(msg: Any) -> bytes:
    data: bytes = msg.SerializeToString()
    return data


async def set_readiness(servicer: health.aio.HealthServicer, ready: bool) -> None:
    """The overall health ("", what a Kubernetes gRPC readiness probe asks) and RouterService's: SERVING while the
    router has an endpoint to send to (`Router.ready`), NOT_SERVING otherwise. After graceful shutdown has begun
    the servicer ignores this and stays NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
    await servicer.set(SERVICE_NAME, status)
    await servicer.set("", status)


async def start_grpc(router: Router, host: str, port: int) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start the gRPC server; returns (server, bound port, health servicer). Liveness (ROUTER_LIVENESS_SERVICE) is
    SERVING from here on; readiness follows `router.ready` (`set_readiness`, called again by the server whenever
    the endpoints change)."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((strict_decoding_handler(RouterServicer(router)),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    await health_servicer.set(ROUTER_LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await set_readiness(health_servicer, router.ready)
    return server, bound, health_servicer
