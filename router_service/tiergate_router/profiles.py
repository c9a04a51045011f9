"""Per-user routing profiles (issue 16): a bounded table of each returning user's feedback per tier, turned into an
additive adjustment of the N-tier head's predicted quality before `decision.choose_multi_tier`.

What it does, and why this rule: docs/routing.md, "Per-user profiles", measured on simulated held-out users with
bench/personalisation_quality.py (the rule is `tiergate.training.personas.user_adjustment`, the same arithmetic):
a user's residual per tier (their rating mapped to [0, 1] minus the quality the head predicted for the tier that
answered) is summed; the adjustment of tier t is `(S_t - n_t * m) / (n_t + prior)` with `m = sum(S) / (sum(n) +
prior)`: centred on the user's mean residual (a strict user is no reason to change tiers) and shrunk toward 0, so a
first-time user gets exactly the policy's decision and a returning one moves only with evidence.

Bounded state: a fixed, preallocated set-associative table (`max_users` slots in sets of `ways`), keyed by a salted
64-bit hash of the user id (no id is stored); a new user takes the least recently used slot of its set. Memory is
`nbytes`, whatever the number of distinct users (bench/profiles_memory.py: a million users).

On the request path through `personalize.Personalizer` (`spec.router.personalization`, docs/router.md).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The shrinkage chosen on simulated *train* users (bench/personalisation_quality.py tries 5, 20, 50, 200): 50 for
# the default simulation (seeds 0 and 1) and with 100 ratings, 200 where users barely differ between models or
# rate only 10 answers, 20 where they differ a lot. About fifty ratings before a user's own residuals weigh as much
# as the global prediction; docs/routing.md, "Per-user profiles", says what it costs where users do not differ.
DEFAULT_PRIOR = 50.0
# 100,000 users of 9 tiers is about 7.6 MB of table: a router replica's worth of regulars.
DEFAULT_MAX_USERS = 100_000
# 4 ways: two busy users that hash to the same set do not evict each other, and a lookup scans 4 keys.
DEFAULT_WAYS = 4


class ProfileError(ValueError):
    """A bad argument to the profile table (an unknown tier, a rating outside -1 .. 1)."""


@dataclass(frozen=True)
class ProfileConfig:
    tiers: int
    max_users: int = DEFAULT_MAX_USERS
    prior: float = DEFAULT_PRIOR
    ways: int = DEFAULT_WAYS

    def __post_init__(self) -> None:
        if self.tiers < 1:
            raise ProfileError(f"tiers must be >= 1, got {self.tiers}")
        if self.ways < 1 or self.max_users < self.ways:
            raise ProfileError(f"max_users ({self.max_users}) must be >= ways ({self.ways}) >= 1")
        if not math.isfinite(self.prior) or self.prior <= 0:
            raise ProfileError(f"prior must be a positive number, got {self.prior}")


class UserProfiles:
    """The table. `adjust` on the routing path (read only, no insertion), `observe` when a rating arrives."""

    def __init__(self, config: ProfileConfig, *, salt: bytes | None = None) -> None:
        self.config = config
        sets = config.max_users // config.ways
        # A per-process salt: the keys say nothing about user ids to whoever reads a memory dump or a later run.
        self._salt = salt if salt is not None else os.urandom(16)
        self._keys = np.zeros((sets, config.ways), dtype=np.uint64)  # 0: empty slot
        self._stamps = np.zeros((sets, config.ways), dtype=np.uint64)  # last use, for LRU within the set
        self._sums = np.zeros((sets, config.ways, config.tiers), dtype=np.float32)
        self._counts = np.zeros((sets, config.ways, config.tiers), dtype=np.float32)
        self._clock = 0
        self._users = 0
        self.evictions = 0
        # The router's front ends may call from worker threads (gRPC); one lock, held for microseconds.
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of the table: fixed at construction."""
        return self._keys.nbytes + self._stamps.nbytes + self._sums.nbytes + self._counts.nbytes

    def __len__(self) -> int:
        """Users held now (at most `max_users` rounded down to whole sets)."""
        return self._users

    def _key(self, user_id: str) -> int:
        h = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8, key=self._salt[:64]).digest()
        return int.from_bytes(h, "big") or 1

    def _find(self, key: int) -> tuple[int, int]:
        s = key % self._keys.shape[0]
        hit = np.flatnonzero(self._keys[s] == np.uint64(key))
        return s, int(hit[0]) if len(hit) else -1

    def _touch(self, s: int, way: int) -> None:
        self._clock += 1
        self._stamps[s, way] = self._clock

    def observations(self, user_id: str) -> int:
        """How many ratings the table holds for the user (0 for an unknown or evicted one)."""
        with self._lock:
            s, way = self._find(self._key(user_id))
            return 0 if way < 0 else int(self._counts[s, way].sum())

    def adjust(self, user_id: str | None, quality: Sequence[float]) -> list[float]:
        """The head's predicted per-tier `quality` plus this user's adjustment; unchanged for no user, an unknown
        one or one without ratings. -inf (a tier the policy does not serve) stays -inf."""
        q = [float(v) for v in quality]
        if len(q) != self.config.tiers:
            raise ProfileError(f"expected {self.config.tiers} predicted qualities, got {len(q)}")
        if not user_id:
            return q
        with self._lock:
            s, way = self._find(self._key(user_id))
            if way < 0:
                return q
            self._touch(s, way)
            # Plain floats: numpy arithmetic on a row of a few tiers costs several times more per call.
            sums: list[float] = self._sums[s, way].tolist()
            counts: list[float] = self._counts[s, way].tolist()
        prior = self.config.prior
        mean = sum(sums) / (sum(counts) + prior)
        return [v + (sm - n * mean) / (n + prior) for v, sm, n in zip(q, sums, counts, strict=True)]

    def observe(self, user_id: str, tier: int, rating: float, predicted: float) -> None:
        """Record a rating in -1 .. 1 (the `POST /v1/feedback` scale) of an answer from `tier`, for which the head
        had predicted quality `predicted` (the decision log's figure for the chosen tier). A new user takes the
        least recently used slot of its set."""
        if not user_id:
            raise ProfileError("a rating needs a user id")
        if isinstance(tier, bool) or not isinstance(tier, int) or not 0 <= tier < self.config.tiers:
            raise ProfileError(f"tier {tier!r} is not an index in 0..{self.config.tiers - 1}")
        if not (math.isfinite(rating) and -1.0 <= rating <= 1.0):
            raise ProfileError(f"rating {rating!r} must be a number in -1 .. 1")
        if not math.isfinite(predicted):
            raise ProfileError(f"predicted quality {predicted!r} must be finite")
        residual = (rating + 1.0) / 2.0 - predicted
        key = self._key(user_id)
        with self._lock:
            s, way = self._find(key)
            if way < 0:
                way = int(np.argmin(self._stamps[s]))
                if self._keys[s, way]:
                    self.evictions += 1
                else:
                    self._users += 1
                self._keys[s, way] = key
                self._sums[s, way] = 0.0
                self._counts[s, way] = 0.0
            self._touch(s, way)
            self._sums[s, way, tier] += residual
            self._counts[s, way, tier] += 1.0
