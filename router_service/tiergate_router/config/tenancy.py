"""The tenants part of the policy (`spec.tenants`, `spec.unauthenticated`, `spec.limitStore`) -> `Tenancy`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tiergate_router.config.knobs import MultiTierSource
from tiergate_router.errors import ConfigError
from tiergate_router.tenants import NANO, BudgetConfig, Tenancy, TenantConfig

if TYPE_CHECKING:
    from tiergate.api.policy import RoutingPolicy, Tenant


def tenancy_from_policy(
    policy: RoutingPolicy, *, multi: MultiTierSource | None, keys_dir: Path | None, price_scale: float | None = 1.0
) -> Tenancy:
    """The policy's tenants for the router. A tenant's own cost weight or price budget applies to N-tier artifacts
    (`multi`) only and is refused with a two-tier one (like the policy's knobs); a price budget becomes a cost weight
    through the artifact's calibration, as the policy's does. A budget's low cost weight falls back to "one tier
    cheaper" with a two-tier artifact, as documented. `keys_dir`: where the operator mounts the tenants' keys (None:
    environment only). `price_scale`: k when the tiers' prices are k times the artifact's
    (`MultiTier.calibration_scale`), None when no factor makes them so (a tenant's price budget is refused then: no
    calibration describes them)."""
    from tiergate.api import naming
    from tiergate.api.policy import LimitStoreUnavailable

    spec = policy.spec
    tenants = tuple(_tenant(i, t, multi, price_scale) for i, t in enumerate(spec.tenants))
    store = spec.limit_store
    return Tenancy(
        tenants=tenants,
        allow_unauthenticated=spec.unauthenticated_allowed,
        redis_address=store.redis_address if store is not None else None,
        fail_closed=store is not None and store.when_unavailable is LimitStoreUnavailable.REFUSE,
        replicas=max(1, spec.router.replicas),
        scope=naming.limit_scope(policy.metadata.namespace, policy.metadata.name),
        keys_dir=keys_dir,
    )


def _tenant(i: int, t: Tenant, multi: MultiTierSource | None, price_scale: float | None) -> TenantConfig:
    from tiergate.api.policy import BudgetSpent

    n_tier = multi is not None
    for knob, value in (
        ("costWeightBasisPoints", t.cost_weight_basis_points),
        ("budgetPerMillion", t.budget_per_million),
    ):
        if value is not None and multi is None:
            raise ConfigError(
                f"spec.tenants[{i}].{knob}: applies to N-tier artifacts only, and this router's classifier is a "
                "two-tier one"
            )
    cost_weight = t.cost_weight_basis_points
    if t.budget_per_million is not None and multi is not None:
        if price_scale is None:
            raise ConfigError(
                f"spec.tenants[{i}].budgetPerMillion: the tiers' prices are not the artifact's (up to one factor), so "
                "its calibration cannot turn a budget into a cost weight; set the tenant's costWeightBasisPoints"
            )
        # Decimal in the policy; the calibration table holds float prices, and one budget comparison is all. The
        # table's weight is against the artifact's prices (the policy's / k); a tenant's weight is against the
        # policy's, so it is the table's / k (the router multiplies back by MultiTier.price_scale).
        art_bp = multi.cost_weight_for_budget_bp(float(t.budget_per_million) / price_scale)
        cost_weight = round(art_bp / price_scale)
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
        cost_weight_bp=cost_weight,
        budget=budget,
    )
