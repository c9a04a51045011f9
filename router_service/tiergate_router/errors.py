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

    def __init__(self, message: str, attempts: list[str]) -> None:
        super().__init__(message)
        self.attempts = attempts


class UpstreamStreamError(RouterError):
    """A tier failed after the response had started streaming to the client (nothing can be retried then)."""
