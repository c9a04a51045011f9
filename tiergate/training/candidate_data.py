"""Candidate (`MODEL@N`, BEST-Route) outcome data: prices, one-sample output lengths and per-prompt costs.

A candidate's cost on a row is `tokens.input * input price + n * (MODEL@1's output tokens on that row) * output
price` (docs/routing.md, "Best-of-N candidates"): the `@N` column's own `tokens.output` is the length of the one
answer returned, not of the n drawn, so the one-sample length of the same model stands for each sample. Two cost
matrices come out of a data set:

- `true_costs`: what routing each row to each candidate cost, from the rows' `tokens` (the figure reports use);
- `estimated_costs`: what the router believes before answering (`tiergate.routing.candidates.candidate_costs`
  on ceil(chars / 4) input tokens and the artifact's mean output tokens), the costs its decisions are made with.

Calibration and evaluation decide with the estimate and measure with the truth, as serving does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tiergate.routing.candidates import Candidate, candidate_costs, input_tokens, parse_candidate
from tiergate.routing.errors import DataError, RoutingError
from tiergate.training.data import read_json_object

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from tiergate.training.data import OutcomeSet

# Output tokens assumed for a model no training row gives `tokens` for: a typical chat answer (the AlpacaEval
# models' one-sample answers average 200-500 tokens). Stated in the artifact as that candidate's output_tokens.
DEFAULT_OUTPUT_TOKENS = 300.0


def is_candidate_list(names: Sequence[str]) -> bool:
    """Whether `--tiers` names candidates (any `MODEL@N`)."""
    return any("@" in n for n in names)


def base_of(name: str) -> str:
    """The one-sample column of a candidate's model: `MODEL@1` for `MODEL@N`, the candidate itself for one sample
    (so a plain model name is its own base)."""
    model, n = parse_candidate(name)
    return name if n == 1 else f"{model}@1"


def token_columns(names: Sequence[str]) -> list[str]:
    """The columns whose `tokens` the costs need: every candidate and its `@1` base, each once."""
    out: list[str] = []
    for n in names:
        for c in (n, base_of(n)):
            if c not in out:
                out.append(c)
    return out


def check_reference(names: Sequence[str], reference: str) -> None:
    """The reference must be one of the candidates, with one sample; `RoutingError` naming the problem."""
    if reference not in names:
        raise RoutingError(f"--reference {reference!r} is not one of --tiers ({', '.join(names)})")
    if parse_candidate(reference)[1] != 1:
        raise RoutingError(f"--reference {reference!r} must be a one-sample candidate (MODEL@1)")


def load_candidate_prices(path: str | Path, names: Sequence[str]) -> list[tuple[float, float]]:
    """(input, output) USD per million tokens of each candidate, from a prices file keyed by `MODEL@N` or, failing
    that, by the base MODEL (alpacaeval-bon-models.json form). `DataError` naming the file and the candidate when one
    is missing or lacks the input/output split (a candidate's cost needs both)."""
    p = str(path)
    doc = read_json_object(p, "{model: {input_usd_per_mtok, output_usd_per_mtok}}")
    out = []
    for name in names:
        model = parse_candidate(name)[0]
        key = name if name in doc else model
        if key not in doc:
            raise DataError(f"no price for candidate {name!r} (looked for {name!r} and {model!r})", path=p)
        entry = doc[key]
        try:
            pin, pout = float(entry["input_usd_per_mtok"]), float(entry["output_usd_per_mtok"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"price of {key!r} needs numeric input_usd_per_mtok and output_usd_per_mtok (a candidate's cost "
                "weighs input and output tokens apart)",
                path=p,
            ) from e
        if not (math.isfinite(pin) and math.isfinite(pout) and pin >= 0 and pout >= 0):
            raise DataError(f"prices of {key!r} must be finite and >= 0, got {pin}, {pout}", path=p)
        out.append((pin, pout))
    return out


def _col(data: OutcomeSet, name: str) -> int:
    return data.token_columns.index(name)


def one_sample_output(data: OutcomeSet, name: str) -> npt.NDArray[np.float64]:
    """Per row, the output tokens of `name`'s `@1` base (NaN where the row gives none). `DataError` naming the file
    and line of the first row that gives `tokens` for an `@N` candidate (N > 1) but none for its `@1` base: its
    n samples cannot be priced from the one answer returned."""
    import numpy as np

    if data.tokens_out is None:
        raise RoutingError("outcomes were read without token columns")
    base = base_of(name)
    out1 = data.tokens_out[:, _col(data, base)]
    if parse_candidate(name)[1] > 1:
        own = data.tokens_out[:, _col(data, name)]
        bad = np.nonzero(np.isfinite(own) & ~np.isfinite(out1))[0]
        if len(bad):
            path, line = data.origins[int(bad[0])]
            raise DataError(
                f"tokens for {name!r} but none for its one-sample base {base!r}: the cost of n samples is n x the "
                f"one-sample output, so the data needs {base!r} tokens",
                path=path,
                line=line,
            )
    return out1


def measure_candidates(
    data: OutcomeSet, names: Sequence[str], prices: Sequence[tuple[float, float]]
) -> tuple[Candidate, ...]:
    """The candidates with their mean one-sample output tokens on `data` (DEFAULT_OUTPUT_TOKENS where no row gives
    any), what a `candidates` artifact stores."""
    import numpy as np

    out = []
    for name, (pin, pout) in zip(names, prices, strict=True):
        model, n = parse_candidate(name)
        out1 = one_sample_output(data, name)
        seen = out1[np.isfinite(out1)]
        tokens = float(seen.mean()) if len(seen) else DEFAULT_OUTPUT_TOKENS
        out.append(Candidate(name, model, n, pin, pout, tokens))
    return tuple(out)


def true_costs(data: OutcomeSet, cands: Sequence[Candidate]) -> npt.NDArray[np.float64]:
    """`[rows, candidates]` USD per prompt from the rows' `tokens` (input of the candidate's column, output of its
    `@1` base); where a row gives none, the serving estimate (ceil(chars / 4), the candidate's mean output)."""
    import numpy as np

    if data.tokens_in is None:
        raise RoutingError("outcomes were read without token columns")
    out = np.zeros((len(data), len(cands)), dtype=np.float64)
    for k, c in enumerate(cands):
        t_in = data.tokens_in[:, _col(data, c.name)]
        out1 = one_sample_output(data, c.name)
        t_in = np.where(np.isfinite(t_in), t_in, [input_tokens(p) for p in data.prompts])
        out1 = np.where(np.isfinite(out1), out1, c.output_tokens)
        out[:, k] = (t_in * c.input_usd_per_mtok + c.n * out1 * c.output_usd_per_mtok) / 1e6
    return out


def estimated_costs(prompts: Sequence[str], cands: Sequence[Candidate]) -> npt.NDArray[np.float64]:
    """`[prompts, candidates]` USD per prompt as the router estimates it (`candidates.candidate_costs`)."""
    import numpy as np

    if not prompts:
        return np.zeros((0, len(cands)), dtype=np.float64)
    return np.stack([candidate_costs(cands, input_tokens(p)) for p in prompts])
