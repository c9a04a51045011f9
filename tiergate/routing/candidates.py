"""STAND-IN for helper "train"'s module (wip/train): the run-time rule over (model, n) candidates, to the interface
of bestroute-design.md section 1, just enough for the router's best-of-N decision and its tests. The lead takes
wip/train's file at merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from tiergate.routing.artifact import RouterArtifact


@dataclass(frozen=True)
class Candidate:
    name: str
    model: str
    n: int
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    output_tokens: float


def candidates_of(art: RouterArtifact) -> tuple[Candidate, ...]:
    out = []
    for t in art.tiers:
        model, _, n = t.name.partition("@")
        out.append(
            Candidate(
                name=t.name,
                model=str(getattr(t, "model", model)),
                n=int(getattr(t, "n", int(n or 1))),
                input_usd_per_mtok=float(getattr(t, "input_usd_per_mtok", t.price / 2)),
                output_usd_per_mtok=float(getattr(t, "output_usd_per_mtok", t.price / 2)),
                output_tokens=float(getattr(t, "output_tokens", 256.0)),
            )
        )
    return tuple(out)


def input_tokens(prompt_text: str) -> int:
    return math.ceil(len(prompt_text) / 4)


def candidate_costs(cands: Sequence[Candidate], t_in: int) -> npt.NDArray[np.float64]:
    return np.array(
        [(t_in * c.input_usd_per_mtok + c.n * c.output_tokens * c.output_usd_per_mtok) / 1e6 for c in cands],
        dtype=np.float64,
    )


def choose_candidate(
    head_row: Sequence[float], cands: Sequence[Candidate], t_in: int, cost_weight_bp: int, allowed: Sequence[bool]
) -> int:
    """argmax of quality - (bp / 10000) * cost in USD per 1k prompts over the allowed candidates; ties -> cheaper."""
    if not any(allowed):
        raise ValueError("no candidate is allowed")
    cost = candidate_costs(cands, t_in) * 1000
    lam = cost_weight_bp / 10000
    best, best_key = -1, (-math.inf, 0.0)
    for i, ok in enumerate(allowed):
        if not ok:
            continue
        key = (float(head_row[i]) - lam * float(cost[i]), -float(cost[i]))
        if key > best_key:
            best, best_key = i, key
    return best
