"""The per-user profile simulation (tiergate.training.personas) on small synthetic outcome sets."""

from __future__ import annotations

import numpy as np

from tiergate.training import personas


def _ids(n: int) -> list[str]:
    return [f"row-{i}" for i in range(n)]


def test_pools_are_stable_and_hold_about_the_share() -> None:
    held, late = personas.split_pools(_ids(4000), 0.4)
    again, late2 = personas.split_pools(_ids(4000), 0.4)
    assert (held == again).all()
    assert (late == late2).all()
    assert 0.36 < held.mean() < 0.44
    assert 0.46 < late.mean() < 0.54


def test_users_ask_only_their_pool_and_domains_in_the_right_half() -> None:
    n = 3000
    tasks = [("math", "code", "trivia", "qa")[i % 4] for i in range(n)]
    held, late = personas.split_pools(_ids(n), 0.4)
    model = personas.UserModel(adapt=20, evaluate=15)
    users = personas.draw_users(50, tasks, held, late, 3, model, np.random.default_rng(0))
    assert users.adapt_rows.shape == (50, 20)
    assert users.eval_rows.shape == (50, 15)
    assert held[users.adapt_rows].all()
    assert held[users.eval_rows].all()
    assert not late[users.adapt_rows].any()
    assert late[users.eval_rows].all()
    for u in range(50):
        assert 1 <= len(users.domains[u]) <= 3
        asked = {tasks[r] for r in (*users.adapt_rows[u], *users.eval_rows[u])}
        assert asked <= set(users.domains[u])
    others = personas.draw_users(50, tasks, ~held, late, 3, model, np.random.default_rng(0))
    assert not (set(others.adapt_rows.ravel()) | set(others.eval_rows.ravel())) & set(np.flatnonzero(held))


def test_adjustment_is_zero_without_feedback_and_ranks_tiers_by_residual() -> None:
    zero = personas.user_adjustment(np.zeros((2, 3)), np.zeros((2, 3)), 10.0)
    assert (zero == 0).all()
    # A strict user: the same residual on every tier moves every tier alike, so no choice changes.
    strict = personas.user_adjustment(np.array([[-4.0, -4.0, -4.0]]), np.array([[10.0, 10.0, 10.0]]), 10.0)
    assert np.allclose(strict, strict[0, 0])
    mixed = personas.user_adjustment(np.array([[-3.0, 3.0, 0.0]]), np.array([[10.0, 10.0, 0.0]]), 10.0)
    assert mixed[0, 0] < mixed[0, 2] < mixed[0, 1]
    # More evidence, less shrinkage.
    more = personas.user_adjustment(np.array([[-30.0, 30.0, 0.0]]), np.array([[100.0, 100.0, 0.0]]), 10.0)
    assert more[0, 1] - more[0, 0] > mixed[0, 1] - mixed[0, 0]


def _taste_world(n_users: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, personas.Users]:
    """Two equally priced tiers that are both always right; half the users dislike tier 0's answers, half tier
    1's. The global prediction cannot tell them apart, so it sends everybody to tier 0 (ties: lower index)."""
    rows = 100
    predicted = np.full((rows, 2), 0.5)
    scores = np.ones((rows, 2))
    prices = np.array([1.0, 1.0])
    rng = np.random.default_rng(1)
    dislike_first = np.arange(n_users) % 2 == 0
    taste = np.where(dislike_first[:, None], [[-0.3, 0.3]], [[0.3, -0.3]])
    users = personas.Users(
        adapt_rows=rng.integers(0, rows, size=(n_users, 30)),
        eval_rows=rng.integers(0, rows, size=(n_users, 30)),
        taste=taste,
        strictness=np.full(n_users, 0.9),
        noise=np.full(n_users, 0.1),
        domains=[["a"]] * n_users,
    )
    return predicted, scores, prices, users


def test_per_user_adjustment_learns_a_users_taste_and_global_cannot() -> None:
    predicted, scores, prices, users = _taste_world(40)
    glob = personas.simulate(predicted, scores, prices, users, 0)
    mine = personas.simulate(predicted, scores, prices, users, 0, prior=2.0)
    dislike_first = np.arange(40) % 2 == 0
    # sigmoid((1 - 0.3 - 0.9) / 0.1) = 0.12 for the users stuck on the tier they dislike.
    assert np.allclose(glob.satisfaction[dislike_first], 1 / (1 + np.exp(2.0)))
    assert mine.satisfaction[dislike_first].mean() > 0.9
    assert mine.satisfaction[~dislike_first].mean() > 0.9
    assert (glob.counts[:, 1] == 0).all()
    oracle = personas.simulate(predicted, scores, prices, users, 0, oracle=True)
    assert oracle.satisfaction.mean() >= mine.satisfaction.mean()
    assert (oracle.counts == glob.counts).all()  # the oracle learns nothing: the adaptation phase is the global one
    assert (mine.counts[dislike_first, 1] > 0).all()


def test_pooled_correction_cancels_when_half_the_users_like_each_tier() -> None:
    sums = np.array([[-3.0, 0.0], [3.0, 0.0]])
    counts = np.array([[10.0, 0.0], [10.0, 0.0]])
    assert np.allclose(personas.pooled_adjustment(sums, counts, 10.0)[0], 0.0, atol=1e-9)
    # One user's strong dislike moves the pooled tier down.
    assert personas.pooled_adjustment(np.array([[-5.0, 5.0]]), np.array([[10.0, 10.0]]), 1.0)[0] < 0


def test_at_budget_picks_the_best_point_that_fits() -> None:
    quality = np.array([[0.5, 0.7, 0.9], [0.5, 0.7, 0.9]])
    cost = np.array([[0.2, 0.5, 1.0], [0.2, 0.5, 1.0]])
    assert personas.at_budget(quality, cost, 0.6)[0] == 0.7
    assert personas.at_budget(quality, cost, 5.0)[0] == 0.9
    assert np.isnan(personas.at_budget(quality, cost, 0.1)[0])


def test_comparison_of_a_curve_with_itself_is_zero_and_a_better_one_positive() -> None:
    rng = np.random.default_rng(0)
    q = rng.uniform(0.4, 0.8, size=(200, 5))
    c = np.tile(np.linspace(0.2, 1.0, 5), (200, 1))
    base = personas.Curve("a", (0, 1, 2, 3, 4), q, c, q)
    rows, mean = personas.compare_at_budgets(base, base, [0.5, 0.8], samples=200)
    assert all(r.diff == 0 and r.lo == 0 and r.hi == 0 for r in (*rows, mean))
    better = personas.Curve("b", base.cost_weights_bp, q + 0.05, c, q)
    rows, mean = personas.compare_at_budgets(base, better, [0.5, 0.8], samples=200)
    for r in (*rows, mean):
        assert abs(r.diff - 0.05) < 1e-9
        assert 0.04 < r.lo <= r.hi < 0.06
