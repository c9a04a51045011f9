"""Issue 6 "Must show" quality figures on the real data (slow: reads /work/shared/data/routing).

Embeddings come from the cache (~/.cache/tiergate/embeddings; `bench/embed_routing_data.py` fills it, about 20
minutes on two cores cold, seconds warm). Set TIERGATE_ROUTING_DATA to read the data from elsewhere.

Targets the shipped pipeline does not reach yet are marked `xfail(strict=True)` with the figure measured, so the
gap shows in every run's summary and the mark must be removed the day the target is met.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tiergate.routing.artifact import load_artifact
from tiergate.routing.common import DEFAULT_MULTI_TIER, DEFAULT_TWO_TIER
from tiergate.routing.data import load_outcomes, load_prices
from tiergate.routing.encoder import cached_minilm
from tiergate.routing.evaluate import multi_tier_report, quality_at_budget
from tiergate.routing.labels import task_smoothed
from tiergate.routing.metrics import pgr_curve
from tiergate.routing.scorer import Scorer, choose_from_quality
from tiergate.routing.train import HeadConfig, fit_ensemble, kfold_indices

pytestmark = pytest.mark.slow

DATA = Path(os.environ.get("TIERGATE_ROUTING_DATA", "/work/shared/data/routing"))
WEAK, STRONG = "mixtral-8x7b-instruct", "gpt-4-1106-preview"


def _default_apgr(file: str) -> float:
    art = load_artifact(DEFAULT_TWO_TIER)
    enc = cached_minilm()
    test = load_outcomes([DATA / file], [WEAK, STRONG], split="test")
    scores = Scorer(art, enc).score(test.prompts)
    return pgr_curve(scores, test.scores[:, 0], test.scores[:, 1]).apgr


def test_default_router_was_trained_on_train_rows_of_the_current_data() -> None:
    import hashlib

    art = load_artifact(DEFAULT_TWO_TIER)
    assert art.provenance["split"] == "train"
    names = {Path(f["path"]).name: f for f in art.provenance["files"]}
    assert set(names) == {"routellm-mmlu.jsonl", "routellm-gsm8k.jsonl"}
    for name, f in names.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == f["sha256"], f"{name} changed: rebuild"
    multi = load_artifact(DEFAULT_MULTI_TIER)
    assert multi.kind == "multi_tier"
    assert len(multi.tiers) == 9


@pytest.mark.xfail(strict=True, reason="issue 6 asks APGR >= 0.72; measured 0.70 (docs/routing.md)")
def test_mmlu_test_apgr() -> None:
    assert _default_apgr("routellm-mmlu.jsonl") >= 0.72


def test_mmlu_test_apgr_beats_the_issue_baselines() -> None:
    # kNN regression at k = 200 reaches 0.70 on this split (issue 6); the shipped router must not be worse.
    assert _default_apgr("routellm-mmlu.jsonl") >= 0.695


def test_gsm8k_test_apgr() -> None:
    assert _default_apgr("routellm-gsm8k.jsonl") >= 0.65


LLMROUTER = [
    "qwen2.5-7b-instruct",
    "codegemma-7b",
    "gemma-2-9b-it",
    "llama-3.1-8b-instruct",
    "llama3-chatqa-1.5-8b",
    "mistral-7b-instruct-v0.3",
    "llama-3.3-nemotron-super-49b-v1",
    "llama-3.1-nemotron-51b-instruct",
    "llama3-chatqa-1.5-70b",
]


def _llmrouter_cv_quality_at_half_dollar() -> tuple[float | None, dict[str, object]]:
    """5-fold CV of the shipped multi-tier recipe (--neighbours 50 --task-weight 0.5), mean price <= 0.50."""
    import torch

    torch.set_num_threads(1)
    data = load_outcomes([DATA / "llmrouter-train.jsonl"], LLMROUTER)
    prices = load_prices(DATA / "llmrouter-models.json", LLMROUTER)
    x = cached_minilm().encode(data.prompts)
    oof = np.zeros_like(data.scores)
    art = load_artifact(DEFAULT_MULTI_TIER)
    for held in kfold_indices(len(x), 5, seed=0):
        mask = np.ones(len(x), dtype=bool)
        mask[held] = False
        tasks = [t for t, keep in zip(data.tasks, mask, strict=True) if keep]
        members = fit_ensemble(x[mask], task_smoothed(x[mask], data.scores[mask], 50, tasks, 0.5), HeadConfig())
        oof[held] = Scorer(art.with_updates(members=members), None).quality_embeddings(x[held])
    report = multi_tier_report(
        oof, data.scores, np.asarray(prices), LLMROUTER, lambda q, bp: choose_from_quality(art, q, bp), 0
    )
    return quality_at_budget(report, 0.50), report


@pytest.mark.xfail(strict=True, reason="issue 6 asks >= 0.621 at <= 0.50 $/Mtok; measured 0.614 (docs/routing.md)")
def test_llmrouter_cv_quality_at_budget() -> None:
    q, report = _llmrouter_cv_quality_at_half_dollar()
    best = report["best_single"]
    assert isinstance(best, dict)
    assert best["model"] == "llama-3.1-nemotron-51b-instruct"
    assert q is not None
    assert q >= 0.621
