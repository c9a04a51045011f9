"""Exceptions of the router service. Wire status codes are chosen only at the edges (HTTP and gRPC handlers)."""

from __future__ import annotations


class RouterError(Exception):
    """Base class for every error the router raises on purpose."""


class ConfigError(RouterError):
    """The policy or command line does not describe a usable router (names the field that is wrong)."""


class ClassifierError(RouterError):
    """The classifier could not be loaded or failed to score a prompt."""


class BadRequestError(RouterError):
    """The client's request is invalid; carries what an OpenAI-style error body needs."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type_


class NoTierAvailableError(RouterError):
    """Every tier in the fallback order was down, saturated or failing; the request cannot be answered."""

    # The HTTP status and OpenAI error code the front end answers with (subclasses say why more precisely).
    status = 503
    code = "no_tier_available"

    def __init__(self, message: str, attempts: list[str]) -> None:
        super().__init__(message)
        self.attempts = attempts


class RetryBudgetExhaustedError(NoTierAvailableError):
    """A try failed and retrying it would exceed the retry budget (Envoy's retry overflow): no further tries."""

    code = "retry_budget_exhausted"


class DeadlineExceededError(NoTierAvailableError):
    """The request's overall deadline passed before a tier answered, or its last try timed out (HTTP 504, gRPC
    DEADLINE_EXCEEDED)."""

    status = 504
    code = "deadline_exceeded"


class UpstreamTooLargeError(NoTierAvailableError):
    """A tier's non-streaming answer was larger than the router reads (`max_response_bytes`): HTTP 502 naming the
    tier. Not retried: the same request would most likely bring the same answer again, at the same cost."""

    status = 502
    code = "upstream_response_too_large"


def outcome_of(e: NoTierAvailableError) -> str:
    """The `outcome` label (metrics.OUTCOMES) of a request no tier answered."""
    if isinstance(e, UpstreamTooLargeError):
        return "upstream_error"
    return "deadline_exceeded" if isinstance(e, DeadlineExceededError) else "unavailable"


class UpstreamStreamError(RouterError):
    """A tier failed after the response had started streaming to the client (nothing can be retried then)."""


class TenantRefusedError(RouterError):
    """A tenant's request refused at the front door: no or a wrong key (401), a tier it may not use (403), over a
    limit or its budget (429), or the limit store down with the policy failing closed (503). `retry_after_s` is the
    Retry-After the client gets; `limit` names the limit that was hit (`requests_per_minute`, `tokens_per_minute`,
    `daily_budget`)."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        type_: str | None = None,
        param: str | None = None,
        retry_after_s: int | None = None,
        limit: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.type = type_ or {401: "invalid_request_error", 403: "permission_error", 429: "requests"}.get(
            status, "server_error"
        )
        self.param = param
        self.retry_after_s = retry_after_s
        self.limit = limit
