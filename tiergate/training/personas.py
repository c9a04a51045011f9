"""Simulated users over per-prompt outcome data, to measure per-user routing profiles (issue 16) offline.

The public routing data has no users, so users are drawn (docs/routing.md, "Per-user profiles: the simulation"):

- Prompts are split once, by a hash of their id, into a pool for *train* users and a pool for *held-out* users;
  each pool is split again into an early half (a user's adaptation history) and a late half (their evaluation
  prompts). Nothing a held-out user asks or says is used to fit anything global: the global router is trained on
  the train pool only, and the pooled correction (below) on train users' feedback only.
- Each user has 1 to 3 preferred task domains (tasks drawn in proportion to their size in the pool) and asks
  prompts of those tasks only, uniformly over the domains.
- Each user judges answers their own way: a perceived quality `v = score + taste[model]` (taste: a per-user,
  per-model offset, normal with sd `taste_sd`, for style and verbosity the benchmark does not measure), a
  strictness `tau` and a judgement noise `s`. Their thumbs-up probability is the logistic
  `sigmoid((v - tau) / s)`; their feedback is +1 with that probability, else -1. The quality a user gets is that
  probability (their expected satisfaction), so evaluation needs no second coin flip.

Routing is the N-tier rule of `tiergate.routing.operating_points.choose_tiers` (argmax of predicted quality -
lambda * price) on the global head's predicted per-tier quality, plus an additive per-tier adjustment:

- `pooled`: one per-tier correction for everybody, from train users' feedback (a global recalibration, the
  control that tells whether a per-user gain is just a global miscalibration fixed per user);
- `per-user`: the user's own mean residual (feedback mapped to [0, 1] minus the predicted quality) per tier,
  centred on the user's mean residual over all tiers (a strict user is not a reason to change tiers) and shrunk
  toward 0 by the number of observations: `(S_t - n_t * m) / (n_t + k)`, `m = sum(S) / (sum(n) + k)`.

`held_out_study` runs the whole comparison (bench/personalisation_quality.py prints it; the only part that needs
torch is the global head's fit).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
# Budgets ($/Mtok, input + output list price) between the LLMRouter data's cheapest tier (0.2) and its 70B tiers
# (1.8): the range where the router mixes tiers.
BUDGETS = (0.3, 0.4, 0.5, 0.7, 0.9, 1.2)
# Pseudo-observations for the pooled correction: it sees thousands of ratings per tier, so 10 only guards the
# tiers train users were almost never sent to.
POOLED_PRIOR = 10.0


@dataclass(frozen=True)
class UserModel:
    """How users are drawn; the defaults are the simulation the docs report."""

    min_domains: int = 1
    max_domains: int = 3
    # Strictness tau in [lo, hi]: perceived quality at which the thumbs-up chance is one half.
    strictness: tuple[float, float] = (0.2, 0.8)
    # Judgement noise s in [lo, hi] (logistic scale): 0.1 is a near-deterministic judge, 0.4 a noisy one.
    noise: tuple[float, float] = (0.1, 0.4)
    # Per-model taste sd: 0.1 moves a 0/1 answer's perceived quality by a tenth; 0 turns taste off.
    taste_sd: float = 0.1
    adapt: int = 40
    evaluate: int = 40


@dataclass(frozen=True)
class Users:
    """Drawn users: row indices (into the outcome set) of each user's adaptation and evaluation prompts."""

    adapt_rows: IntArray  # [users, adapt]
    eval_rows: IntArray  # [users, evaluate]
    taste: FloatArray  # [users, models]
    strictness: FloatArray  # [users]
    noise: FloatArray  # [users]
    domains: list[list[str]]

    def __len__(self) -> int:
        return len(self.strictness)


