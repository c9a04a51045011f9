"""Operating points: the one owner of every rule that turns a router's output or a user's target into a decision.

`tiergate train` measures a calibration table, `tiergate eval` and `tiergate calibrate` read and print it, and the
router serves from it; all of them call the functions here and nothing else, so a budget, a share or a score
means the same thing in a report as in production.

The table (stored in the artifact's `"calibration"` list, format unchanged):

- two tiers, one `ThresholdPoint` per threshold: route to the strong tier when `score >= threshold_bp / 10000`,
  giving `strong_share` of strong calls, mean `quality` and `pgr` on the calibration data;
- N tiers, one `CostWeightPoint` per cost weight of `COST_WEIGHTS_BP`: choose argmax(quality - lambda * price)
  with lambda = `cost_weight_bp / 10000`, giving mean price `cost` ($/Mtok), mean `quality` and per-tier `shares`.

One function per target:

- share of strong calls (two tiers): `threshold_for_share`, the lowest threshold whose share is at most the
  target;
- PGR (two tiers): `threshold_for_pgr`, the highest threshold (fewest strong calls) reaching the PGR;
- budget in $/Mtok (N tiers): `cost_weight_for_budget`, the best quality whose mean price fits, the smaller
  weight on ties (why: see the function);
- quality (N tiers): `cost_weight_for_quality`, the cheapest point reaching it, the smaller weight on ties;
- score -> tier: `tier_for_score`, the highest tier whose threshold the score `reaches`;
- predicted quality -> tier: `choose_tiers`, argmax(quality - lambda * price), ties to the cheaper tier.

No match is always `NoOperatingPoint`, naming the target and the closest the table gets; the router turns it into
a refused policy (the last good one keeps serving), `tiergate calibrate` into a one-line error.

Scores are compared with thresholds exactly (`score >= bp / 10000`), never rounded to basis points first, in
serving as in calibration. Rounding in one place only would send a score half a basis point under a threshold
one way in serving and the other in calibration; rounding in both would change what the shipped artifacts'
tables and every published `eval` curve were measured with. Exact comparison needs neither.

Numpy only (imported inside the functions that need it): this is run-time code the router image carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

from tiergate.routing.errors import ArtifactError, NoOperatingPoint, RoutingError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# Thresholds and cost weights are integer basis points: a CRD spec holds no floats (docs/routing.md).
BP = 10000
# Cost weights swept for N-tier tables and curves, basis points of quality per $/Mtok: 25 bp steps up to 0.2,
# where the curve moves (100 bp steps missed operating points between 0.05 and 0.1), coarse beyond.
COST_WEIGHTS_BP: tuple[int, ...] = (*range(0, 2000, 25), *range(2000, 10001, 250))
# Float slack for comparing measured figures with a target: the table's shares are multiples of 1/n and its
# PGRs ratios of means, so 1e-9 only absorbs rounding; prices are sums of a few decimals, 1e-12 is plenty.
SHARE_SLACK = 1e-9
PGR_SLACK = 1e-9
COST_SLACK = 1e-12
QUALITY_SLACK = 1e-12


@dataclass(frozen=True)
class ThresholdPoint:
    """Two tiers: the strong tier for `score >= threshold_bp / 10000` gives these figures."""

    threshold_bp: int
    strong_share: float
    quality: float
    pgr: float


@dataclass(frozen=True)
class CostWeightPoint:
    """N tiers: lambda = `cost_weight_bp / 10000` gives mean price `cost` ($/Mtok), `quality`, per-tier `shares`."""

    cost_weight_bp: int
    cost: float
    quality: float
    shares: tuple[float, ...]


@dataclass(frozen=True)
class CalibrationTable:
    """An artifact's calibration: threshold points (two tiers) or cost-weight points (N tiers), never both."""

    thresholds: tuple[ThresholdPoint, ...] = ()
    cost_weights: tuple[CostWeightPoint, ...] = ()

    def __post_init__(self) -> None:
        if self.thresholds and self.cost_weights:
            raise ArtifactError("a calibration table holds threshold points or cost-weight points, not both")

    def __len__(self) -> int:
        return len(self.thresholds) + len(self.cost_weights)

    @classmethod
    def from_json(cls, rows: object, kind: str) -> CalibrationTable:
        """Parse the artifact's `"calibration"` list for an artifact of `kind` ("two_tier" or "multi_tier")."""
        if not isinstance(rows, list):
            raise ArtifactError("calibration: expected a list of operating points")
        try:
            if kind == "two_tier":
                return cls(
                    thresholds=tuple(
                        ThresholdPoint(
                            threshold_bp=int(r["threshold_bp"]),
                            strong_share=float(r["strong_share"]),
                            quality=float(r["quality"]),
                            pgr=float(r["pgr"]),
                        )
                        for r in rows
                    )
                )
            return cls(
                cost_weights=tuple(
                    CostWeightPoint(
                        cost_weight_bp=int(r["cost_weight_bp"]),
                        cost=float(r["cost"]),
                        quality=float(r["quality"]),
                        shares=tuple(float(s) for s in r["shares"]),
                    )
                    for r in rows
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"calibration: malformed operating point ({type(e).__name__}: {e})") from e

    def to_json(self) -> list[dict[str, Any]]:
        """The artifact's `"calibration"` list (keys in the order `tiergate train` has always written them)."""
        if self.thresholds:
            return [
                {"threshold_bp": p.threshold_bp, "strong_share": p.strong_share, "quality": p.quality, "pgr": p.pgr}
                for p in self.thresholds
            ]
        return [
            {"cost_weight_bp": p.cost_weight_bp, "cost": p.cost, "quality": p.quality, "shares": list(p.shares)}
            for p in self.cost_weights
        ]


def check_bp(bp: int, what: str = "threshold") -> int:
    """`bp` if it is an integer number of basis points in 0..10000, else `RoutingError`."""
    if isinstance(bp, bool) or not isinstance(bp, int) or not 0 <= bp <= BP:
        raise RoutingError(f"{what} {bp!r} must be an integer number of basis points in 0..{BP}")
    return bp


def check_cost_weight(bp: int) -> int:
    if isinstance(bp, bool) or not isinstance(bp, int) or bp < 0:
        raise RoutingError(f"cost weight {bp!r} must be a non-negative integer number of basis points")
    return bp


# Score -> tier ---------------------------------------------------------------------------------------------------
@overload
def reaches(score: float, threshold_bp: int) -> bool: ...
@overload
def reaches(score: npt.NDArray[np.floating], threshold_bp: int) -> npt.NDArray[np.bool_]: ...
def reaches(score: Any, threshold_bp: int) -> Any:
    """The threshold rule, for one score or an array of them: `score >= threshold_bp / 10000`, compared exactly
    (the module docstring says why no rounding). 0 bp is reached by every score in [0, 1]; 10000 only by 1."""
    return score >= threshold_bp / BP


def threshold_bp_at(score: float) -> int:
    """The largest integer threshold that `score` still `reaches` (for tables and curves built from scores); the
    1e-9 absorbs products like 0.57 * 10000 = 5699.999..., which `reaches(0.57, 5700)` does reach."""
    import math

    return math.floor(score * BP + 1e-9)


def tier_for_score(score: float, thresholds_bp: Sequence[int]) -> int:
    """Index (cheapest first) of the highest tier whose threshold the score reaches; `thresholds_bp[i]` is the
    threshold of tier i + 1, ascending, so len(tiers) == len(thresholds_bp) + 1."""
    chosen = 0
    for i, th in enumerate(thresholds_bp):
        if reaches(score, th):
            chosen = i + 1
    return chosen


# Predicted quality -> tier -------------------------------------------------------------------------------------
def choose_tiers(
    quality: npt.NDArray[np.float64], prices: Sequence[float] | npt.NDArray[np.float64], cost_weight_bp: int
) -> npt.NDArray[np.int64]:
    """Per row of `quality` `[n, tiers]`, argmax over tiers of quality - lambda * price (lambda = bp / 10000);
    ties go to the cheaper tier (then the lower index), so an uninformative head never costs more. A tier the
    caller does not serve can be taken out with quality -inf."""
    import numpy as np

    bp = check_cost_weight(cost_weight_bp)
    pr = np.asarray(prices, dtype=np.float64)
    util = np.asarray(quality, dtype=np.float64) - (bp / BP) * pr[None, :]
    # Cheapest first, so argmax's first-maximum rule sends ties to the cheaper tier.
    order = np.argsort(pr, kind="stable")
    pick = np.argmax(util[:, order], axis=1)
    res: npt.NDArray[np.int64] = order[pick].astype(np.int64)
    return res


# Targets -> operating point -------------------------------------------------------------------------------------
def _need(points: Sequence[object], target: str) -> None:
    if not points:
        raise NoOperatingPoint(f"{target}: the artifact has no calibration table", target=target, closest=None)


def threshold_for_share(points: Sequence[ThresholdPoint], share: float) -> ThresholdPoint:
    """Two tiers: the lowest threshold (most strong calls) whose calibrated share is at most `share` (0..1)."""
    if not 0.0 <= share <= 1.0:
        raise RoutingError(f"target share {share} is outside 0..1")
    target = f"strong share {share}"
    _need(points, target)
    ok = [p for p in points if p.strong_share <= share + SHARE_SLACK]
    if not ok:
        low = min(p.strong_share for p in points)
        raise NoOperatingPoint(
            f"no threshold keeps the strong share at or below {share} (lowest calibrated {low:.4f})",
            target=target,
            closest=low,
        )
    return min(ok, key=lambda p: (p.threshold_bp, -p.strong_share))


def threshold_for_pgr(points: Sequence[ThresholdPoint], pgr: float) -> ThresholdPoint:
    """Two tiers: the highest threshold (fewest strong calls) whose calibrated PGR reaches `pgr` (0..1.5: a
    router can beat the strong model alone)."""
    if not 0.0 <= pgr <= 1.5:
        raise RoutingError(f"target PGR {pgr} is outside 0..1.5")
    target = f"PGR {pgr}"
    _need(points, target)
    ok = [p for p in points if p.pgr >= pgr - PGR_SLACK]
    if not ok:
        best = max(p.pgr for p in points)
        raise NoOperatingPoint(
            f"no threshold reaches PGR {pgr} on the calibration data (best {best:.3f})", target=target, closest=best
        )
    return max(ok, key=lambda p: p.threshold_bp)


def cost_weight_for_budget(points: Sequence[CostWeightPoint], budget: float) -> CostWeightPoint:
    """N tiers: the best-quality calibrated point whose mean price is at most `budget` $/Mtok; on equal quality
    the smaller cost weight.

    Why best quality rather than the smallest weight that fits: a budget says how much may be spent, and the user
    wants the most quality for it. The table is measured, not monotone: a larger weight can spend less and score
    higher than a smaller one that also fits (routing noise between neighbouring weights), so "smallest weight"
    would sometimes pick a worse point than the one `tiergate calibrate` prints for the same budget."""
    target = f"budget {budget} $/Mtok"
    _need(points, target)
    ok = [p for p in points if p.cost <= budget + COST_SLACK]
    if not ok:
        cheapest = min(p.cost for p in points)
        raise NoOperatingPoint(
            f"no calibrated operating point costs at most {budget} $/Mtok (cheapest {cheapest:.3f} $/Mtok)",
            target=target,
            closest=cheapest,
        )
    return max(ok, key=lambda p: (p.quality, -p.cost_weight_bp))


def cost_weight_for_quality(points: Sequence[CostWeightPoint], quality: float) -> CostWeightPoint:
    """N tiers: the cheapest calibrated point whose mean quality reaches `quality`; on equal price the smaller
    cost weight (e.g. the default: the cheapest point as good as the best single tier)."""
    target = f"quality {quality}"
    _need(points, target)
    ok = [p for p in points if p.quality >= quality - QUALITY_SLACK]
    if not ok:
        best = max(p.quality for p in points)
        raise NoOperatingPoint(
            f"no calibrated operating point reaches quality {quality} (best {best:.4f})", target=target, closest=best
        )
    return min(ok, key=lambda p: (p.cost, p.cost_weight_bp))


# Operating point -> predicted traffic mix ------------------------------------------------------------------------
def _between(x: int, lo: tuple[int, float], hi: tuple[int, float]) -> float:
    (x0, y0), (x1, y1) = lo, hi
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def strong_share_at(points: Sequence[ThresholdPoint], threshold_bp: int) -> float | None:
    """Two tiers: the share of strong calls the calibration predicts at `threshold_bp`, linear between the two
    calibrated thresholds around it (the table holds the thresholds where the calibration data's share moves);
    None without a table. What the router exports as its predicted mix, so that the observed mix in a policy's
    status is compared with the same figure `tiergate calibrate` prints."""
    if not points:
        return None
    pts = sorted((p.threshold_bp, p.strong_share) for p in points)
    if threshold_bp <= pts[0][0]:
        return pts[0][1]
    if threshold_bp >= pts[-1][0]:
        return pts[-1][1]
    hi = next(i for i, p in enumerate(pts) if p[0] >= threshold_bp)
    return _between(threshold_bp, pts[hi - 1], pts[hi])


def shares_at(points: Sequence[CostWeightPoint], cost_weight_bp: int) -> tuple[float, ...] | None:
    """N tiers: the per-tier shares the calibration predicts at `cost_weight_bp` (linear between the two calibrated
    weights around it, clamped at the ends); None without a table."""
    if not points:
        return None
    pts = sorted(points, key=lambda p: p.cost_weight_bp)
    if cost_weight_bp <= pts[0].cost_weight_bp:
        return pts[0].shares
    if cost_weight_bp >= pts[-1].cost_weight_bp:
        return pts[-1].shares
    hi = next(i for i, p in enumerate(pts) if p.cost_weight_bp >= cost_weight_bp)
    a, b = pts[hi - 1], pts[hi]
    return tuple(
        _between(cost_weight_bp, (a.cost_weight_bp, sa), (b.cost_weight_bp, sb))
        for sa, sb in zip(a.shares, b.shares, strict=True)
    )
