"""`tiergate serve --personalization [--personalization-max-users N] [--personalization-prior K]`: per-user routing
profiles from the command line, over the policy's `spec.router.personalization` (`from_policy.personalization_of`).
Pure functions over typed values; refused, naming the flag, where they could not act."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tiergate.api.policy import MAX_PRIOR_STRENGTH, MAX_PROFILE_USERS, MIN_PROFILE_USERS
from tiergate_router.config.types import PERSONALIZATION_NEEDS, PersonalizationConfig, RouterConfig
from tiergate_router.errors import ConfigError


@dataclass(frozen=True)
class PersonalizationFlags:
    # `--personalization`: turn profiles on (False: as the policy says).
    enabled: bool = False
    # `--personalization-max-users N` / `--personalization-prior K`: over the policy's maxUsers / priorStrength.
    max_users: int | None = None
    prior_strength: int | None = None


def apply_personalization(cfg: RouterConfig, flags: PersonalizationFlags) -> RouterConfig:
    """`cfg` with the flags applied. Settings without profiles on (by flag or policy), values outside the policy's
    bounds, and profiles without an N-tier artifact are refused, naming the flag."""
    p = cfg.personalization
    if flags.enabled and p is None:
        p = PersonalizationConfig()
    if p is None:
        for flag, value in (
            ("--personalization-max-users", flags.max_users),
            ("--personalization-prior", flags.prior_strength),
        ):
            if value is not None:
                raise ConfigError(
                    f"{flag}: personalization is off (give --personalization, or enable it in the policy)"
                )
        return cfg
    if flags.max_users is not None:
        if not MIN_PROFILE_USERS <= flags.max_users <= MAX_PROFILE_USERS:
            raise ConfigError(
                f"--personalization-max-users: {flags.max_users} is outside {MIN_PROFILE_USERS}..{MAX_PROFILE_USERS}"
            )
        p = dataclasses.replace(p, max_users=flags.max_users)
    if flags.prior_strength is not None:
        if not 1 <= flags.prior_strength <= MAX_PRIOR_STRENGTH:
            raise ConfigError(f"--personalization-prior: {flags.prior_strength} is outside 1..{MAX_PRIOR_STRENGTH}")
        p = dataclasses.replace(p, prior_strength=flags.prior_strength)
    if cfg.multi_tier is None:
        raise ConfigError(
            f"--personalization: {PERSONALIZATION_NEEDS}; give one with --router ARTIFACT (e.g. the shipped "
            "tiergate/routing/default/multi-tier.json) or in the policy's spec.router.classifier"
        )
    return dataclasses.replace(cfg, personalization=p)
