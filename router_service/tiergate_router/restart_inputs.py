"""What the router reads only at start, so a policy reload cannot change it, and which classifier it serves.

The policy file is hot-reloaded (policy_watch.py), but three inputs are read once: the classifier artifact (loaded
with its encoder: seconds of work and the memory of a second model), the policy's reference to it, and the API
keys of external tiers (environment variables the operator fills from Secrets, fixed for the life of the
process). A reload that changes a reference is refused, so the last good policy keeps serving instead of one that
silently uses the old classifier or key; the operator stamps a digest of these same inputs on the router's pod
template (`tiergate_operator.classifier.ROUTER_INPUTS`, held equal to STARTUP_INPUTS by a unit test), so in a
cluster such a change rolls the router.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tiergate.api.policy import RoutingPolicy
from tiergate_router.errors import ConfigError
from tiergate_router.metrics import RouterMetrics

CLASSIFIER_REF = "spec.router.classifier"
API_KEY_REFS = "spec.tiers[].endpoint.apiKeySecretRef"
# Not a policy field: the artifact file's content, read once (the operator rolls the router when it changes).
CLASSIFIER_ARTIFACT = "classifier artifact"
# The canary artifact (spec.router.canary), loaded at start like the primary one; its share is reloaded.
CANARY_REF = "spec.router.canary.classifier"
# Not a policy field either: the canary artifact file's content (a canary ConfigMap's copy, which the operator
# mounts; a change rolls the router like the primary's).
CANARY_ARTIFACT = "canary classifier artifact"
# The policy fields among them, which a reload compares.
RELOAD_REFUSED = (CLASSIFIER_REF, API_KEY_REFS, CANARY_REF)
STARTUP_INPUTS = frozenset({*RELOAD_REFUSED, CLASSIFIER_ARTIFACT, CANARY_ARTIFACT})

log = logging.getLogger(__name__)


def policy_startup_inputs(policy: RoutingPolicy) -> dict[str, Any]:
    """The start-time inputs a policy names (RELOAD_REFUSED), by field."""
    c = policy.spec.router.classifier
    canary = policy.spec.router.canary
    keys: dict[str, tuple[str, str]] = {}
    for t in policy.spec.tiers:
        ref = t.endpoint.api_key_secret_ref if t.endpoint is not None else None
        if ref is not None:
            keys[t.name] = (ref.name, ref.key)
    return {
        CLASSIFIER_REF: c.model_dump(mode="json") if c is not None else None,
        API_KEY_REFS: keys,
        CANARY_REF: canary.classifier.model_dump(mode="json") if canary is not None else None,
    }


def refuse_restart_changes(running: RoutingPolicy, new: RoutingPolicy) -> None:
    """ConfigError naming each start-time input `new` changes from the policy the router started with."""
    before = policy_startup_inputs(running)
    after = policy_startup_inputs(new)
    changed = [f for f in RELOAD_REFUSED if before[f] != after[f]]
    if changed:
        raise ConfigError(
            f"{', '.join(changed)} changed; the router reads that only at start, so it takes a router restart "
            "(in a cluster the operator rolls the router)"
        )


def artifact_sha256(path: Path) -> str:
    """The artifact's own `sha256` field (a digest of its canonical JSON, what the operator reports on its copy);
    read again here because the loaded RouterArtifact does not keep it. "unknown" when the file says none."""
    try:
        value = json.loads(path.read_bytes()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return value if isinstance(value, str) and value else "unknown"


def report_classifier(metrics: RouterMetrics, source: Path | None, kind: str) -> str:
    """Say which classifier this process serves, from outside: a log line and
    tiergate_router_classifier_info{sha256, kind, source} 1. `source` None: no classifier (one tier)."""
    sha = artifact_sha256(source) if source is not None else "none"
    metrics.classifier_info.labels(sha256=sha, kind=kind, source=str(source or "none")).set(1)
    log.info("serving classifier %s (%s, sha256 %s)", source or "none", kind, sha)
    return sha
