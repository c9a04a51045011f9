"""Errors of the operator, one type per boundary."""


class OperatorError(Exception):
    """Base of everything tiergate_operator raises."""


class ConfigError(OperatorError):
    """The operator's own configuration (flags, environment) is unusable."""


class KubeError(OperatorError):
    """The API server refused a request or could not be reached. `status` is the HTTP status (0: no response)."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    @property
    def retryable(self) -> bool:
        # Conflicts, throttling, timeouts and server errors pass; 4xx validation errors will not.
        return self.status in (0, 409, 429) or self.status >= 500


class LeaseLost(OperatorError):
    """This replica lost leadership; it must stop acting so the new leader is the only writer."""


class NotLeader(KubeError):
    """A write was refused before it was sent: this replica cannot prove it holds the lease (its last renewal is
    older than the renew deadline). Retryable: the replica either renews, or steps down and exits."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0, "NotLeader")
