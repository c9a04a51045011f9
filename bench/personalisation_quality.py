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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=routing_data_dir(), help="default: $TIERGATE_ROUTING_DATA")
    ap.add_argument("--users", type=int, default=1000, help="held-out users")
    ap.add_argument("--train-users", type=int, default=500)
    ap.add_argument("--held-out-share", type=float, default=0.4, help="share of prompts in the held-out pool")
    ap.add_argument("--taste-sd", type=float, default=0.1, help="per-user per-model taste sd; 0 turns taste off")
    ap.add_argument("--adapt", type=int, default=40, help="prompts each user asks before evaluation")
    ap.add_argument("--evaluate", type=int, default=40)
    ap.add_argument("--priors", default="5,20,50,200", help="per-user shrinkage values tried on train users")
    ap.add_argument("--weights-step", type=int, default=1, help="use every n-th cost weight (faster)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = load_outcomes([a.data_dir / "llmrouter-train.jsonl"], LLMROUTER_MODELS)
    prices = np.array(load_prices(a.data_dir / "llmrouter-models.json", LLMROUTER_MODELS))
    x = cached_minilm().encode(data.prompts)
    model = personas.UserModel(taste_sd=a.taste_sd, adapt=a.adapt, evaluate=a.evaluate)
    weights = COST_WEIGHTS_BP[:: a.weights_step]
    study = personas.held_out_study(
        data.scores,
        data.tasks,
        data.ids,
        x,
        prices,
        model=model,
        users=a.users,
        train_users=a.train_users,
        held_out_share=a.held_out_share,
        priors=[float(p) for p in a.priors.split(",")],
        cost_weights_bp=weights,
        seed=a.seed,
    )
    print(
        f"prompts: {study.train_pool} train pool, {study.held_pool} held-out pool (disjoint by id hash); global head "
        f"fitted on the train pool; {a.train_users} train users, {a.users} held-out users; {a.adapt} adaptation + "
        f"{a.evaluate} evaluation prompts each; taste sd {a.taste_sd}; {len(weights)} cost weights"
    )
    for k, gain in study.prior_gains.items():
        print(f"  train users, shrinkage {k:g}: mean satisfaction gain over global {gain:+.4f}")
    print(f"shrinkage chosen on train users: {study.prior:g} [{time.perf_counter() - t0:.0f} s]", flush=True)
    arms = study.arms
    for metric in ("satisfaction", "score"):
        rows, _ = personas.compare_at_budgets(
            arms["global"], arms["per-user"], personas.BUDGETS, metric=metric, seed=a.seed
        )
        print(f"per-user - global, {metric} at equal cost (held-out users, 95% bootstrap CI over users):")
        for r in rows:
            print(
                f"  <= {r.budget:.2f} $/Mtok: {r.base:.4f} -> {r.other:.4f}  diff {r.diff:+.4f} "
                f"[{r.lo:+.4f}, {r.hi:+.4f}]"
            )
    budgets = ", ".join(f"{b:g}" for b in personas.BUDGETS)
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
            m = personas.compare_at_budgets(arms[base], arms[other], personas.BUDGETS, metric=metric, seed=a.seed)[1]
            print(
                f"  {other} - {base}, {metric}: {m.base:.4f} -> {m.other:.4f}  diff {m.diff:+.4f} "
                f"[{m.lo:+.4f}, {m.hi:+.4f}]"
            )
    print(f"done [{time.perf_counter() - t0:.0f} s]")


if __name__ == "__main__":
    main()
