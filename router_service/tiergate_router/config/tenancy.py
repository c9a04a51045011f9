"""The tenants part of the policy (`spec.tenants`, `spec.unauthenticated`, `spec.limitStore`) -> `Tenancy`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tiergate_router.errors import ConfigError
from tiergate_router.tenants import NANO, BudgetConfig, Tenancy, TenantConfig

if TYPE_CHECKING:
    from tiergate.api.policy import RoutingPolicy, Tenant


def tenancy_from_policy(policy: RoutingPolicy, *, n_tier: bool, keys_dir: Path | None) -> Tenancy:
    """The policy's tenants for the router. A tenant's own cost weight applies to N-tier artifacts only and is
    refused with a two-tier one (like the policy's knob); a budget's low cost weight falls back to "one tier
    cheaper" there, as documented. `keys_dir`: where the operator mounts the tenants' keys (None: environment
    only)."""
    from tiergate.api.policy import LimitStoreUnavailable

    spec = policy.spec
    tenants = tuple(_tenant(i, t, n_tier) for i, t in enumerate(spec.tenants))
    store = spec.limit_store
    return Tenancy(
        tenants=tenants,
        allow_unauthenticated=spec.unauthenticated_allowed,
        redis_address=store.redis_address if store is not None else None,
        fail_closed=store is not None and store.when_unavailable is LimitStoreUnavailable.REFUSE,
        replicas=max(1, spec.router.replicas),
        scope=f"{policy.metadata.namespace or 'default'}/{policy.metadata.name}",
        keys_dir=keys_dir,
    )


def _tenant(i: int, t: Tenant, n_tier: bool) -> TenantConfig:
    from tiergate.api.policy import BudgetSpent

    if t.cost_weight_basis_points is not None and not n_tier:
        raise ConfigError(
            f"spec.tenants[{i}].costWeightBasisPoints: applies to N-tier artifacts only, and this router's classifier "
            "is a two-tier one"
        )
    b = t.budget
    budget = None
    if b is not None:
        budget = BudgetConfig(
            # Exact: the policy's decimal (at most 9 decimals) in nano-dollars.
            daily_nano_usd=int(b.daily_usd * NANO),
            low_remaining_bp=b.low_remaining_basis_points,
            low_cost_weight_bp=b.low_cost_weight_basis_points if n_tier else None,
            refuse_when_spent=b.when_spent is BudgetSpent.REFUSE,
        )
    return TenantConfig(
        name=t.name,
        tiers=frozenset(t.tiers) if t.tiers is not None else None,
        requests_per_minute=t.limits.requests_per_minute or 0,
        tokens_per_minute=t.limits.tokens_per_minute or 0,
        cost_weight_bp=t.cost_weight_basis_points,
        budget=budget,
    )
