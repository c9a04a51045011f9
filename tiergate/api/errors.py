"""Errors of the policy API, one type per failure kind, all under `PolicyError`."""

from __future__ import annotations

from dataclasses import dataclass


class PolicyError(Exception):
    """Base of everything `tiergate.api` raises."""


@dataclass(frozen=True)
class FieldError:
    """One problem with one field. `path` is the manifest path in its camelCase spelling, e.g.
    `spec.tiers[1].replicas.min`, the same form the API server uses in its own rejections."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class PolicyValidationError(PolicyError):
    """The policy does not validate. `errors` lists every problem found, each naming its field."""

    def __init__(self, errors: list[FieldError], source: str | None = None) -> None:
        self.errors = errors
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"invalid RoutingPolicy{where} ({len(errors)} problem(s)):\n{lines}")

    @property
    def paths(self) -> list[str]:
        return [e.path for e in self.errors]


class PolicyParseError(PolicyError):
    """The text is not a YAML/JSON mapping, or the file cannot be read."""
