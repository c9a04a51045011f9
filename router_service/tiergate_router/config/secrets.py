"""API keys of external tiers: read from the environment variable the operator fills from the tier's
`endpoint.apiKeySecretRef` Secret (`tiergate.api.naming.api_key_env`), so the router never needs to read Secrets."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from tiergate_router.errors import ConfigError

if TYPE_CHECKING:
    from tiergate.api.policy import Tier


def api_key(tier: Tier, index: int, environ: Mapping[str, str] | None = None) -> str | None:
    """The key of policy tier `index` (None when its endpoint names no Secret); ConfigError when the Secret is named
    but its variable is unset or blank. `environ` defaults to os.environ."""
    from tiergate.api import naming

    ref = tier.endpoint.api_key_secret_ref if tier.endpoint is not None else None
    if ref is None:
        return None
    var = naming.api_key_env(tier.name)
    key = (os.environ if environ is None else environ).get(var, "").strip()
    if not key:
        raise ConfigError(
            f"spec.tiers[{index}].endpoint.apiKeySecretRef: the key (Secret {ref.name}, key {ref.key}) is not in the "
            f"environment variable {var}; the operator sets it in the router pod, set it yourself elsewhere"
        )
    return key
