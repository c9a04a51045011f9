"""Label modes (Hybrid LLM) on tiny synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from tiergate.routing.errors import DataError
from tiergate.training.labels import check_two_classes, choose_margin, neighbour_average, two_tier_targets


def _two_clusters() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Cluster A (rows 0-3): weak already right. Cluster B (rows 4-7): strong wins on 3 of 4.
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.0, 1.0, 0.0])
    x = np.stack([a] * 4 + [b] * 4).astype(np.float32)
    x += np.random.default_rng(0).normal(0, 0.01, x.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    weak = np.array([1, 1, 1, 1, 0, 0, 0, 1], dtype=float)
    strong = np.array([1, 1, 1, 1, 1, 1, 1, 0], dtype=float)
    return x, weak, strong


def test_deterministic_is_strong_strictly_better() -> None:
    x, w, s = _two_clusters()
    y, t = two_tier_targets("deterministic", w, s, x, k=4)
    np.testing.assert_array_equal(y, [0, 0, 0, 0, 1, 1, 1, 0])
    assert t is None


def test_difference_averages_over_the_neighbourhood() -> None:
    x, w, s = _two_clusters()
    y, _ = two_tier_targets("difference", w, s, x, k=4)
    # Cluster A: gain 0 everywhere -> 0.5. Cluster B: gains 1,1,1,-1 averaged (weights near-equal, self x20
    # is the same for every row) -> between 0.5 and 1 and well above cluster A.
    np.testing.assert_allclose(y[:4], 0.5, atol=1e-9)
    assert np.all(y[4:] > 0.55)
    # The row whose own sample says "weak wins" (row 7) still gets a high target from its neighbours.
    assert y[7] > 0.5


def test_probabilistic_estimates_strong_beats_weak() -> None:
    x, w, s = _two_clusters()
    y, _ = two_tier_targets("probabilistic", w, s, x, k=4)
    np.testing.assert_allclose(y[:4], 0.0, atol=1e-9)
    assert np.all((y[4:] > 0.3) & (y[4:] < 1.0))


def test_transformed_margin_balances_labels() -> None:
    x, w, s = _two_clusters()
    y, t = two_tier_targets("transformed", w, s, x, k=4)
    assert t is not None
    assert set(np.unique(y)) == {0.0, 1.0}
    np.testing.assert_array_equal(y[:4], 0)
    np.testing.assert_array_equal(y[4:], 1)


def test_choose_margin_by_hand() -> None:
    # Values 0,0,0,1,2,3: t=0 -> 3 of 6 above (balanced, 2p(1-p) max); t=1 -> 2/6; t=2 -> 1/6.
    assert choose_margin(np.array([0, 0, 0, 1, 2, 3], dtype=float)) == 0.0
    assert choose_margin(np.array([0, 1, 2, 3, 4, 5], dtype=float)) == 2.0


def test_neighbour_average_k1_is_identity() -> None:
    x, w, _ = _two_clusters()
    np.testing.assert_allclose(neighbour_average(x, w, 1), w)


def test_unknown_mode_and_single_class() -> None:
    x, w, s = _two_clusters()
    with pytest.raises(DataError, match="unknown label mode"):
        two_tier_targets("bogus", w, s, x, k=2)
    with pytest.raises(DataError, match=r"single class.*f\.jsonl:1 \.\. f\.jsonl:3"):
        check_two_classes(np.zeros(3), [("f.jsonl", 1), ("f.jsonl", 2), ("f.jsonl", 3)], "label")
    check_two_classes(np.array([0.0, 1.0]), [("f", 1), ("f", 2)], "label")
