"""The issue-6 "Must show" figures: train on the train splits, score the test splits (and 5-fold CV for the
9-model LLMRouter data). Prints one line per figure; reads embeddings from the cache (bench/embed_routing_data.py).

    nice .venv/bin/python bench/routing_quality.py [--data-dir DIR] [--only mmlu,mmlu-cv,gsm8k,llmrouter]
        [--label-mode difference] [--neighbours 200] [--hidden 64] [--epochs 30] [--ensemble 5]

The functions here are also what tests/unit/test_routing_quality.py (slow) asserts on.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from _data import routing_data_dir

from tiergate.training.data import load_outcomes, load_prices
from tiergate.training.embeddings import cached_minilm
from tiergate.training.evaluate import multi_tier_report, quality_at_budget
from tiergate.training.labels import task_smoothed, two_tier_targets
from tiergate.training.metrics import pgr_curve
from tiergate.training.train import HeadConfig, fit_head, kfold_indices

WEAK, STRONG = "mixtral-8x7b-instruct", "gpt-4-1106-preview"
LLMROUTER_MODELS = [
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


def _forward(members: list[Any], x: np.ndarray) -> np.ndarray:
    from tiergate.routing.scorer import members_forward

    return members_forward(members, x)


def with_features(
    names: list[str] | None, train_texts: list[str], xtr: np.ndarray, test_texts: list[str], xte: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Append prompt features standardised with the training rows' mean and std (as `tiergate train` does)."""
    from tiergate.routing.features import raw_features

    if not names:
        return xtr, xte
    ftr, fte = raw_features(names, train_texts), raw_features(names, test_texts)
    mu, sd = ftr.mean(axis=0), np.maximum(ftr.std(axis=0), 1e-6)
    return (
        np.concatenate([xtr, ((ftr - mu) / sd).astype(np.float32)], axis=1),
        np.concatenate([xte, ((fte - mu) / sd).astype(np.float32)], axis=1),
    )


def _two_tier_fit_predict(
    texts: list[str],
    x: np.ndarray,
    scores: np.ndarray,
    tasks: list[str],
    held_texts: list[str],
    held_x: np.ndarray,
    mode: str,
    k: int,
    head: HeadConfig,
    task_weight: float,
    task_head: float,
    features: list[str] | None,
    ridge_share: float,
) -> np.ndarray:
    """Fit the recipe on (texts, x, scores) and score the held-out rows; targets use the fitted rows only."""
    y, _ = two_tier_targets(mode, scores[:, 0], scores[:, 1], x, k, tasks, task_weight)
    htr, hte = with_features(features, texts, x, held_texts, held_x)
    raw = (scores[:, 1] - scores[:, 0] + 1.0) / 2.0
    members = fit_head(htr, y, tasks, head, task_head, ridge=(raw, ridge_share, 100.0) if ridge_share else None)
    out: np.ndarray = _forward(members, hte)[:, 0]
    return out


def two_tier_test(
    data_dir: Path,
    train_files: list[str],
    test_file: str,
    mode: str,
    k: int,
    head: HeadConfig,
    task_weight: float,
    task_head: float = 0.0,
    features: list[str] | None = None,
    ridge_share: float = 0.0,
) -> dict[str, float]:
    enc = cached_minilm()
    tr = load_outcomes([data_dir / f for f in train_files], [WEAK, STRONG], split="train")
    te = load_outcomes([data_dir / test_file], [WEAK, STRONG], split="test")
    xtr, xte = enc.encode(tr.prompts), enc.encode(te.prompts)
    pred = _two_tier_fit_predict(
        tr.prompts,
        xtr,
        tr.scores,
        tr.tasks,
        te.prompts,
        xte,
        mode,
        k,
        head,
        task_weight,
        task_head,
        features,
        ridge_share,
    )
    curve = pgr_curve(pred, te.scores[:, 0], te.scores[:, 1])
    return {"apgr": curve.apgr, "cpt50": curve.cpt(0.5), "cpt80": curve.cpt(0.8), "n": float(len(te))}


def two_tier_cv(
    data_dir: Path,
    file: str,
    mode: str,
    k: int,
    head: HeadConfig,
    task_weight: float,
    task_head: float = 0.0,
    features: list[str] | None = None,
    ridge_share: float = 0.0,
    folds: int = 5,
) -> dict[str, float]:
    """APGR of the out-of-fold scores over the train rows of `file` (the test rows are never read).

    Each fold recomputes the neighbourhood-smoothed targets from its own training rows only: smoothing over
    all rows would leak the held-out rows' labels into the targets of their neighbours. This is the figure to
    choose a recipe by; the test split then gives one honest reading of the chosen recipe."""
    from dataclasses import replace

    tr = load_outcomes([data_dir / file], [WEAK, STRONG], split="train")
    x = cached_minilm().encode(tr.prompts)
    oof = np.zeros(len(x))
    for i, held in enumerate(kfold_indices(len(x), folds, head.seed)):
        mask = np.ones(len(x), dtype=bool)
        mask[held] = False
        oof[held] = _two_tier_fit_predict(
            [p for p, keep in zip(tr.prompts, mask, strict=True) if keep],
            x[mask],
            tr.scores[mask],
            [t for t, keep in zip(tr.tasks, mask, strict=True) if keep],
            [tr.prompts[j] for j in held],
            x[held],
            mode,
            k,
            replace(head, seed=head.seed + i),
            task_weight,
            task_head,
            features,
            ridge_share,
        )
    curve = pgr_curve(oof, tr.scores[:, 0], tr.scores[:, 1])
    return {"apgr": curve.apgr, "cpt50": curve.cpt(0.5), "cpt80": curve.cpt(0.8), "n": float(len(tr))}


