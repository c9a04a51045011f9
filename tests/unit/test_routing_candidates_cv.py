"""Candidates (BEST-Route) training and evaluation in-process on synthetic data: costs from the rows' tokens, the
out-of-fold calibration in USD per 1k prompts, and the k-fold CV router at a budget against single candidates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.routing import CANDIDATE_PRICES, candidate_rows
from tiergate.routing.candidates import COST_WEIGHTS_BP
from tiergate.routing.errors import DataError
from tiergate.training.candidate_data import (
    load_candidate_prices,
    measure_candidates,
    token_columns,
    true_costs,
)
from tiergate.training.candidate_eval import cross_validate_at_budget, paired_bootstrap
from tiergate.training.data import OutcomeSet, load_outcomes
from tiergate.training.train import TrainConfig

NAMES = ["small@1", "small@4", "big@1"]


def _files(tmp_path: Path, rows: list[dict[str, object]]) -> tuple[Path, Path]:
    data, prices = tmp_path / "c.jsonl", tmp_path / "prices.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prices.write_text(json.dumps(CANDIDATE_PRICES))
    return data, prices


def _load(tmp_path: Path, rows: list[dict[str, object]]) -> tuple[OutcomeSet, list[tuple[float, float]]]:
    data, prices = _files(tmp_path, rows)
    return load_outcomes([data], NAMES, token_columns=token_columns(NAMES)), load_candidate_prices(prices, NAMES)


def test_true_costs_use_n_times_the_one_sample_output(tmp_path: Path) -> None:
    rows = candidate_rows(4)
    data, prices = _load(tmp_path, rows)
    cands = measure_candidates(data, NAMES, prices)
    assert [c.n for c in cands] == [1, 4, 1]
    # Mean one-sample output of `small` (small@1's tokens), also for small@4: its own column is one answer's.
    assert cands[0].output_tokens == cands[1].output_tokens == pytest.approx(301.5)
    costs = true_costs(data, cands)
    r = rows[1]["tokens"]
    t_in, out1 = r["small@1"]["input"], r["small@1"]["output"]  # type: ignore[index]
    assert costs[1, 1] == pytest.approx((t_in * 0.2 + 4 * out1 * 0.2) / 1e6)
    assert costs[1, 2] == pytest.approx((t_in * 10.0 + 500 * 30.0) / 1e6)


def test_rows_without_tokens_fall_back_to_the_serving_estimate(tmp_path: Path) -> None:
    rows = candidate_rows(4)
    del rows[2]["tokens"]
    data, prices = _load(tmp_path, rows)
    cands = measure_candidates(data, NAMES, prices)
    prompt = str(rows[2]["prompt"])
    t_in = -(-len(prompt) // 4)
    np.testing.assert_allclose(
        true_costs(data, cands)[2],
        [(t_in * c.input_usd_per_mtok + c.n * c.output_tokens * c.output_usd_per_mtok) / 1e6 for c in cands],
    )


def test_an_at_n_column_without_its_one_sample_tokens_is_refused(tmp_path: Path) -> None:
    rows = candidate_rows(4)
    del rows[3]["tokens"]["small@1"]  # type: ignore[attr-defined]
    data, prices = _load(tmp_path, rows)
    with pytest.raises(DataError, match=r"c\.jsonl:4: tokens for 'small@4' but none for its one-sample base 'small@1'"):
        measure_candidates(data, NAMES, prices)


def test_missing_or_unsplit_price_names_the_file_and_candidate(tmp_path: Path) -> None:
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"small": 0.4}))
    with pytest.raises(DataError, match=r"p\.json: price of 'small' needs numeric input_usd_per_mtok"):
        load_candidate_prices(p, NAMES)
    p.write_text(json.dumps({"small": CANDIDATE_PRICES["small"]}))
    with pytest.raises(DataError, match=r"p\.json: no price for candidate 'big@1'"):
        load_candidate_prices(p, NAMES)
    # A MODEL@N key wins over the base model's.
    p.write_text(json.dumps({**CANDIDATE_PRICES, "small@4": {"input_usd_per_mtok": 1, "output_usd_per_mtok": 2}}))
    assert load_candidate_prices(p, NAMES) == [(0.2, 0.2), (1.0, 2.0), (10.0, 30.0)]


def _embeddings(data: OutcomeSet, seed: int = 0) -> np.ndarray:
    # A cluster per kind of prompt (what a sentence encoder gives these templates), some noise.
    rng = np.random.default_rng(seed)
    centre = {"geo": np.eye(8)[0], "algebra": np.eye(8)[1], "proof": np.eye(8)[2]}
    x = np.stack([centre[t] for t in data.tasks]) + 0.1 * rng.normal(size=(len(data), 8))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_cv_router_at_the_budget_reaches_the_best_fitting_single_candidate(tmp_path: Path) -> None:
    data, prices = _load(tmp_path, candidate_rows(120))
    emb = _embeddings(data)
    # A closed-form ridge head (no torch, deterministic): the kinds are linearly separable in these embeddings.
    cfg = TrainConfig(
        label_mode="quality", neighbours=10, task_weight=0.0, task_head=0.0, folds=3, ridge_share=1.0, ridge_lambda=0.01
    )
    cv = cross_validate_at_budget(data, emb, emb, NAMES, prices, "big@1", 2.5, cfg, folds=4)
    # small@4 is the best candidate under 2.5 $/1k prompts (0.9 at ~0.29); big@1 (~15 $/1k) does not fit.
    assert cv.single == "small@4"
    assert cv.single_quality == pytest.approx(0.9)
    # The router spends the budget on big@1 where only it succeeds.
    assert cv.router_quality >= cv.single_quality
    assert cv.router_quality > 0.95
    # Held-out cost scatters around the budget: the calibrated point is the best quality within it on the training
    # rows, and on equal quality the smaller weight (cost_weight_for_budget), i.e. the one spending most; a
    # misrouted prompt to big@1 adds 15 $ / 120 = 0.13 $ per 1k prompts.
    assert cv.router_usd_per_1k_prompts <= 2.5 * 1.15
    assert len(cv.curve) == len(COST_WEIGHTS_BP)
    lo, hi = paired_bootstrap(cv.router, cv.single_outcomes)  # type: ignore[arg-type]
    assert lo <= cv.router_quality - cv.single_quality <= hi
