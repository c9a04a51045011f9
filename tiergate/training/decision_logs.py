"""Decision logs as outcome data: read the router's JSON-lines logs (`tiergate serve --decision-log`, or the
policy's `spec.router.decisionLog` on stdout), join their records by `request_id`, and recompute a two-tier router's
operating point from production traffic (`tiergate calibrate --data LOG`).

Records (docs/routing.md, "The decision log"): `decision` (one per request: the router's `score`, its `decision`,
the `tier` that answered, the `artifact` that decided), `feedback` (`rating` in -1..1, `source` explicit or
requery) and `shadow` (a baseline answer judged next to the routed one: `routed_tier`, `reward_routed`,
`baseline_tier`, `reward_baseline`). A request's judged quality per tier comes from its shadow records; feedback
is a rating of the tier that answered and is reported per tier, not mixed into the reward model's scale.

What the log supports:
- the share of strong-tier calls at every threshold, from the logged scores of the decisions the classifier made
  (forced tiers, classifier errors and one-tier routers log no score and are left out): `--share` works on any log,
  and in shadow `Baseline` mode the scores are the router's would-be decisions, so a log of a router that answered
  everything from the baseline tier still calibrates it;
- quality and PGR at every threshold, from the requests judged on both tiers (shadow records): `--pgr` needs them.

A path names a log file; its rotated siblings (FILE.1 … FILE.N, the writer's names) are read with it, oldest first.
Lines that are no JSON object (the router's banner and log lines in a log taken from a pod's output) are skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiergate.routing.errors import DataError
from tiergate.routing.operating_points import BP, CalibrationTable, ThresholdPoint, reaches, threshold_bp_at

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from tiergate.training.data import OutcomeSet

KINDS = ("decision", "feedback", "shadow")
# Artifact ids that name no artifact (one saying no sha256, or none at all): such decisions are taken as the given
# artifact's, since nothing says otherwise.
UNKNOWN_ARTIFACTS = frozenset({"", "unknown", "none"})


@dataclass
class LoggedRequest:
    """One request, its records joined."""

    request_id: str
    score: float | None = None
    decision: str | None = None
    tier: str | None = None
    artifact: str | None = None
    cost_usd: float | None = None
    # Feedback ratings by source ("explicit", "requery"); the first of each source counts.
    feedback: dict[str, float] = field(default_factory=dict)
    # Judged quality per tier (the shadow records' rewards).
    judged: dict[str, float] = field(default_factory=dict)


def rotated_set(path: Path) -> list[Path]:
    """`path` and its rotated siblings FILE.1, FILE.2, … (FILE.1 the newest), oldest first."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)")
    older = []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m:
                older.append((int(m.group(1)), p))
    return [p for _, p in sorted(older, reverse=True)] + ([path] if path.exists() else [])


# Lines looked at to tell a decision log from an outcome file: a log taken from a pod's output starts with the
# router's own lines (its banner, log lines) before the first record.
SNIFF_LINES = 100


def is_decision_log(path: Path) -> bool:
    """Whether the file's first JSON object (within SNIFF_LINES lines) is a decision-log record (a known `kind`)."""
    try:
        with path.open(encoding="utf-8") as f:
            for _, line in zip(range(SNIFF_LINES), f, strict=False):
                if line.lstrip().startswith("{"):
                    obj = json.loads(line)
                    return isinstance(obj, dict) and obj.get("kind") in KINDS
    except (OSError, ValueError):
        return False
    return False


