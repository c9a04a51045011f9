"""Issue 12 "Must show" on the real data (slow: 5-fold CV on ../shared/data/routing/alpacaeval-bon.jsonl, ~20 s).

The router over the 12 candidates, calibrated at <= 1.0 USD per 1k prompts on each training fold as `tiergate
train` + `tiergate calibrate --usd-per-1k-prompts 1.0` do, reaches at least the quality of the best single
candidate fitting that budget on the held-out folds. bench/best_route_quality.py prints the same figure, the curves
and the noise; docs/routing.md ("Best-of-N candidates (BEST-Route)") discusses them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.routing_files import require_routing_files
from tiergate.routing.features import head_inputs
from tiergate.training.candidate_data import load_candidate_prices, token_columns
from tiergate.training.candidate_eval import cross_validate_at_budget
from tiergate.training.data import load_outcomes
from tiergate.training.embeddings import cached_minilm
from tiergate.training.train import TrainConfig, fit_features

DATA, PRICES = "alpacaeval-bon.jsonl", "alpacaeval-bon-models.json"


def test_cv_router_at_one_dollar_per_1k_prompts_reaches_the_best_fitting_single(routing_data: Path) -> None:
    import torch

    folder = require_routing_files(routing_data, (DATA, PRICES))
    with open(folder / DATA, encoding="utf-8") as f:
        names = sorted(json.loads(f.readline())["scores"])
    assert len(names) == 12
    data = load_outcomes([folder / DATA], names, token_columns=token_columns(names))
    prices = load_candidate_prices(folder / PRICES, names)
    emb = cached_minilm(progress=None).encode(data.prompts)
    hx = head_inputs(fit_features(["log_chars"], data.prompts), emb, data.prompts)
    torch.set_num_threads(1)
    cv = cross_validate_at_budget(
        data, hx, emb, names, prices, "gpt-4-1106-preview@1", 1.0, TrainConfig(label_mode="quality"), folds=5
    )
    # The data's own figures (no training involved): tulu-2-dpo-70b@1 is the best candidate under 1 $/1k prompts.
    assert cv.single == "tulu-2-dpo-70b@1"
    assert cv.single_quality == pytest.approx(0.9535, abs=1e-4)
    assert cv.single_cost == pytest.approx(0.347, abs=1e-3)
    # Measured: 0.9535 at 0.347 $/1k, the router sends every held-out prompt to tulu-2-dpo-70b@1 (a tie, not a
    # gain: docs/routing.md). The head is a small MLP on a transformer's embeddings, and another CPU's kernels
    # (AVX-512 or AMX, another thread count) can move a score near a decision boundary and route one prompt
    # differently: one prompt is 1/473 = 0.0021 of quality. The test allows that one prompt and no more (the
    # judgements' own noise is +-0.02); bench/best_route_quality.py prints the exact figures.
    one_prompt = 1.0 / len(data)
    assert cv.router_quality >= cv.single_quality - one_prompt
    assert cv.router_usd_per_1k_prompts <= 1.0
    assert np.all(cv.router_cost >= 0)
