"""How a policy's tiers meet an N-tier artifact's: which artifact tier a policy tier serves, and whether the policy's
prices are the artifact's up to one factor (so that the artifact's calibration holds for them).

The router applies these rules (`tiergate_router.config.knobs.multi_tier_for`) and the operator checks them before
it hands an artifact to a router (`tiergate_operator.classifier`), so that a policy the router would refuse is
refused in the policy's status instead of in a crash-looping router pod. One definition for both. Standard library
only: the operator image has no numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Relative slack when comparing a policy's prices with an artifact's: the policy's are exact decimals, the
# artifact's sums of floats (input + output), so equal prices differ in the last bits only.
PRICE_RTOL = 1e-9


# What a policy whose prices an artifact's calibration does not describe can do.
PRICE_WAY_OUT = (
    "Set a cost weight for these prices (spec.router.costWeightBasisPoints or --cost-weight-bp; `tiergate eval "
    "--prices` draws the curve at them), or train the artifact with them (`tiergate train --prices`)"
)


def artifact_tier(keys: Sequence[str | None], known: Sequence[str]) -> int | None:
    """The index in `known` (an artifact's tier names) of the first of `keys` that names one, None if none does.
    A policy tier's keys, in order: its name, its served model name, its model (tier names are DNS labels of at
    most 20 characters, artifact tiers model names such as `llama-3.1-8b-instruct`)."""
    return next((known.index(k) for k in keys if k and k in known), None)


def price_factor(mine: Sequence[float], calibrated: Sequence[float]) -> tuple[float, int]:
    """(k, -1) when `mine[i] == k * calibrated[i]` for every i with one k > 0; else (k, i), i the first tier off
    the ratio k (the first tier's with a non-zero calibrated price; all zero: 1). Prices in the same ratios make
    argmax(quality - lambda * price) choose alike at lambda and lambda / k, so an artifact's calibration holds for
    them; other ratios it does not describe. k within PRICE_RTOL of 1 is 1: the same prices."""
    base = next((i for i, c in enumerate(calibrated) if c > 0), None)
    k = 1.0 if base is None else mine[base] / calibrated[base]
    if math.isclose(k, 1.0, rel_tol=PRICE_RTOL):
        k = 1.0  # the same prices: a budget is compared with the table as written, not off by a rounding error
    if k <= 0:
        return k, base if base is not None else 0
    for i, (m, c) in enumerate(zip(mine, calibrated, strict=True)):
        if not math.isclose(m, k * c, rel_tol=PRICE_RTOL, abs_tol=1e-12):
            return k, i
    return k, -1


def price_mismatch(mine: float, k: float, first: bool, theirs: float, artifact_tier_name: str) -> str:
    """How a tier's price is off the artifact's ratio, for messages (`price_factor` found it)."""
    ref = f"the artifact's {theirs:g} for {artifact_tier_name}"
    ratio = f"{ref} (or a positive multiple)" if k <= 0 or first else f"{k:g} x {ref}, as the tiers before"
    return f"{mine:g} $/Mtok (input + output) is not {ratio}"
