"""Per-user routing profiles on the request path (issue 16): `profiles.UserProfiles` wired into the router.

- A routed request with the OpenAI `user` field has a user key, `user_key(tenant, user)`: two tenants' "alice" never
  share a profile. Without it (and on gRPC, whose messages carry no user) nothing is adjusted or learnt.
- `Personalizer.adjust` gives the N-tier head's per-artifact-tier quality plus the user's adjustment, which the
  router's cost-weighted choice then weighs (`Router._decide`); None when nothing applies: no profiles configured,
  no user, a user without ratings, or a tenant whose budget is low or spent (the budget decides there). Forced and
  classifier-error routes never classify, so they never reach it.
- What feedback needs is kept with the request's summary for feedback (`decision_records.Recorder`): the user key,
  the artifact column of the tier that answered and the head's *unadjusted* prediction for it (`ProfileRef`), so
  that residuals never feed the adjustment back into itself. `Personalizer.observe` takes a rating for it: explicit
  feedback after the join and the duplicate check, and the re-query signal as -1.
- One table per router, rebuilt (empty) when the artifact, its tier count or the settings change: residuals are
  against one head's predictions. A rating for a request decided before the rebuild is dropped (`generation`).

The rule and its measurements: `profiles` and docs/routing.md, "Per-user profiles".
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiergate_router.metrics import RouterMetrics
from tiergate_router.profiles import ProfileConfig, UserProfiles

if TYPE_CHECKING:
    from tiergate_router.config import RouterConfig

# A longer `user` is keyed by its sha256: the key is remembered with each request for feedback (RECENT_REQUESTS of
# them), so its size is bounded whatever a client sends. OpenAI's own ids are far shorter.
MAX_USER_CHARS = 256


def user_key(tenant: str | None, user: object) -> str | None:
    """The profile key of a request: `{tenant or '-'}/{user}`; None without a non-empty string `user`."""
    if not isinstance(user, str) or not user:
        return None
    if len(user) > MAX_USER_CHARS:
        user = "sha256:" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{tenant or '-'}/{user}"


@dataclass(frozen=True, slots=True)
class ProfileDraft:
    """A routed request's side of a profile update, known when it is decided: whose, against which table, and how
    the config's tiers map to the artifact's columns (so the answering tier, known at the end, finds its column)."""

    key: str
    generation: int
    tiers: tuple[str, ...]
    columns: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ProfileRef:
    """What a rating of one answered request needs: the user, the artifact column of the tier that answered and the
    head's unadjusted predicted quality for it, and the table generation it was decided against."""

    key: str
    column: int
    predicted: float
    generation: int


class Personalizer:
    """The router's profile table (None when personalization is off) and its metrics."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics
        self.table: UserProfiles | None = None
        self.generation = 0
        self._built_for: tuple[ProfileConfig, object] | None = None

    def apply(self, cfg: RouterConfig) -> None:
        """A new config: keep the table when the artifact and settings are the same, else start an empty one."""
        p, mt = cfg.personalization, cfg.multi_tier
        if p is None or mt is None:
            self.table, self._built_for = None, None
            self.metrics.user_profiles.set(0)
            return
        want = ProfileConfig(tiers=len(mt.prices), max_users=p.max_users, prior=float(p.prior_strength))
        if self._built_for is not None and self._built_for[0] == want and self._built_for[1] is mt.artifact:
            return
        self.table = UserProfiles(want)
        self._built_for = (want, mt.artifact)
        self.generation += 1
        self.metrics.user_profiles.set(0)

    def draft(self, key: str | None, cfg: RouterConfig) -> ProfileDraft | None:
        """The draft for an N-tier decision (None when profiles are off or the request has no user)."""
        mt = cfg.multi_tier
        if key is None or self.table is None or mt is None:
            return None
        return ProfileDraft(key, self.generation, cfg.tier_names, mt.columns)

    def adjust(self, draft: ProfileDraft | None, quality: Sequence[float]) -> list[float] | None:
        """The user's adjusted per-artifact-tier quality, or None when their profile holds nothing (a first-time
        user gets the policy's decision exactly)."""
        table = self.table
        if draft is None or table is None or draft.generation != self.generation:
            return None
        if len(quality) != table.config.tiers:
            return None
        adjusted = table.adjust(draft.key, quality)
        return None if adjusted == [float(v) for v in quality] else adjusted

    def counted(self, changed: bool) -> None:
        """An adjusted decision, and whether the adjustment changed the tier chosen."""
        self.metrics.personalized_decisions.labels("true" if changed else "false").inc()

    @staticmethod
    def ref(draft: ProfileDraft | None, scores: Sequence[float] | None, tier: str) -> ProfileRef | None:
        """The request's ProfileRef once `tier` answered it (None when no tier did, or it is not a config tier)."""
        if draft is None or scores is None or tier not in draft.tiers:
            return None
        column = draft.columns[draft.tiers.index(tier)]
        predicted = float(scores[column])
        if not math.isfinite(predicted):
            return None
        return ProfileRef(draft.key, column, predicted, draft.generation)

    def observe(self, ref: ProfileRef, rating: float) -> None:
        """A rating in -1 .. 1 of the answer `ref` describes (dropped when the table was rebuilt since)."""
        table = self.table
        if table is None or ref.generation != self.generation:
            return
        evictions = table.evictions
        table.observe(ref.key, ref.column, rating, ref.predicted)
        if table.evictions != evictions:
            self.metrics.user_profile_evictions.inc(table.evictions - evictions)
        self.metrics.user_profiles.set(len(table))
