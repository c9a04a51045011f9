"""Errors of the routing package (training data, artifacts, encoders), one type per boundary.

Every error here is a `RoutingError`, so a CLI can catch that one type, print the message and exit 2 without a
traceback; the messages are written to be shown to a user as they are.
"""

from __future__ import annotations


class RoutingError(Exception):
    """Base of everything `tiergate.routing` raises on purpose."""


class DataError(RoutingError):
    """An outcome file (or tier/price file) is malformed; the message names the file and, where there is one, the
    1-based line."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class ArtifactError(RoutingError):
    """A router artifact is missing, corrupt, or incompatible with this code (format version, encoder, shapes).

    A service that already holds a working artifact must keep it when loading a new one raises this."""


class EncoderError(RoutingError):
    """The prompt encoder could not be loaded or run (missing model files, missing `train` extra)."""


class NoOperatingPoint(RoutingError):
    """No calibrated point meets the target. `target` names it ("budget 0.1 $/Mtok"), `closest` is the nearest the
    table gets (cheapest price, lowest share, best PGR or quality), None for an empty table."""

    def __init__(self, message: str, *, target: str, closest: float | None) -> None:
        super().__init__(message)
        self.target = target
        self.closest = closest