def _records(paths: Sequence[str | Path]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    for given in paths:
        files = rotated_set(Path(given))
        if not files:
            raise DataError("no such decision log", path=str(given))
        for p in files:
            with p.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.lstrip().startswith("{"):
                        continue  # blank, or the router's own output in a log taken from a pod
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        # A line cut by a crash mid-write is the usual cause; one bad line must not lose a week.
                        if not line.endswith("\n"):
                            continue
                        raise DataError(f"invalid JSON: {e}", path=str(p), line=n) from e
                    if isinstance(obj, dict) and obj.get("kind") in KINDS and isinstance(obj.get("request_id"), str):
                        yield str(p), n, obj


def _number(obj: dict[str, Any], key: str) -> float | None:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def join_logs(paths: Sequence[str | Path]) -> dict[str, LoggedRequest]:
    """Every request of the logs by id, its decision, feedback and shadow records joined (in any order: a feedback
    record may come before its decision in a merged or shuffled log). Records of other kinds, and lines that are
    no records, are skipped; a later decision record for the same id replaces an earlier one (a retried write)."""
    out: dict[str, LoggedRequest] = {}
    for _path, _line, rec in _records(paths):
        rid = rec["request_id"]
        r = out.setdefault(rid, LoggedRequest(rid))
        kind = rec["kind"]
        if kind == "decision":
            r.score = _number(rec, "score")
            r.decision = rec.get("decision") if isinstance(rec.get("decision"), str) else None
            r.tier = rec.get("tier") if isinstance(rec.get("tier"), str) else None
            r.artifact = rec.get("artifact") if isinstance(rec.get("artifact"), str) else None
            r.cost_usd = _number(rec, "cost_usd")
        elif kind == "feedback":
            rating, source = _number(rec, "rating"), rec.get("source")
            if rating is not None and isinstance(source, str):
                r.feedback.setdefault(source, rating)
        else:
            # A request the router sent to the baseline is paired with the cheapest tier: `weak_tier`, `reward_weak`
            # (tiergate_router.shadow).
            pairs = (
                ("routed_tier", "reward_routed"),
                ("baseline_tier", "reward_baseline"),
                ("weak_tier", "reward_weak"),
            )
            for tier_key, reward_key in pairs:
                tier, reward = rec.get(tier_key), _number(rec, reward_key)
                if isinstance(tier, str) and reward is not None:
                    r.judged.setdefault(tier, reward)
    return out


@dataclass(frozen=True)
class LogOutcomes:
    """What a two-tier calibration reads from a log."""

    # The classifier's scores of every logged decision it made (of the chosen artifact).
    scores: npt.NDArray[np.float64]
    # The requests judged on both tiers: their scores and the weak and strong tiers' judged quality.
    pair_scores: npt.NDArray[np.float64]
    weak: npt.NDArray[np.float64]
    strong: npt.NDArray[np.float64]
    weak_tier: str
    strong_tier: str
    artifact: str | None
    # Per answering tier: (requests, explicit ratings, their mean, re-queries).
    feedback: dict[str, tuple[int, int, float | None, int]]


def two_tier_outcomes(
    requests: dict[str, LoggedRequest], tiers: tuple[str, str], artifact: str | None = None
) -> LogOutcomes:
    """The scored decisions of one artifact (`artifact`: its id as the router logs it; None: the log must hold one
    artifact's decisions only) and the pairs judged on both tiers. `tiers` names the weak and the strong tier as
    the policy does (`--weak-tier`/`--strong-tier`, else the artifact's names); when the log's decisions use other
    names, its own lowest- and highest-score decisions name them."""
    import numpy as np

    scored = [r for r in requests.values() if r.score is not None]
    ids = sorted({r.artifact or "" for r in scored})
    known = [i for i in ids if i not in UNKNOWN_ARTIFACTS]
    if artifact is not None and artifact in ids:
        scored = [r for r in scored if (r.artifact or "") == artifact]
    elif known and artifact is not None:
        # Another artifact's scores mean something else: its thresholds would be wrong for this one.
        raise DataError(
            f"the log holds no decision of artifact {artifact}, only of {', '.join(known)}: calibrate the artifact "
            "that made them (--router)"
        )
    elif len(ids) > 1:
        raise DataError(
            f"the log holds decisions of several artifacts ({', '.join(i or '-' for i in ids)}); name the one to "
            "calibrate with --router (its sha256 is what the router logs)"
        )
    if not scored:
        raise DataError("the log holds no decision with a score (forced tiers and one-tier routers log none)")
    weak, strong = tiers
    named = {r.decision for r in scored}
    if not named & {weak, strong}:
        by_score = sorted(scored, key=lambda r: r.score or 0.0)
        weak, strong = by_score[0].decision or weak, by_score[-1].decision or strong
    pairs = [r for r in scored if weak in r.judged and strong in r.judged and weak != strong]
    feedback: dict[str, tuple[int, int, float | None, int]] = {}
    for name in sorted({r.tier for r in requests.values() if r.tier is not None}):
        answered = [r for r in requests.values() if r.tier == name]
        explicit = [r.feedback["explicit"] for r in answered if "explicit" in r.feedback]
        requeried = sum(1 for r in answered if "requery" in r.feedback)
        mean = float(np.mean(explicit)) if explicit else None
        feedback[name] = (len(answered), len(explicit), mean, requeried)
    return LogOutcomes(
        scores=np.array([r.score for r in scored], dtype=np.float64),
        pair_scores=np.array([r.score for r in pairs], dtype=np.float64),
        weak=np.array([r.judged[weak] for r in pairs], dtype=np.float64),
        strong=np.array([r.judged[strong] for r in pairs], dtype=np.float64),
        weak_tier=weak,
        strong_tier=strong,
        artifact=scored[0].artifact if len(ids) == 1 else artifact,
        feedback=feedback,
    )


def log_threshold_table(data: LogOutcomes) -> CalibrationTable:
    """Two tiers, from a log: thresholds at the logged scores' percentiles (and 0 and 10000 bp), the
    strong share of every threshold over all scored decisions, and quality and PGR over the requests judged on both
    tiers (NaN at every point when none is: `has_quality` says whether the table can answer a PGR target)."""
    import numpy as np

    # `higher`: every quantile is a logged score, so each threshold sits exactly at a score some request had.
    qs = np.quantile(data.scores, np.linspace(0.0, 1.0, 101), method="higher")
    bps = sorted({threshold_bp_at(float(v)) for v in qs} | {0, BP}, reverse=True)
    judged = len(data.pair_scores) > 0
    q_w = float(data.weak.mean()) if judged else math.nan
    q_s = float(data.strong.mean()) if judged else math.nan
    gap = q_s - q_w
    points = []
    for bp in bps:
        share = float(reaches(data.scores, bp).mean())
        quality = pgr = math.nan
        if judged:
            route = reaches(data.pair_scores, bp)
            quality = float(np.where(route, data.strong, data.weak).mean())
            pgr = (quality - q_w) / gap if abs(gap) > 1e-12 else 0.0
        points.append(ThresholdPoint(threshold_bp=bp, strong_share=share, quality=quality, pgr=pgr))
    return CalibrationTable(thresholds=tuple(points))


def has_quality(table: CalibrationTable) -> bool:
    return bool(table.thresholds) and not math.isnan(table.thresholds[0].quality)


def log_set(paths: Sequence[str | Path]) -> list[str]:
    """The paths when they are all decision logs (a file, or the newest of a rotated set, whose first record has a
    known `kind`), [] when none is; a mix of logs and outcome files is refused, naming the first outcome file."""
    logs = [str(p) for p in paths if any(is_decision_log(f) for f in rotated_set(Path(p))[-1:])]
    if logs and len(logs) != len(paths):
        other = next(str(p) for p in paths if str(p) not in logs)
        raise DataError(f"--data {other}: not a decision log; give decision logs or outcome files, not both")
    return logs


def outcomes_from_logs(paths: Sequence[str | Path], models: Sequence[str]) -> OutcomeSet:
    """Training rows from decision logs (`tiergate train --data LOG --weak W --strong S`, tier names as the log
    has them): every request logged with its prompt text (`includePrompts`) and judged on both tiers by shadow
    records, its scores those judgements. A reward model's scores outside 0..1 (a logit) are mapped through the
    logistic function, for the whole log at once so that every row keeps one scale: the labels compare the two
    tiers, and the map keeps which one is better. Every row is a training row (`split` "train")."""
    import numpy as np

    from tiergate.training.data import FileProvenance, OutcomeSet

    if len(models) != 2:
        raise DataError("decision logs train two-tier routers (--weak and --strong, tier names as logged)")
    requests = join_logs(paths)
    prompts = _logged_prompts(paths)
    weak, strong = models
    rows = [r for r in requests.values() if r.request_id in prompts and weak in r.judged and strong in r.judged]
    if not rows:
        raise DataError(
            f"the logs hold no request with its prompt text judged on both {weak} and {strong} (needs "
            "decisionLog.includePrompts and shadow records)"
        )
    scores = np.array([[r.judged[weak], r.judged[strong]] for r in rows], dtype=np.float64)
    if scores.min() < 0.0 or scores.max() > 1.0:
        scores = 1.0 / (1.0 + np.exp(-scores))
    provenance = []
    for given in paths:
        for p in rotated_set(Path(given)):
            raw = p.read_bytes()
            lines = sum(1 for line in raw.splitlines() if line.strip())
            used = sum(1 for r in rows if prompts[r.request_id][0] == str(p))
            provenance.append(FileProvenance(str(p), hashlib.sha256(raw).hexdigest(), lines, used))
    return OutcomeSet(
        models=tuple(models),
        ids=[r.request_id for r in rows],
        prompts=[prompts[r.request_id][1] for r in rows],
        tasks=["" for _ in rows],
        splits=["train" for _ in rows],
        scores=scores,
        origins=[(prompts[r.request_id][0], prompts[r.request_id][2]) for r in rows],
        provenance=provenance,
    )


def _logged_prompts(paths: Sequence[str | Path]) -> dict[str, tuple[str, str, int]]:
    """request id -> (file, prompt text, line) of the decision records that carry a prompt."""
    out: dict[str, tuple[str, str, int]] = {}
    for path, line, rec in _records(paths):
        if rec["kind"] == "decision" and isinstance(rec.get("prompt"), str):
            out[rec["request_id"]] = (rec["prompt"], path, line)
    return {k: (p, text, n) for k, (text, p, n) in out.items()}
