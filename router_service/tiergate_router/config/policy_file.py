"""Reading the policy file the operator mounts (a RoutingPolicy manifest, defaults filled in)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tiergate_router.config.from_policy import from_policy
from tiergate_router.config.types import RouterConfig
from tiergate_router.errors import ConfigError

if TYPE_CHECKING:
    from tiergate.api.policy import RoutingPolicy


def read_policy(path: Path) -> RoutingPolicy:
    """The typed RoutingPolicy in `path`; ConfigError naming the file and the field."""
    from tiergate.api.errors import PolicyError
    from tiergate.api.policy import load_policy

    try:
        return load_policy(Path(path))
    except PolicyError as e:
        raise ConfigError(f"{path}: {e}") from e


def load_policy_file(path: Path) -> RouterConfig:
    """The policy file read into a RouterConfig with `from_policy`'s defaults (compose `read_policy` and
    `from_policy` for anything else)."""
    return from_policy(read_policy(path))
