"""APGR, CPT and N-tier figures against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from tiergate.routing.errors import DataError
from tiergate.training.metrics import apgr, oracle_choice, oracle_scores, pgr_curve, tier_point


def test_pgr_curve_by_hand() -> None:
    # 4 prompts. gains s - w: p0 +1, p1 0, p2 +1, p3 -1. q_w = 2/4, q_s = 3/4, gap 0.25.
    weak = np.array([0.0, 1.0, 0.0, 1.0])
    strong = np.array([1.0, 1.0, 1.0, 0.0])
    router = np.array([0.9, 0.8, 0.7, 0.1])  # order p0, p1, p2, p3
    c = pgr_curve(router, weak, strong)
    np.testing.assert_allclose(c.share, [0, 0.25, 0.5, 0.75, 1.0])
    # cumulative gain 0, 1, 1, 2, 1 -> quality 0.5 + g/4 -> PGR = g/4/0.25 = g
    np.testing.assert_allclose(c.pgr, [0, 1, 1, 2, 1])
    # trapezoids of width 0.25: (0+1)/2 + (1+1)/2 + (1+2)/2 + (2+1)/2 = 0.5+1+1.5+1.5 = 4.5 -> 4.5 * 0.25
    assert c.apgr == pytest.approx(1.125)
    assert c.cpt(0.5) == pytest.approx(0.125)  # halfway up the first segment
    assert c.cpt(1.0) == pytest.approx(0.25)
    assert c.cpt(1.5) == pytest.approx(0.625)
    assert c.cpt(3.0) == 1.0  # never reached


def test_ties_are_averaged() -> None:
    # Two tied prompts: one gains +1, one 0. Expected over tie-breaking: a straight segment.
    weak = np.array([0.0, 1.0])
    strong = np.array([1.0, 1.0])
    c = pgr_curve(np.array([0.5, 0.5]), weak, strong)
    np.testing.assert_allclose(c.share, [0, 1])
    np.testing.assert_allclose(c.pgr, [0, 1])
    assert c.apgr == pytest.approx(0.5)


def test_constant_router_is_random_and_oracle_beats_it() -> None:
    rng = np.random.default_rng(3)
    weak = (rng.random(500) < 0.6).astype(float)
    strong = (rng.random(500) < 0.8).astype(float)
    assert apgr(np.zeros(500), weak, strong) == pytest.approx(0.5)
    assert apgr(oracle_scores(weak, strong), weak, strong) > 0.9
    # A router that ranks exactly backwards does worse than random.
    assert apgr(-oracle_scores(weak, strong), weak, strong) < 0.5


def test_equal_quality_is_refused() -> None:
    with pytest.raises(DataError, match="same mean quality"):
        pgr_curve(np.array([0.1, 0.2]), np.array([1.0, 0.0]), np.array([0.0, 1.0]))


def test_tier_point_and_oracle() -> None:
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    prices = np.array([0.2, 0.4, 1.8])
    pt = tier_point("x", np.array([0, 1, 2, 0]), scores, prices)
    assert pt.quality == pytest.approx(0.75)
    assert pt.cost == pytest.approx((0.2 + 0.4 + 1.8 + 0.2) / 4)
    assert pt.shares == pytest.approx([0.5, 0.25, 0.25])
    # Oracle: best score, cheapest among ties (row 3: all zero -> cheapest).
    np.testing.assert_array_equal(oracle_choice(scores, prices), [0, 1, 2, 0])
