"""BEST-Route candidates: the run-time rule that picks a (model, n) candidate for a prompt. Numpy only.

A candidate `MODEL@N` draws N answers from MODEL and returns the one a reward model scores highest (`@1`: one
answer, no reward model). A `candidates` router artifact (artifact.py) lists its candidates with the base model's
list prices and the model's mean one-sample output length, and its head predicts one quality per candidate.

Cost of candidate k on a prompt of `t_in` input tokens, in USD:

    (t_in * input_usd_per_mtok_k + n_k * output_tokens_k * output_usd_per_mtok_k) / 1e6

(n samples each about as long as one; a reward model's own cost is not counted: it is the same for every n > 1
and small beside the samples). At serving `t_in` is `input_tokens(prompt)`, ceil(characters / 4), the estimate the
outcome data's `tokens.input` was made with, so serving and training price a prompt alike.

The rule (`choose_candidate`, and `choose_rows` for many prompts at once, one implementation): among the allowed
candidates, the one maximising `quality - lambda * cost_per_1k_prompts`, lambda = `cost_weight_bp / 10000` quality
per USD per 1k prompts; exact ties go to the cheaper candidate, then the lower index, so an uninformative head
never costs more. Serving needs only the artifact, the integer knob and which candidates the deployment can
serve (`allowed`); `tiergate calibrate --usd-per-1k-prompts B` turns a budget into the knob.

Why a cost weight over predicted quality, not BEST-Route's "cheapest candidate with Pr[>= reference] >= t": both
were measured by 5-fold cross-validation on alpacaeval-bon (docs/routing.md, "Best-of-N candidates"); the
quality rule is the one the N-tier router already serves and calibrates, and it did no worse there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiergate.routing.errors import ArtifactError, RoutingError
from tiergate.routing.operating_points import BP, check_cost_weight

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from tiergate.routing.artifact import RouterArtifact

# Characters per token of the estimate `input_tokens` makes (and the outcome data's `tokens.input` was made with):
# ~4 characters a token is the usual figure for English text with GPT-style tokenisers.
CHARS_PER_TOKEN = 4
# Costs are stated per 1k prompts: a per-prompt figure for cheap models is a few 1e-5 USD, unreadable in tables.
PROMPTS_PER_UNIT = 1000


@dataclass(frozen=True)
class Candidate:
    """One (model, n) candidate of a `candidates` artifact; `name` is the artifact's tier name (`MODEL@N`)."""

    name: str
    model: str
    n: int
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    output_tokens: float


def parse_candidate(name: str) -> tuple[str, int]:
    """`MODEL@N` -> (MODEL, N); a name without `@` is one sample (`MODEL@1`). `RoutingError` on a bad N."""
    model, sep, n_text = name.rpartition("@")
    if not sep:
        return name, 1
    if not model or not n_text.isdigit() or int(n_text) < 1:
        raise RoutingError(f"candidate {name!r}: expected MODEL@N with an integer N >= 1")
    return model, int(n_text)


def candidates_of(art: RouterArtifact) -> tuple[Candidate, ...]:
    """The artifact's candidates in head-output order; `ArtifactError` when it is not a `candidates` artifact."""
    if art.kind != "candidates":
        raise ArtifactError(f"a {art.kind} artifact has no candidates")
    out = []
    for t in art.tiers:
        if (
            t.model is None
            or t.n is None
            or t.input_usd_per_mtok is None
            or t.output_usd_per_mtok is None
            or t.output_tokens is None
        ):
            raise ArtifactError(f"candidate {t.name!r} lacks its model, n, prices or output tokens")
        out.append(Candidate(t.name, t.model, t.n, t.input_usd_per_mtok, t.output_usd_per_mtok, t.output_tokens))
    return tuple(out)


def input_tokens(prompt_text: str) -> int:
    """The serving-time estimate of a prompt's input tokens: ceil(characters / 4)."""
    return math.ceil(len(prompt_text) / CHARS_PER_TOKEN)


def candidate_costs(cands: Sequence[Candidate], t_in: int) -> npt.NDArray[np.float64]:
    """USD per prompt of each candidate on a prompt of `t_in` input tokens (the module docstring's formula)."""
    import numpy as np

    return np.array(
        [(t_in * c.input_usd_per_mtok + c.n * c.output_tokens * c.output_usd_per_mtok) / 1e6 for c in cands],
        dtype=np.float64,
    )


def choose_rows(
    quality: npt.NDArray[np.floating],
    costs_usd: npt.NDArray[np.floating],
    cost_weight_bp: int,
    allowed: npt.NDArray[np.bool_] | Sequence[bool] | None = None,
) -> npt.NDArray[np.int64]:
    """Per row of `quality` `[n, k]` (predicted) and `costs_usd` `[n, k]` (USD per prompt), the chosen candidate:
    argmax of quality - lambda * cost per 1k prompts over the `allowed` ones (all when None), exact ties to the
    cheaper, then the lower index. `ValueError` when nothing is allowed."""
    import numpy as np

    bp = check_cost_weight(cost_weight_bp)
    q = np.asarray(quality, dtype=np.float64)
    c = np.asarray(costs_usd, dtype=np.float64) * PROMPTS_PER_UNIT
    if q.ndim != 2 or q.shape != c.shape:
        raise RoutingError(f"quality {q.shape} and costs {c.shape} must both be [prompts, candidates]")
    util = q - (bp / BP) * c
    if allowed is not None:
        ok = np.asarray(allowed, dtype=bool)
        if ok.shape != (q.shape[1],):
            raise RoutingError(f"allowed has {ok.shape} entries for {q.shape[1]} candidates")
        if not ok.any():
            raise ValueError("no candidate is allowed")
        util = np.where(ok[None, :], util, -np.inf)
    best = util.max(axis=1, keepdims=True)
    # Exact ties (same utility) go to the cheaper candidate; argmin takes the first index among equal costs.
    res: npt.NDArray[np.int64] = np.argmin(np.where(util >= best, c, np.inf), axis=1).astype(np.int64)
    return res


def choose_candidate(
    head_row: Sequence[float] | npt.NDArray[np.floating],
    cands: Sequence[Candidate],
    t_in: int,
    cost_weight_bp: int,
    allowed: Sequence[bool],
) -> int:
    """Index into `cands` of the candidate for one prompt: `head_row` is the head's output for it (predicted
    quality per candidate), `t_in` its input tokens, `allowed[k]` whether candidate k may be served. Never a
    disallowed candidate; ties to the cheaper; `ValueError` when nothing is allowed."""
    import numpy as np

    q = np.asarray(head_row, dtype=np.float64).reshape(1, -1)
    if q.shape[1] != len(cands) or len(allowed) != len(cands):
        raise RoutingError(f"head row ({q.shape[1]}), candidates ({len(cands)}) and allowed ({len(allowed)}) differ")
    return int(choose_rows(q, candidate_costs(cands, t_in).reshape(1, -1), cost_weight_bp, list(allowed))[0])