def llmrouter_cv(
    data_dir: Path,
    k: int,
    head: HeadConfig,
    task_weight: float,
    task_head: float = 0.0,
    folds: int = 5,
    budget: float = 0.5,
    features: list[str] | None = None,
    ridge_share: float = 0.0,
) -> dict[str, Any]:
    enc = cached_minilm()
    data = load_outcomes([data_dir / "llmrouter-train.jsonl"], LLMROUTER_MODELS)
    prices = np.array(load_prices(data_dir / "llmrouter-models.json", LLMROUTER_MODELS))
    x = enc.encode(data.prompts)
    oof = np.zeros_like(data.scores)
    for i, held in enumerate(kfold_indices(len(x), folds, head.seed)):
        mask = np.ones(len(x), dtype=bool)
        mask[held] = False
        tasks = [t for t, keep in zip(data.tasks, mask, strict=True) if keep]
        y = task_smoothed(x[mask], data.scores[mask], k, tasks, task_weight)
        from dataclasses import replace

        hx, hh = with_features(
            features,
            [p for p, k in zip(data.prompts, mask, strict=True) if k],
            x[mask],
            [data.prompts[j] for j in held],
            x[held],
        )
        ridge = (data.scores[mask], ridge_share, 100.0) if ridge_share else None
        members = fit_head(hx, y, tasks, replace(head, seed=head.seed + i), task_head, ridge=ridge)
        oof[held] = _forward(members, hh)

    report = multi_tier_report(oof, data.scores, prices, LLMROUTER_MODELS, 0)
    return {"report": report, "quality_at_budget": quality_at_budget(report, budget)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=routing_data_dir(), help="default: $TIERGATE_ROUTING_DATA")
    ap.add_argument(
        "--only", default="mmlu,gsm8k,llmrouter", help="figures to print; mmlu-cv: 5-fold CV on MMLU's train rows"
    )
    ap.add_argument("--label-mode", default="difference")
    ap.add_argument("--neighbours", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--ensemble", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task-weight", type=float, default=0.0)
    ap.add_argument("--task-head", type=float, default=0.0)
    ap.add_argument("--ridge-share", type=float, default=0.0)
    ap.add_argument("--features", default="", help="comma-separated prompt features, e.g. log_chars")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    head = HeadConfig(hidden=a.hidden, epochs=a.epochs, ensemble=a.ensemble, batch=a.batch, seed=a.seed)
    only = a.only.split(",")
    feats = [f for f in a.features.split(",") if f]
    cfg = (
        f"mode={a.label_mode} k={a.neighbours} task_weight={a.task_weight} task_head={a.task_head} "
        f"features={a.features or '-'} ridge={a.ridge_share} hidden={a.hidden} "
        f"epochs={a.epochs} ensemble={a.ensemble}"
    )
    if "mmlu" in only:
        t0 = time.perf_counter()
        r = two_tier_test(
            a.data_dir,
            ["routellm-mmlu.jsonl"],
            "routellm-mmlu.jsonl",
            a.label_mode,
            a.neighbours,
            head,
            a.task_weight,
            a.task_head,
            feats,
            a.ridge_share,
        )
        print(
            f"MMLU test ({cfg}): APGR {r['apgr']:.4f} CPT50 {r['cpt50']:.4f} CPT80 {r['cpt80']:.4f} "
            f"n={int(r['n'])} [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    if "mmlu-cv" in only:
        t0 = time.perf_counter()
        r = two_tier_cv(
            a.data_dir,
            "routellm-mmlu.jsonl",
            a.label_mode,
            a.neighbours,
            head,
            a.task_weight,
            a.task_head,
            feats,
            a.ridge_share,
        )
        print(
            f"MMLU train 5-fold CV ({cfg}): APGR {r['apgr']:.4f} CPT50 {r['cpt50']:.4f} CPT80 {r['cpt80']:.4f} "
            f"n={int(r['n'])} [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    if "gsm8k" in only:
        t0 = time.perf_counter()
        r = two_tier_test(
            a.data_dir,
            ["routellm-mmlu.jsonl", "routellm-gsm8k.jsonl"],
            "routellm-gsm8k.jsonl",
            a.label_mode,
            a.neighbours,
            head,
            a.task_weight,
            a.task_head,
            feats,
            a.ridge_share,
        )
        print(
            f"GSM8K test ({cfg}): APGR {r['apgr']:.4f} CPT50 {r['cpt50']:.4f} CPT80 {r['cpt80']:.4f} "
            f"n={int(r['n'])} [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    if "llmrouter" in only:
        t0 = time.perf_counter()
        r = llmrouter_cv(
            a.data_dir, a.neighbours, head, a.task_weight, a.task_head, features=feats, ridge_share=a.ridge_share
        )
        rep = r["report"]
        best = rep["best_single"]
        print(
            f"LLMRouter 5-fold CV ({cfg}): quality at <= 0.50 $/Mtok {r['quality_at_budget']:.5f}; best single "
            f"{best['model']} {best['quality']:.5f} at {best['cost']:.2f}; oracle {rep['oracle']['quality']:.4f} "
            f"at {rep['oracle']['cost']:.3f} [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
        for c in rep["curve"]:
            if c["cost_weight_bp"] in (0, 250, 500, 1000, 2000):
                print(f"  lambda {c['cost_weight_bp'] / 10000:.3f}: quality {c['quality']:.4f} at {c['cost']:.3f}")


if __name__ == "__main__":
    main()
