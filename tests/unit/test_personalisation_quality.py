"""Issue 16 "Must show", per-user profiles: on simulated held-out users of the LLMRouter data, the per-user
adjustment (the rule of tiergate_router.profiles, shrinkage 50) gives better satisfaction than the global router
at equal cost (slow: fits the global head, ~1-2 minutes on two loaded cores). tiergate.training.personas says how
users are drawn; bench/personalisation_quality.py prints the figures docs/routing.md reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.routing_files import require_routing_files
from tiergate.routing.operating_points import COST_WEIGHTS_BP
from tiergate.training import personas
from tiergate.training.data import load_outcomes, load_prices
from tiergate.training.embeddings import cached_minilm

pytestmark = pytest.mark.slow
DATA, PRICES = "llmrouter-train.jsonl", "llmrouter-models.json"


def test_per_user_beats_global_at_equal_cost_on_held_out_users(routing_data: Path) -> None:
    import torch

    folder = require_routing_files(routing_data, (DATA, PRICES))
    with open(folder / DATA, encoding="utf-8") as f:
        names = sorted(json.loads(f.readline())["scores"])
    assert len(names) == 9
    data = load_outcomes([folder / DATA], names)
    prices = np.array(load_prices(folder / PRICES, names))
    x = cached_minilm(progress=None).encode(data.prompts)
    torch.set_num_threads(1)
    study = personas.held_out_study(
        data.scores,
        data.tasks,
        data.ids,
        x,
        prices,
        model=personas.UserModel(),
        users=1000,
        train_users=300,
        held_out_share=0.4,
        priors=[50.0],
        # Every other cost weight: the curve keeps its shape at half the sweep's time.
        cost_weights_bp=COST_WEIGHTS_BP[::2],
    )
    assert study.held_pool + study.train_pool == len(data)
    arms = study.arms
    gain = personas.compare_at_budgets(arms["global"], arms["per-user"], personas.BUDGETS)[1]
    # Measured +0.005 (CI +0.004 .. +0.007) with every cost weight and 500 train users (docs/routing.md); the
    # claim is only that it wins: the interval over held-out users lies above 0.
    assert gain.lo > 0, gain
    headroom = personas.compare_at_budgets(arms["global"], arms["oracle-taste"], personas.BUDGETS)[1]
    assert headroom.diff > gain.diff > 0