def id_fraction(row_id: str, salt: str) -> float:
    """A stable number in [0, 1) from the id: the pool split is the same on every run and machine."""
    digest = hashlib.sha256(f"{salt}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_pools(ids: Sequence[str], held_out_share: float) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(held_out, late): whether each row belongs to the held-out users' pool, and to the late (evaluation) half
    of its pool. Hash-based and disjoint by construction."""
    held = np.array([id_fraction(i, "users") < held_out_share for i in ids], dtype=bool)
    late = np.array([id_fraction(i, "phase") < 0.5 for i in ids], dtype=bool)
    return held, late


def draw_users(
    n: int,
    tasks: Sequence[str],
    pool: npt.NDArray[np.bool_],
    late: npt.NDArray[np.bool_],
    n_models: int,
    model: UserModel,
    rng: np.random.Generator,
) -> Users:
    """`n` users whose prompts come from the rows where `pool` holds: adaptation prompts from the early half,
    evaluation prompts from the late half, both restricted to the user's domains (tasks with rows in both
    halves). Prompts are drawn with replacement: several users may ask the same prompt, as in real traffic."""
    names = np.asarray(tasks)
    early_by: dict[str, IntArray] = {}
    late_by: dict[str, IntArray] = {}
    for t in sorted(set(tasks)):
        rows = names == t
        e, lt = np.flatnonzero(rows & pool & ~late), np.flatnonzero(rows & pool & late)
        if len(e) and len(lt):
            early_by[t], late_by[t] = e.astype(np.int64), lt.astype(np.int64)
    if not early_by:
        raise ValueError("no task has prompts in both halves of the pool")
    keys = sorted(early_by)
    weight = np.array([len(early_by[t]) + len(late_by[t]) for t in keys], dtype=np.float64)
    weight /= weight.sum()
    adapt = np.zeros((n, model.adapt), dtype=np.int64)
    evaluate = np.zeros((n, model.evaluate), dtype=np.int64)
    domains: list[list[str]] = []
    for u in range(n):
        k = int(rng.integers(model.min_domains, min(model.max_domains, len(keys)) + 1))
        mine = [keys[i] for i in rng.choice(len(keys), size=k, replace=False, p=weight)]
        domains.append(mine)
        for out, by in ((adapt, early_by), (evaluate, late_by)):
            picks = rng.integers(0, k, size=out.shape[1])
            for j, d in enumerate(picks):
                rows = by[mine[int(d)]]
                out[u, j] = rows[int(rng.integers(0, len(rows)))]
    return Users(
        adapt_rows=adapt,
        eval_rows=evaluate,
        taste=rng.normal(0.0, model.taste_sd, size=(n, n_models)) if model.taste_sd > 0 else np.zeros((n, n_models)),
        strictness=rng.uniform(*model.strictness, size=n),
        noise=rng.uniform(*model.noise, size=n),
        domains=domains,
    )


def satisfaction(score: FloatArray, taste: FloatArray, strictness: FloatArray, noise: FloatArray) -> FloatArray:
    """Thumbs-up probability: sigmoid((score + taste - strictness) / noise), arrays broadcast together."""
    z = (score + taste - strictness) / noise
    out: FloatArray = 1.0 / (1.0 + np.exp(-z))
    return out


def choose(quality: FloatArray, prices: FloatArray, cost_weight_bp: int) -> IntArray:
    """`operating_points.choose_tiers` over the last axis of any-shaped `quality` (the run-time rule)."""
    from tiergate.routing.operating_points import choose_tiers

    flat = quality.reshape(-1, quality.shape[-1])
    res: IntArray = choose_tiers(flat, prices, cost_weight_bp).reshape(quality.shape[:-1])
    return res


def user_adjustment(sums: FloatArray, counts: FloatArray, prior: float) -> FloatArray:
    """Per-user per-tier adjustment `[users, tiers]` from residual sums and counts: centred on the user's mean
    residual and shrunk toward 0 by `prior` pseudo-observations (module docstring)."""
    mean = sums.sum(axis=-1, keepdims=True) / (counts.sum(axis=-1, keepdims=True) + prior)
    out: FloatArray = (sums - counts * mean) / (counts + prior)
    return out


def pooled_adjustment(sums: FloatArray, counts: FloatArray, prior: float) -> FloatArray:
    """One per-tier correction `[tiers]` from many users' residuals, each centred on its user's mean first."""
    mean = sums.sum(axis=-1, keepdims=True) / (counts.sum(axis=-1, keepdims=True) + prior)
    out: FloatArray = (sums - counts * mean).sum(axis=0) / (counts.sum(axis=0) + prior)
    return out


@dataclass(frozen=True)
class Phase:
    """Per-user means over evaluation prompts `[users]`, and the residual statistics gathered while adapting."""

    satisfaction: FloatArray
    cost: FloatArray
    score: FloatArray
    sums: FloatArray
    counts: FloatArray


def simulate(
    predicted: FloatArray,
    scores: FloatArray,
    prices: FloatArray,
    users: Users,
    cost_weight_bp: int,
    *,
    bias: FloatArray | None = None,
    prior: float | None = None,
    oracle: bool = False,
    seed: int = 0,
) -> Phase:
    """Route each user's adaptation prompts in order, collecting their feedback, then their evaluation prompts
    with what was learnt frozen. `predicted`/`scores`: `[rows, tiers]`; `bias`: a per-tier correction for
    everybody (pooled) or None; `prior`: the per-user shrinkage (None: no per-user adjustment, so the adaptation
    phase only records feedback, as the global router would); `oracle`: evaluate with the users' true taste as
    the adjustment (the headroom of any per-tier adjustment; nothing is learnt)."""
    rng = np.random.default_rng(seed)
    n, tiers = len(users), predicted.shape[1]
    base = np.zeros(tiers) if bias is None else bias
    sums, counts = np.zeros((n, tiers)), np.zeros((n, tiers))
    who = np.arange(n)
    for h in range(users.adapt_rows.shape[1]):
        rows = users.adapt_rows[:, h]
        q = predicted[rows] + base
        if prior is not None:
            q = q + user_adjustment(sums, counts, prior)
        t = choose(q, prices, cost_weight_bp)
        p = satisfaction(scores[rows, t], users.taste[who, t], users.strictness, users.noise)
        rating = np.where(rng.random(n) < p, 1.0, -1.0)
        # Residual against the shared prediction, not against the user's own adjusted one, so the sums stay
        # a plain per-tier mean of what this user said minus what everybody would have predicted.
        sums[who, t] += (rating + 1.0) / 2.0 - (predicted[rows, t] + base[t])
        counts[who, t] += 1.0
    adj = user_adjustment(sums, counts, prior) if prior is not None else np.zeros((n, tiers))
    if oracle:
        adj = users.taste
    rows = users.eval_rows
    t = choose(predicted[rows] + base + adj[:, None, :], prices, cost_weight_bp)
    got = np.take_along_axis(scores[rows], t[..., None], axis=-1)[..., 0]
    taste = np.take_along_axis(users.taste, t, axis=1)
    sat = satisfaction(got, taste, users.strictness[:, None], users.noise[:, None])
    return Phase(sat.mean(axis=1), prices[t].mean(axis=1), got.mean(axis=1), sums, counts)


@dataclass(frozen=True)
class Curve:
    """One arm over a sweep of cost weights: per-user figures `[users, weights]`."""

    name: str
    cost_weights_bp: tuple[int, ...]
    satisfaction: FloatArray
    cost: FloatArray
    score: FloatArray


def at_budget(quality: FloatArray, cost: FloatArray, budget: float, weights: FloatArray | None = None) -> FloatArray:
    """Best mean quality among the sweep's points whose mean cost fits `budget` (as `cost_weight_for_budget`
    picks an operating point), for one or many user weightings `[samples, users]` (None: every user once).
    NaN where no point fits."""
    w = np.ones((1, quality.shape[0])) if weights is None else weights
    total = w.sum(axis=1, keepdims=True)
    q, c = (w @ quality) / total, (w @ cost) / total
    fits = c <= budget + 1e-12
    out: FloatArray = np.where(fits, q, -np.inf).max(axis=1)
    return np.where(np.isinf(out), np.nan, out)


@dataclass(frozen=True)
class Comparison:
    budget: float
    base: float
    other: float
    diff: float
    lo: float
    hi: float


def compare_at_budgets(
    base: Curve,
    other: Curve,
    budgets: Sequence[float],
    *,
    metric: str = "satisfaction",
    samples: int = 2000,
    seed: int = 0,
) -> tuple[list[Comparison], Comparison]:
    """Quality of `other` minus `base` at equal mean cost, per budget and averaged over the budgets (the second
    item, `budget` = NaN), each with a 95 % percentile bootstrap interval over users (both arms on the same
    resampled users; each resample re-picks both arms' operating points)."""
    rng = np.random.default_rng(seed)
    n = base.cost.shape[0]
    draws = rng.integers(0, n, size=(samples, n))
    weights = np.zeros((samples, n))
    np.add.at(weights, (np.arange(samples)[:, None], draws), 1.0)
    qa, qb = getattr(base, metric), getattr(other, metric)
    point_a = np.array([at_budget(qa, base.cost, b)[0] for b in budgets])
    point_b = np.array([at_budget(qb, other.cost, b)[0] for b in budgets])
    diffs = np.stack(
        [at_budget(qb, other.cost, b, weights) - at_budget(qa, base.cost, b, weights) for b in budgets], axis=1
    )
    out = []
    for i, b in enumerate(budgets):
        lo, hi = np.nanquantile(diffs[:, i], [0.025, 0.975])
        out.append(Comparison(b, float(point_a[i]), float(point_b[i]), float(point_b[i] - point_a[i]), lo, hi))
    lo, hi = np.nanquantile(np.nanmean(diffs, axis=1), [0.025, 0.975])
    a_mean, b_mean = float(np.nanmean(point_a)), float(np.nanmean(point_b))
    return out, Comparison(float("nan"), a_mean, b_mean, b_mean - a_mean, float(lo), float(hi))


def sweep(
    name: str,
    predicted: FloatArray,
    scores: FloatArray,
    prices: FloatArray,
    users: Users,
    cost_weights_bp: Sequence[int],
    *,
    bias_for: dict[int, FloatArray] | None = None,
    prior: float | None = None,
    oracle: bool = False,
    seed: int = 0,
) -> Curve:
    """`simulate` at every cost weight; `bias_for[bp]`: the pooled correction learnt at that operating point."""
    phases = [
        simulate(
            predicted,
            scores,
            prices,
            users,
            bp,
            bias=None if bias_for is None else bias_for[bp],
            prior=prior,
            oracle=oracle,
            seed=seed + i,
        )
        for i, bp in enumerate(cost_weights_bp)
    ]
    return Curve(
        name,
        tuple(cost_weights_bp),
        np.stack([p.satisfaction for p in phases], axis=1),
        np.stack([p.cost for p in phases], axis=1),
        np.stack([p.score for p in phases], axis=1),
    )


def global_head(
    scores: FloatArray, x: npt.NDArray[np.float32], tasks: Sequence[str], train: npt.NDArray[np.bool_], seed: int
) -> FloatArray:
    """Predicted per-tier quality for every row from a head fitted on the `train` rows only (neighbourhood-smoothed
    targets, k = 200, the `tiergate train` N-tier recipe)."""
    from tiergate.routing.scorer import members_forward
    from tiergate.training.labels import task_smoothed
    from tiergate.training.train import HeadConfig, fit_head

    t_tasks = [t for t, keep in zip(tasks, train, strict=True) if keep]
    y = task_smoothed(x[train], scores[train], 200, t_tasks, 0.0)
    members = fit_head(x[train], y, t_tasks, HeadConfig(seed=seed), 0.0)
    return members_forward(members, x)


@dataclass(frozen=True)
class Study:
    """The held-out comparison: the pools' sizes, the shrinkage chosen on train users (and every tried one's mean
    satisfaction gain over global there), and the held-out users' curves per arm."""

    train_pool: int
    held_pool: int
    prior: float
    prior_gains: dict[float, float]
    arms: dict[str, Curve]


def held_out_study(
    scores: FloatArray,
    tasks: Sequence[str],
    ids: Sequence[str],
    x: npt.NDArray[np.float32],
    prices: FloatArray,
    *,
    model: UserModel,
    users: int,
    train_users: int,
    held_out_share: float,
    priors: Sequence[float],
    cost_weights_bp: Sequence[int],
    seed: int = 0,
) -> Study:
    """Split the prompts, fit the global head and everything global on the train side only, and sweep every arm
    on the held-out users (module docstring). Arms: global, pooled, per-user, pooled+per-user, oracle-taste."""
    held, late = split_pools(ids, held_out_share)
    predicted = global_head(scores, x, tasks, ~held, seed)
    rng = np.random.default_rng(seed)
    n_models = scores.shape[1]
    train = draw_users(train_users, tasks, ~held, late, n_models, model, rng)
    test = draw_users(users, tasks, held, late, n_models, model, rng)
    pooled = {}
    for i, bp in enumerate(cost_weights_bp):
        ph = simulate(predicted, scores, prices, train, bp, seed=10_000 + i)
        pooled[bp] = pooled_adjustment(ph.sums, ph.counts, POOLED_PRIOR)
    # The shipped arm's shrinkage (per-user on the global head: tiergate_router.profiles), chosen by its mean gain
    # over the global router on train users.
    glob_tr = sweep("global", predicted, scores, prices, train, cost_weights_bp)
    gains = {
        k: compare_at_budgets(
            glob_tr, sweep("per-user", predicted, scores, prices, train, cost_weights_bp, prior=k), BUDGETS, samples=1
        )[1].diff
        for k in priors
    }
    best = max(gains, key=lambda k: gains[k])
    args = (predicted, scores, prices, test, cost_weights_bp)
    arms = {
        "global": sweep("global", *args, seed=1),
        "pooled": sweep("pooled", *args, bias_for=pooled, seed=1),
        "per-user": sweep("per-user", *args, prior=best, seed=1),
        "pooled+per-user": sweep("pooled+per-user", *args, bias_for=pooled, prior=best, seed=1),
        # Not a router: the users' true taste added to the head's prediction, the most a per-tier adjustment gets.
        "oracle-taste": sweep("oracle-taste", *args, oracle=True, seed=1),
    }
    return Study(int((~held).sum()), int(held.sum()), best, gains, arms)
