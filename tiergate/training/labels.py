"""Training targets for two-tier routers (Hybrid LLM, ICLR 2024) and N-tier quality heads.

Hybrid LLM defines, for a small model S and a large model L with response qualities q(.), the label
`y(x) = Pr[q(S(x)) >= q(L(x)) - t]` ("the small model is good enough"), with t = 0 from one sample
(deterministic), t = 0 over many samples (probabilistic) and t > 0 chosen from the data (transformed). We use
RouteLLM's orientation, score = need for the strong tier, so our targets are 1 - y.

Our data has one sample per model per prompt, so Pr[...] over samples cannot be measured. We estimate it by
borrowing samples from the prompt's neighbourhood: the `k` nearest training prompts in embedding space (cosine,
the prompt itself included, weights 1 / cosine distance), which is what a router that sees only the embedding can
tell apart anyway. Modes:

- `deterministic`: `1[s > w]` from the single samples (strong strictly better).
- `probabilistic`: the neighbourhood estimate of `Pr[s > w]` (soft label in [0, 1]). Graded scores count as
  Bernoulli success rates: `Pr[S > W] = s (1 - w)` per sample pair.
- `transformed`: `1[d(x) > t]` where `d(x) = E[s - w]` over the neighbourhood and t is chosen as Hybrid LLM
  does, maximising the average pairwise label difference (2 p (1 - p), i.e. a balanced label); t is stored in the
  artifact as `label_margin`. With one 0/1 sample per model the margin on raw samples is meaningless
  (s - w only takes -1, 0, 1), which is why it is applied to the neighbourhood estimate.
- `difference`: the neighbourhood estimate of the expected gain `E[s - w]`, mapped to [0, 1] as (d + 1) / 2 —
  the quantity a cost-quality curve ranks by (routing prompt x to strong adds exactly s - w to the total).
- `quality` (N tiers): per-tier neighbourhood estimate of the expected score.

Task smoothing (`task_weight` alpha > 0): where rows carry a `task` (benchmark or subject), the neighbourhood
estimate is mixed with the task's mean, `alpha * task_mean + (1 - alpha) * neighbourhood`, before the labels
above are formed. The task is used only to build training targets; the router never sees it (it sees the
prompt), so the head learns to recognise the kind of prompt and carries the task-level estimate, which is far
less noisy than one prompt's single sample (docs/routing.md has the figures).

Everything here is numpy and deterministic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tiergate.routing.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float64]

TWO_TIER_MODES = ("deterministic", "probabilistic", "transformed", "difference")
# Rows per block when computing neighbourhoods: 2048 x 11k float32 similarities is ~90 MB.
_BLOCK = 2048


def neighbour_average(emb: npt.NDArray[np.float32], values: FloatArray, k: int) -> FloatArray:
    """For each row, the distance-weighted mean of `values` over its k nearest rows (itself included)."""
    import numpy as np

    x = np.asarray(emb, dtype=np.float32)
    v = np.asarray(values, dtype=np.float64)
    n = len(x)
    k = max(1, min(k, n))
    out = np.zeros(v.shape, dtype=np.float64)
    for start in range(0, n, _BLOCK):
        sim = x[start : start + _BLOCK] @ x.T
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(sim, idx, axis=1).astype(np.float64)
        # 1 / cosine distance, floored at 0.05: the row itself (distance 0) and exact duplicates then weigh 20,
        # about 5 % of a 200-neighbourhood (typical weights 1.5-3), so the estimate is a neighbourhood average,
        # not the row's own noisy sample again.
        w = 1.0 / np.maximum(1.0 - s, 0.05)
        w /= w.sum(axis=1, keepdims=True)
        out[start : start + _BLOCK] = np.einsum("ik,ik...->i...", w, v[idx])
    return out


def task_smoothed(
    emb: npt.NDArray[np.float32], values: FloatArray, k: int, tasks: list[str] | None, task_weight: float
) -> FloatArray:
    """Neighbourhood average of `values`, mixed with the per-task mean (see the module docstring)."""
    import numpy as np

    local = neighbour_average(emb, values, k)
    if not tasks or task_weight <= 0 or all(t == "" for t in tasks):
        return local
    v = np.asarray(values, dtype=np.float64)
    names = np.asarray(tasks)
    task_mean = np.zeros_like(v)
    for t in np.unique(names):
        rows = names == t
        task_mean[rows] = v[rows].mean(axis=0)
    out: FloatArray = task_weight * task_mean + (1.0 - task_weight) * local
    return out


def choose_margin(gain: FloatArray) -> float:
    """Hybrid LLM's margin: t maximising the mean pairwise difference of 1[gain > t], i.e. closest to balanced.

    Candidates are the distinct values of `gain`; ties are broken towards the smaller t."""
    import numpy as np

    g = np.sort(np.asarray(gain, dtype=np.float64))
    cands = np.unique(g)
    n = len(g)
    above = n - np.searchsorted(g, cands, side="right")
    p = above / n
    best = int(np.argmax(p * (1 - p)))
    return float(cands[best])


def two_tier_targets(
    mode: str,
    weak: FloatArray,
    strong: FloatArray,
    emb: npt.NDArray[np.float32],
    k: int,
    tasks: list[str] | None = None,
    task_weight: float = 0.0,
) -> tuple[FloatArray, float | None]:
    """Targets in [0, 1] (higher = strong needed) and the margin t (transformed mode only)."""
    import numpy as np

    w = np.asarray(weak, dtype=np.float64)
    s = np.asarray(strong, dtype=np.float64)
    if mode == "deterministic":
        return (s > w).astype(np.float64), None
    if mode == "probabilistic":
        return task_smoothed(emb, s * (1.0 - w), k, tasks, task_weight), None
    gain = task_smoothed(emb, s - w, k, tasks, task_weight)
    if mode == "difference":
        return (gain + 1.0) / 2.0, None
    if mode == "transformed":
        t = choose_margin(gain)
        return (gain > t).astype(np.float64), t
    raise DataError(f"unknown label mode {mode!r} (known: {', '.join(TWO_TIER_MODES)})")


def check_two_classes(targets: FloatArray, origins: list[tuple[str, int]], what: str) -> None:
    """Refuse training data whose raw label takes a single value: no router can be learned from it.

    The message names the file and the line range, so the user can find the data."""
    import numpy as np

    t = np.asarray(targets)
    if len(t) and np.all(t == t[0]):
        first, last = origins[0], origins[-1]
        span = f"{first[0]}:{first[1]}" + (f" .. {last[0]}:{last[1]}" if len(origins) > 1 else "")
        raise DataError(f"single class: {what} is {t[0]:g} on every row ({len(t)} rows, {span}); nothing to learn")
