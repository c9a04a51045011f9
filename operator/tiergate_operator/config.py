"""The operator's one typed configuration object, loaded once at start-up from flags and environment.

Environment variables (prefix TIERGATE_OPERATOR_) let the Deployment set what flags would; flags win.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .errors import ConfigError

ENV_PREFIX = "TIERGATE_OPERATOR_"


@dataclass(frozen=True)
class OperatorConfig:
    namespace: str | None = None
    """Watch only this namespace; None watches all namespaces."""
    field_manager: str = "tiergate-operator"
    """Server-side-apply field manager: the name under which the operator owns the fields it sets."""
    resync_seconds: float = 60.0
    """Re-apply every policy this often even without events: restores hand-edits to fields of kinds whose changes
    we do not watch. Deletions of children are seen at once (watched); a minute bounds the rest."""
    settle_seconds: float = 0.05
    """Coalesce bursts of child events (a rollout emits dozens) into one reconcile per policy."""
    status_settle_seconds: float = 0.5
    """The same for refreshes of status only (children reporting progress): half a second keeps status timely
    while turning a rollout's event storm into a handful of refreshes."""
    workers: int = 16
    """Threads for blocking API calls. The API server, not our CPU, is the limit; 16 keeps 200 policies created
    at once within seconds without flooding a small control plane."""
    leader_elect: bool = False
    """Hold a coordination.k8s.io Lease before acting, so that of two replicas only one writes."""
    lease_name: str = "tiergate-operator"
    lease_namespace: str = "default"
    lease_duration_seconds: float = 15.0
    """How long a lease record may stay unchanged before a standby takes it over (client-go's defaults, as
    controller-runtime ships them: 15 s / 10 s / 2 s). A crashed leader is replaced within about this long."""
    lease_renew_deadline_seconds: float = 10.0
    """The leader writes only while its last successful renewal started less than this long ago (monotonic
    clock), and steps down when it cannot renew within it. Shorter than the lease duration by a margin that
    covers a write already in flight and clock-rate differences, so that the old leader has stopped writing
    before any standby can consider the lease expired."""
    lease_retry_period_seconds: float = 2.0
    """How often the leader renews and a standby retries: several attempts fit in the renew deadline, so one
    slow or failed request does not cost the lease."""
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    health_port: int | None = None
    """Serve kopf's liveness endpoint on this port (GET /healthz); None: no endpoint."""
    kubeconfig: str | None = None
    """Explicit kubeconfig path; None: in-cluster credentials when running in a pod, else KUBECONFIG/~/.kube."""
    external_check_seconds: float = 30.0
    """How often each external tier's endpoint is checked (`GET {url}/models`) for status (external.py)."""
    external_check_timeout_seconds: float = 5.0
    """How long one such check may take before the endpoint counts as unreachable."""
    mix_report_seconds: float = 15.0
    """How often every router pod's /metrics is read for status.observedMix (observed_mix.py): Prometheus' usual
    scrape interval, one small GET per router pod."""
    mix_read_timeout_seconds: float = 2.0
    """How long one such read may take (a router answers /metrics from memory)."""

    def __post_init__(self) -> None:
        if self.resync_seconds <= 0:
            raise ConfigError(f"resync_seconds must be positive, got {self.resync_seconds}")
        if self.external_check_seconds <= 0 or self.external_check_timeout_seconds <= 0:
            raise ConfigError("external_check_seconds and external_check_timeout_seconds must be positive")
        if self.mix_report_seconds <= 0 or self.mix_read_timeout_seconds <= 0:
            raise ConfigError("mix_report_seconds and mix_read_timeout_seconds must be positive")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if not 0 < self.lease_retry_period_seconds < self.lease_renew_deadline_seconds < self.lease_duration_seconds:
            raise ConfigError(
                "leader election needs lease_duration_seconds > lease_renew_deadline_seconds > "
                f"lease_retry_period_seconds > 0, got {self.lease_duration_seconds} / "
                f"{self.lease_renew_deadline_seconds} / {self.lease_retry_period_seconds}"
            )

    @property
    def lease_call_timeout_seconds(self) -> float:
        """Bound on each phase (connect, read) of one request of the elector: an attempt (GET then PUT) takes at
        most half the renew deadline, so a hung API server leaves room for another attempt before it."""
        return self.lease_renew_deadline_seconds / 4

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> OperatorConfig:
        """Environment first, then explicit overrides (from flags; None means 'not given')."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        casts: dict[str, tuple[str, Callable[[str], object]]] = {
            "NAMESPACE": ("namespace", str),
            "FIELD_MANAGER": ("field_manager", str),
            "RESYNC_SECONDS": ("resync_seconds", float),
            "WORKERS": ("workers", int),
            "LEADER_ELECT": ("leader_elect", _bool),
            "LEASE_NAME": ("lease_name", str),
            "LEASE_NAMESPACE": ("lease_namespace", str),
            "LEASE_DURATION_SECONDS": ("lease_duration_seconds", float),
            "LEASE_RENEW_DEADLINE_SECONDS": ("lease_renew_deadline_seconds", float),
            "LEASE_RETRY_PERIOD_SECONDS": ("lease_retry_period_seconds", float),
            "HEALTH_PORT": ("health_port", int),
            "EXTERNAL_CHECK_SECONDS": ("external_check_seconds", float),
            "EXTERNAL_CHECK_TIMEOUT_SECONDS": ("external_check_timeout_seconds", float),
            "MIX_REPORT_SECONDS": ("mix_report_seconds", float),
            "MIX_READ_TIMEOUT_SECONDS": ("mix_read_timeout_seconds", float),
        }
        for suffix, (attr, cast) in casts.items():
            raw = env.get(ENV_PREFIX + suffix)
            if raw is None or raw == "":
                continue
            try:
                values[attr] = cast(raw)
            except ValueError as e:
                raise ConfigError(f"{ENV_PREFIX}{suffix}={raw!r}: {e}") from e
        # The Deployment passes its own namespace through the downward API; the lease lives there by default.
        if "lease_namespace" not in values and env.get("POD_NAMESPACE"):
            values["lease_namespace"] = env["POD_NAMESPACE"]
        if env.get("POD_NAME"):
            values["identity"] = env["POD_NAME"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)  # type: ignore[arg-type]
        except TypeError as e:
            raise ConfigError(str(e)) from e


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")
