"""Per-user routing profiles (tiergate_router.profiles): the adjustment rule, bounded state, argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tiergate.training.personas import user_adjustment
from tiergate_router.profiles import ProfileConfig, ProfileError, UserProfiles


def _profiles(max_users: int = 64, ways: int = 4) -> UserProfiles:
    return UserProfiles(ProfileConfig(tiers=3, max_users=max_users, prior=5.0, ways=ways), salt=b"test")


def test_first_time_user_and_no_user_get_the_policy_decision() -> None:
    p = _profiles()
    q = [0.2, 0.5, -math.inf]
    assert p.adjust(None, q) == q
    assert p.adjust("", q) == q
    assert p.adjust("alice", q) == q
    assert len(p) == 0  # adjust never inserts


def test_adjustment_is_the_simulated_rule_and_moves_toward_what_the_user_likes() -> None:
    p = _profiles()
    for _ in range(10):
        p.observe("alice", 0, -1.0, 0.6)  # tier 0 disappoints alice
        p.observe("alice", 1, 1.0, 0.6)  # tier 1 pleases her
    got = p.adjust("alice", [0.6, 0.6, 0.6])
    sums = np.array([[10 * (0.0 - 0.6), 10 * (1.0 - 0.6), 0.0]])
    counts = np.array([[10.0, 10.0, 0.0]])
    want = 0.6 + user_adjustment(sums, counts, 5.0)[0]
    assert got == pytest.approx(list(want), abs=1e-5)
    assert got[1] > got[2] > got[0]
    assert p.observations("alice") == 20
    assert p.observations("bob") == 0
    # Another user is unaffected; -inf (a tier not served) stays -inf.
    assert p.adjust("bob", [0.6, 0.6, 0.6]) == [0.6, 0.6, 0.6]
    assert p.adjust("alice", [0.6, 0.6, -math.inf])[2] == -math.inf


def test_a_strict_user_changes_no_choice() -> None:
    p = _profiles()
    for t in range(3):
        for _ in range(8):
            p.observe("strict", t, -1.0, 0.7)
    got = p.adjust("strict", [0.3, 0.5, 0.7])
    assert got[1] - got[0] == pytest.approx(0.2, abs=1e-6)
    assert got[2] - got[1] == pytest.approx(0.2, abs=1e-6)


def test_memory_is_fixed_and_users_beyond_capacity_evict_the_least_recent() -> None:
    p = _profiles(max_users=64, ways=4)
    before = p.nbytes
    for u in range(5000):
        p.observe(f"user-{u}", u % 3, 1.0, 0.5)
    assert p.nbytes == before
    assert len(p) <= 64
    assert p.evictions == 5000 - len(p)
    # The most recent user of each set survives; the very first one is long gone.
    assert p.observations("user-4999") == 1
    assert p.observations("user-0") == 0


def test_a_user_kept_busy_survives_a_flood_of_new_users() -> None:
    p = _profiles(max_users=64, ways=4)
    for u in range(2000):
        p.observe("regular", 1, 1.0, 0.5)
        p.observe(f"once-{u}", 0, 1.0, 0.5)
    assert p.observations("regular") == 2000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("u", 3, 0.5, 0.5), "tier 3"),
        (("u", -1, 0.5, 0.5), "tier -1"),
        (("u", 0, 1.5, 0.5), "rating 1.5"),
        (("u", 0, math.nan, 0.5), "rating nan"),
        (("u", 0, 0.5, math.inf), "predicted quality inf"),
        (("", 0, 0.5, 0.5), "user id"),
    ],
)
def test_bad_observations_are_refused_and_record_nothing(args: tuple[str, int, float, float], message: str) -> None:
    p = _profiles()
    with pytest.raises(ProfileError, match=message):
        p.observe(*args)
    assert len(p) == 0


def test_bad_configs_and_quality_lengths_are_refused() -> None:
    with pytest.raises(ProfileError, match="tiers"):
        ProfileConfig(tiers=0)
    with pytest.raises(ProfileError, match="max_users"):
        ProfileConfig(tiers=2, max_users=2, ways=4)
    with pytest.raises(ProfileError, match="prior"):
        ProfileConfig(tiers=2, prior=0.0)
    with pytest.raises(ProfileError, match="expected 3"):
        _profiles().adjust("u", [0.5, 0.5])
