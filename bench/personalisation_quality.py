"""Per-user routing profiles on simulated users (issue 16): does a per-user adjustment, learnt online from each
user's own feedback, beat the global router at the same cost on held-out users? Prints the figures docs/routing.md
reports ("Per-user profiles"); the simulation is tiergate.training.personas (its docstring says how users are
drawn). Reads the MiniLM embeddings from the cache (bench/embed_routing_data.py).

    nice .venv/bin/python bench/personalisation_quality.py [--data-dir DIR] [--taste-sd 0.1] [--users 1000]
        [--train-users 500] [--held-out-share 0.4] [--seed 0]

Steps: split the LLMRouter prompts (9 models) by hash into a train-user pool and a held-out pool; train the global
head (`fit_head` on neighbourhood-smoothed targets, as `tiergate train`) on the train pool only; draw train and
held-out users; learn the pooled per-tier correction and choose the per-user shrinkage on train users only; then
sweep the cost weight for four arms on the held-out users and compare them at equal mean cost ($/Mtok) with a
bootstrap interval over held-out users.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _data import routing_data_dir
from routing_quality import LLMROUTER_MODELS

from tiergate.routing.operating_points import COST_WEIGHTS_BP
from tiergate.training import personas
from tiergate.training.data import load_outcomes, load_prices
from tiergate.training.embeddings import cached_minilm
from tiergate.training.labels import task_smoothed
from tiergate.training.train import HeadConfig, fit_head

# Budgets ($/Mtok, input + output list price) between the cheapest tier (0.2) and the 70B tiers (1.8): the range
# where the router mixes tiers.
BUDGETS = (0.3, 0.4, 0.5, 0.7, 0.9, 1.2)
# Pseudo-observations for the pooled correction: it sees thousands of ratings per tier, so 10 only guards the
# tiers train users were almost never sent to.
POOLED_PRIOR = 10.0


def global_head(scores: np.ndarray, x: np.ndarray, tasks: list[str], train: np.ndarray, seed: int) -> np.ndarray:
    """Predicted per-tier quality for every row from a head fitted on the `train` rows only."""
    from tiergate.routing.scorer import members_forward

    t_tasks = [t for t, keep in zip(tasks, train, strict=True) if keep]
    y = task_smoothed(x[train], scores[train], 200, t_tasks, 0.0)
    members = fit_head(x[train], y, t_tasks, HeadConfig(seed=seed), 0.0)
    out: np.ndarray = members_forward(members, x)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=routing_data_dir(), help="default: $TIERGATE_ROUTING_DATA")
    ap.add_argument("--users", type=int, default=1000, help="held-out users")
    ap.add_argument("--train-users", type=int, default=500)
    ap.add_argument("--held-out-share", type=float, default=0.4, help="share of prompts in the held-out pool")
    ap.add_argument("--taste-sd", type=float, default=0.1, help="per-user per-model taste sd; 0 turns taste off")
    ap.add_argument("--adapt", type=int, default=40, help="prompts each user asks before evaluation")
    ap.add_argument("--evaluate", type=int, default=40)
    ap.add_argument("--priors", default="2,5,10,20", help="per-user shrinkage values tried on train users")
    ap.add_argument("--weights-step", type=int, default=1, help="use every n-th cost weight (faster)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = load_outcomes([a.data_dir / "llmrouter-train.jsonl"], LLMROUTER_MODELS)
    prices = np.array(load_prices(a.data_dir / "llmrouter-models.json", LLMROUTER_MODELS))
    held, late = personas.split_pools(data.ids, a.held_out_share)
    x = cached_minilm().encode(data.prompts)
    predicted = global_head(data.scores, x, data.tasks, ~held, a.seed)
    print(
        f"prompts: {int((~held).sum())} train pool, {int(held.sum())} held-out pool (disjoint by id hash); "
        f"global head fitted on the train pool [{time.perf_counter() - t0:.0f} s]",
        flush=True,
    )
    model = personas.UserModel(taste_sd=a.taste_sd, adapt=a.adapt, evaluate=a.evaluate)
    rng = np.random.default_rng(a.seed)
    n_models = len(LLMROUTER_MODELS)
    train_users = personas.draw_users(a.train_users, data.tasks, ~held, late, n_models, model, rng)
    test_users = personas.draw_users(a.users, data.tasks, held, late, n_models, model, rng)
    weights = COST_WEIGHTS_BP[:: a.weights_step]
    print(
        f"users: {len(train_users)} train, {len(test_users)} held-out; {a.adapt} adaptation + {a.evaluate} "
        f"evaluation prompts each; taste sd {a.taste_sd}; {len(weights)} cost weights",
        flush=True,
    )

    # Global fits on train users only: the pooled correction at each operating point, and the shrinkage.
    pooled = {}
    for i, bp in enumerate(weights):
        ph = personas.simulate(predicted, data.scores, prices, train_users, bp, seed=10_000 + i)
        pooled[bp] = personas.pooled_adjustment(ph.sums, ph.counts, POOLED_PRIOR)
    # The shrinkage of the shipped arm (per-user on the global head, tiergate_router.profiles), chosen by its mean
    # gain over the global router on train users.
    glob_tr = personas.sweep("global", predicted, data.scores, prices, train_users, weights)
    best_prior, best_gain = 0.0, -np.inf
    for prior in (float(p) for p in a.priors.split(",")):
        c = personas.sweep("per-user", predicted, data.scores, prices, train_users, weights, prior=prior)
        gain = personas.compare_at_budgets(glob_tr, c, BUDGETS, samples=1)[1].diff
        print(f"  train users, shrinkage {prior:g}: mean satisfaction gain over global {gain:+.4f}", flush=True)
        if gain > best_gain:
            best_prior, best_gain = prior, gain
    print(f"shrinkage chosen on train users: {best_prior:g} [{time.perf_counter() - t0:.0f} s]", flush=True)

    args = (predicted, data.scores, prices, test_users, weights)
    arms = {
        "global": personas.sweep("global", *args, seed=1),
        "pooled": personas.sweep("pooled", *args, bias_for=pooled, seed=1),
        "per-user": personas.sweep("per-user", *args, prior=best_prior, seed=1),
        "pooled+per-user": personas.sweep("pooled+per-user", *args, bias_for=pooled, prior=best_prior, seed=1),
        # Not a router: the users' true taste added to the head's prediction, the most a per-tier adjustment gets.
        "oracle-taste": personas.sweep("oracle-taste", *args, oracle=True, seed=1),
    }
    print(f"held-out arms swept [{time.perf_counter() - t0:.0f} s]", flush=True)
    for metric in ("satisfaction", "score"):
        rows, _ = personas.compare_at_budgets(arms["global"], arms["per-user"], BUDGETS, metric=metric, seed=a.seed)
        print(f"per-user - global, {metric} at equal cost (held-out users, 95% bootstrap CI over users):")
        for r in rows:
            print(
                f"  <= {r.budget:.2f} $/Mtok: {r.base:.4f} -> {r.other:.4f}  diff {r.diff:+.4f} "
                f"[{r.lo:+.4f}, {r.hi:+.4f}]"
            )
    budgets = ", ".join(f"{b:g}" for b in BUDGETS)
    print(f"mean over budgets {budgets} $/Mtok (held-out users, 95% bootstrap CI over users):")
    pairs = (
        ("global", "per-user"),
        ("global", "pooled"),
        ("global", "pooled+per-user"),
        ("pooled", "pooled+per-user"),
        ("global", "oracle-taste"),
    )
    for base, other in pairs:
        for metric in ("satisfaction", "score"):
            m = personas.compare_at_budgets(arms[base], arms[other], BUDGETS, metric=metric, seed=a.seed)[1]
            print(
                f"  {other} - {base}, {metric}: {m.base:.4f} -> {m.other:.4f}  diff {m.diff:+.4f} "
                f"[{m.lo:+.4f}, {m.hi:+.4f}]"
            )
    print(f"done [{time.perf_counter() - t0:.0f} s]")


if __name__ == "__main__":
    main()
