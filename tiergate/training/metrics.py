"""Cost-quality metrics: RouteLLM's PGR curve, APGR and CPT for two tiers; quality/cost points for N tiers.

Two tiers (RouteLLM, "RouteLLM: Learning to Route LLMs with Preference Data", 2024):
- A router orders prompts by score (higher = strong tier needed). Sending the top share `x` of prompts to the
  strong model gives mean quality `q(x)`; `PGR(x) = (q(x) - q_weak) / (q_strong - q_weak)`.
- Prompts with equal scores are indistinguishable to a threshold, so inside a tie group the curve is the
  expectation over random tie-breaking: a straight line between the group's end points. The curve is therefore
  piecewise linear through the points at tie-group boundaries (plus x = 0 and x = 1).
- `APGR` is the area under PGR(x) for x in [0, 1] (trapezoids over those points, exact for the piecewise-linear
  curve). Random routing has PGR(x) = x in expectation, APGR 0.5.
- `CPT(p)` is the smallest share x with PGR(x) >= p (linear interpolation on the curve); 1.0 where only the
  all-strong end reaches it.

N tiers: quality is the mean score of the chosen model, cost the mean of its price ($/Mtok, input + output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiergate.routing.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class PGRCurve:
    """Piecewise-linear routing curve: `share[i]` of strong calls gives `quality[i]` and `pgr[i]`.

    `thresholds[i]` is the score threshold that realises point i: route to strong when score >= threshold
    (+inf for the all-weak point; for points inside tie groups it is the group's score).
    """

    share: FloatArray
    quality: FloatArray
    pgr: FloatArray
    thresholds: FloatArray
    q_weak: float
    q_strong: float

    @property
    def apgr(self) -> float:
        import numpy as np

        return float(np.trapezoid(self.pgr, self.share))

    def cpt(self, target: float) -> float:
        """Smallest share of strong calls with PGR >= target (in [0, 1])."""
        return _first_crossing(self.share, self.pgr, target)


def _first_crossing(x: FloatArray, y: FloatArray, target: float) -> float:
    import numpy as np

    hits = np.nonzero(y >= target - 1e-12)[0]
    if len(hits) == 0:
        return 1.0
    j = int(hits[0])
    if j == 0:
        return float(x[0])
    x0, x1, y0, y1 = float(x[j - 1]), float(x[j]), float(y[j - 1]), float(y[j])
    if y1 == y0:
        return x1
    return x0 + (target - y0) * (x1 - x0) / (y1 - y0)


def pgr_curve(router_scores: FloatArray, weak: FloatArray, strong: FloatArray) -> PGRCurve:
    """The routing curve of `router_scores` on prompts with the given weak and strong model scores."""
    import numpy as np

    r = np.asarray(router_scores, dtype=np.float64)
    w = np.asarray(weak, dtype=np.float64)
    s = np.asarray(strong, dtype=np.float64)
    n = len(r)
    if n == 0 or len(w) != n or len(s) != n:
        raise DataError(f"need equally long, non-empty score arrays (router {n}, weak {len(w)}, strong {len(s)})")
    if not np.all(np.isfinite(r)):
        raise DataError("router scores must be finite")
    q_w, q_s = float(w.mean()), float(s.mean())
    if abs(q_s - q_w) < 1e-12:
        raise DataError(f"weak and strong have the same mean quality ({q_w:.4f}) on this data: PGR is undefined")
    order = np.argsort(-r, kind="stable")
    rs = r[order]
    gain = np.cumsum(s[order] - w[order])
    # Ends of tie groups: after position i when the next score differs (and the last position).
    ends = np.nonzero(np.append(rs[1:] != rs[:-1], True))[0]
    k = np.concatenate([[0], ends + 1])
    g = np.concatenate([[0.0], gain[ends]])
    share = k / n
    quality = q_w + g / n
    pgr = (quality - q_w) / (q_s - q_w)
    thresholds = np.concatenate([[np.inf], rs[ends]])
    return PGRCurve(share=share, quality=quality, pgr=pgr, thresholds=thresholds, q_weak=q_w, q_strong=q_s)


def apgr(router_scores: FloatArray, weak: FloatArray, strong: FloatArray) -> float:
    """Area under the PGR curve (see module docstring)."""
    return pgr_curve(router_scores, weak, strong).apgr


def oracle_scores(weak: FloatArray, strong: FloatArray) -> FloatArray:
    """The oracle router: strong first where it gains most (strong - weak)."""
    import numpy as np

    return np.asarray(strong, dtype=np.float64) - np.asarray(weak, dtype=np.float64)


@dataclass(frozen=True)
class TierPoint:
    """One N-tier operating point: mean quality, mean price ($/Mtok) and the share routed to each tier."""

    name: str
    quality: float
    cost: float
    shares: list[float]


def tier_point(name: str, choice: npt.NDArray[np.int64], scores: FloatArray, prices: FloatArray) -> TierPoint:
    """Quality and cost of routing prompt i to tier `choice[i]`; `prices` per tier `[m]`, or per prompt and tier
    `[n, m]` (candidates: cost depends on the prompt's tokens)."""
    import numpy as np

    n, m = scores.shape
    c = np.asarray(choice, dtype=np.int64)
    q = float(scores[np.arange(n), c].mean())
    pr = np.asarray(prices, dtype=np.float64)
    cost = float((pr[np.arange(n), c] if pr.ndim == 2 else pr[c]).mean())
    shares = [float(v) for v in np.bincount(c, minlength=m) / n]
    return TierPoint(name=name, quality=q, cost=cost, shares=shares)


def oracle_choice(scores: FloatArray, prices: FloatArray) -> npt.NDArray[np.int64]:
    """Per prompt the best-scoring tier, the cheapest among ties (the cost-aware oracle); `prices` `[m]` or
    `[n, m]` as in `tier_point`."""
    import numpy as np

    best = scores.max(axis=1, keepdims=True)
    ok = scores >= best - 1e-12
    price_if_ok = np.where(ok, np.broadcast_to(np.asarray(prices, dtype=np.float64), scores.shape), np.inf)
    res: npt.NDArray[np.int64] = np.argmin(price_if_ok, axis=1).astype(np.int64)
    return res
