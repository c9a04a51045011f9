"""The observed tier mix in the policy's status: what the routers served over a recent window, next to what their
operating point predicts, and the MixDrift condition.

Who writes it, and why the operator: the routers count (tiergate_router.metrics: requests by answering tier,
fallbacks, best-of-N escalations, and the predicted share per tier their artifact's calibration gives at the
policy's knob) and the operator reads those counters from every router pod's /metrics, as Prometheus would. A
router writing the status itself would need write access to the API (today it only reads EndpointSlices), and each
replica sees only its share of the traffic, so replicas would overwrite each other's figures. The operator already
writes the status as the lease holder, watches the router pods (their IPs come with the pod cache), and adds the
condition in the same status write as Ready and the others: no new RBAC rule at all, only a network path from the
operator to the router pods' HTTP port.

How the window is kept (`MixWindow`): each pass reads every router pod once and keeps its last sample by pod UID.
The increase since that sample is added to a ring of per-pass increases, and the window is the sum of the entries
younger than `spec.observedMix.windowSeconds`. A counter that went down, or a container whose restart count went
up, or a new start time of the router process (`tiergate_router_start_time_seconds`: it tells a restart even when
the new counters already passed the old ones), means the router restarted: its counters started again from zero,
so the whole new value is the increase (Prometheus' `increase()` does the same for a reset). A pod seen for the
first time counts from zero when it was created after the observer started (a new replica: everything it counted
is new); otherwise its first sample is only a baseline (the operator restarted: those counts belong to the past).
Several replicas simply add up.

With spec.shadow the same reads give `status.shadow` (`shadow_report`): per deciding artifact, the pairs judged,
the agreement and the estimated PGR over the window, from the routers' shadow counters (judged pairs, agreement,
and the reward gap sums the PGR divides), counted with the same window and restart rules.

All figures are integers in status: shares and rates in basis points, counts as whole requests. `mix_report` is
pure; `MixObserver` only reads pods, fetches and compares, like `external.ExternalChecks`, and a changed report
requeues a status refresh of its policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tiergate.api import naming
from tiergate.api.policy import BASIS_POINTS, RoutingPolicy

Obj = Mapping[str, Any]
PolicyKey = tuple[str, str]

MIX_DRIFT = "MixDrift"
# Reasons of MixDrift.
MIX_OUTSIDE_BAND = "MixOutsideBand"
MIX_WITHIN_BAND = "MixWithinBand"
NOT_ENOUGH_TRAFFIC = "NotEnoughTraffic"
NO_PREDICTION = "NoPrediction"
ROUTER_METRICS_UNAVAILABLE = "RouterMetricsUnavailable"

REQUESTS = "tiergate_router_requests_total"
FALLBACKS = "tiergate_router_fallbacks_total"
ESCALATIONS = "tiergate_router_best_of_n_escalations_total"
PREDICTED = "tiergate_router_predicted_share"
STARTED = "tiergate_router_start_time_seconds"
SHADOW_JUDGED = "tiergate_router_shadow_judged_total"
SHADOW_AGREEMENT = "tiergate_router_shadow_agreement_total"
SHADOW_GAP = "tiergate_router_shadow_reward_gap_total"
# Label values the router's shadow counters use (tiergate_router.shadow; the operator does not import the router).
PRIMARY = "primary"
CANARY = "canary"
PAIR_BASELINE_VS_CHEAPEST = "baseline_vs_cheapest"
# Keys of Counts.shadow: (kind, artifact, detail).
JUDGED = "judged"
AGREE = "agree"
GAP = "gap"
ShadowKey = tuple[str, str, str]
_READ = frozenset((REQUESTS, FALLBACKS, ESCALATIONS, PREDICTED, STARTED, SHADOW_JUDGED, SHADOW_AGREEMENT, SHADOW_GAP))
K = TypeVar("K")

# Prometheus' usual scrape interval: frequent enough for a window of minutes, one small GET per router pod.
DEFAULT_INTERVAL_S = 15.0
# A router answers /metrics from memory; two seconds tells a dead pod from a busy one.
DEFAULT_TIMEOUT_S = 2.0
# /metrics of a router with many tiers and tenants is tens of KiB; anything far larger is not a router.
_MAX_METRICS_BYTES = 4 * 1024 * 1024

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Counts:
    """Counter values (or their increase over a window) of one router, or of several summed."""

    served: Mapping[str, float] = field(default_factory=dict)
    """Requests answered successfully, by answering tier."""
    requests: float = 0.0
    """Requests finished, any outcome."""
    fallbacks: float = 0.0
    escalations: float = 0.0
    shadow: Mapping[ShadowKey, float] = field(default_factory=dict)
    """The shadow judging counters (judged pairs, agreement, reward gap sums: `shadow_report`), by (kind, artifact,
    detail)."""

    def minus(self, before: Counts) -> Counts | None:
        """The increase since `before`; None when any counter went down (the router restarted)."""
        served = _minus(self.served, before.served)
        shadow = _minus(self.shadow, before.shadow)
        if served is None or shadow is None:
            return None
        out = Counts(
            served,
            self.requests - before.requests,
            self.fallbacks - before.fallbacks,
            self.escalations - before.escalations,
            shadow,
        )
        if min(out.requests, out.fallbacks, out.escalations) < 0:
            return None
        return out

    def plus(self, other: Counts) -> Counts:
        return Counts(
            _plus(self.served, other.served),
            self.requests + other.requests,
            self.fallbacks + other.fallbacks,
            self.escalations + other.escalations,
            _plus(self.shadow, other.shadow),
        )


def _minus(now: Mapping[K, float], before: Mapping[K, float]) -> dict[K, float] | None:
    """Per series, the increase since `before`; None when one went down or vanished (a counter reset)."""
    gone = any(k not in now for k in before if before[k] > 0)
    out = {k: v - before.get(k, 0.0) for k, v in now.items()}
    if gone or min(out.values(), default=0.0) < 0:
        return None
    return out


def _plus(a: Mapping[K, float], b: Mapping[K, float]) -> dict[K, float]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + v
    return out


@dataclass(frozen=True)
class RouterSample:
    """What one read of a router's /metrics gave: its counters and its predicted share per tier (0..1)."""

    counts: Counts
    predicted: Mapping[str, float]
    started: float = 0.0
    """The router process's start time (0: not exported): a new one means its counters began again at zero."""


def parse_metrics(text: str) -> RouterSample:
    """The counters this module needs from Prometheus' text format (what tiergate_router.metrics renders)."""
    served: dict[str, float] = {}
    predicted: dict[str, float] = {}
    shadow: dict[ShadowKey, float] = {}
    requests = fallbacks = escalations = started = 0.0
    for line in text.splitlines():
        if not line.startswith("tiergate_router_"):
            continue  # comments, other metrics
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, raw_labels, raw_value = m.groups()
        if name not in (
            REQUESTS,
            FALLBACKS,
            ESCALATIONS,
            PREDICTED,
            STARTED,
            SHADOW_JUDGED,
            SHADOW_AGREEMENT,
            SHADOW_GAP,
        ):
            continue
        try:
            value = float(raw_value)
        except ValueError:
            continue
        labels = dict(_LABEL.findall(raw_labels or ""))
        if name == REQUESTS:
            requests += value
            if labels.get("outcome") == "success" and "tier" in labels:
                served[labels["tier"]] = served.get(labels["tier"], 0.0) + value
        elif name == FALLBACKS:
            fallbacks += value
        elif name == ESCALATIONS:
            escalations += value
        elif name == STARTED:
            started = value
        elif name in (SHADOW_JUDGED, SHADOW_AGREEMENT, SHADOW_GAP):
            key = _shadow_key(name, labels)
            if key is not None:
                shadow[key] = shadow.get(key, 0.0) + value
        elif "tier" in labels:
            predicted[labels["tier"]] = value
    return RouterSample(Counts(served, requests, fallbacks, escalations, shadow), predicted, started)


def _shadow_key(name: str, labels: Mapping[str, str]) -> ShadowKey | None:
    artifact = labels.get("artifact")
    if artifact is None:
        return None
    if name == SHADOW_JUDGED:
        return (JUDGED, artifact, labels.get("pair", ""))
    if name == SHADOW_AGREEMENT:
        return (AGREE, artifact, labels.get("agree", ""))
    return (GAP, artifact, f"{labels.get('pair', '')}/{labels.get('sign', '')}")


@dataclass(frozen=True)
class PodRead:
    """One router pod's read in a pass: `sample` None when its /metrics did not answer."""

    uid: str
    restarts: int
    fresh: bool
    """Created after the observer started: everything it counted happened while we watched."""
    sample: RouterSample | None
    error: str = ""


class MixWindow:
    """The increases of one policy's routers over the recent window (the module docstring says how)."""

    def __init__(self) -> None:
        # pod UID -> (restart count, process start time, last counters)
        self._last: dict[str, tuple[int, float, Counts]] = {}
        self._ring: deque[tuple[float, Counts]] = deque()

    def observe(self, now: float, reads: Iterable[PodRead], window_s: float) -> Counts:
        """Add one pass's reads; the sum of the increases younger than `window_s`. Pods not read this pass keep
        their last sample (a pod that did not answer once is not a restart); pods gone from the list are dropped."""
        delta = Counts()
        seen: set[str] = set()
        for r in reads:
            seen.add(r.uid)
            if r.sample is None:
                continue
            cur = r.sample.counts
            prev = self._last.get(r.uid)
            if prev is None:
                inc = cur if r.fresh else Counts()
            elif r.restarts != prev[0] or r.sample.started != prev[1]:
                inc = cur  # the router restarted: its counters started again from zero
            else:
                # None: a counter went down, a reset all the same.
                inc = cur.minus(prev[2]) or cur
            self._last[r.uid] = (r.restarts, r.sample.started, cur)
            delta = delta.plus(inc)
        for uid in [u for u in self._last if u not in seen]:
            del self._last[uid]
        self._ring.append((now, delta))
        while self._ring and self._ring[0][0] <= now - window_s:
            self._ring.popleft()
        total = Counts()
        for _, d in self._ring:
            total = total.plus(d)
        return total


@dataclass(frozen=True)
class DriftVerdict:
    status: str  # "True", "False" or "Unknown" (metav1.Condition's values)
    reason: str
    message: str


@dataclass(frozen=True)
class MixReport:
    """What one policy's status gets: `observedMix`, `observedMixWindow` and the MixDrift condition."""

    entries: tuple[tuple[tuple[str, Any], ...], ...]
    window: tuple[tuple[str, int], ...]
    drift: DriftVerdict
    shadow: tuple[tuple[tuple[str, int | str], ...], ...] | None = None
    """Per artifact, the shadow judging figures of the window (`shadow_report`); None when the policy does not
    shadow."""

    def observed_mix(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self.entries]

    def shadow_status(self) -> dict[str, Any] | None:
        """`status.shadow`, None when the policy does not shadow."""
        if self.shadow is None:
            return None
        return {"windowSeconds": dict(self.window)["windowSeconds"], "artifacts": [dict(e) for e in self.shadow]}

    def observed_mix_window(self) -> dict[str, int]:
        return dict(self.window)


def _bp(part: float, whole: float) -> int:
    return round(part * BASIS_POINTS / whole) if whole > 0 else 0


def _pct(bp: int) -> str:
    return f"{bp / 100:.1f}%"


def shadow_report(policy: RoutingPolicy, totals: Counts) -> tuple[tuple[tuple[str, int | str], ...], ...] | None:
    """Per artifact deciding (primary; canary with spec.router.canary), from the window's shadow counters: pairs
    judged, agreement (pairs where the router chose another tier than the baseline and its answer scored at least as
    high, over those pairs) and the estimated PGR (docs/router.md: the reward gaps of pairs the router sent to the
    baseline over the gaps of all judged pairs, positive minus negative series). A rate is left out while its
    denominator is not positive; None when the policy does not shadow."""
    if policy.spec.shadow is None:
        return None
    artifacts = [PRIMARY] + ([CANARY] if policy.spec.router.canary is not None else [])
    # Per artifact: judged, agree=true, agree=false, gap sum of baseline_vs_cheapest pairs, gap sum of all pairs.
    sums = {a: [0.0] * 5 for a in artifacts}
    for (kind, artifact, detail), v in totals.shadow.items():
        if artifact not in sums:
            continue
        acc = sums[artifact]
        if kind == JUDGED:
            acc[0] += v
        elif kind == AGREE:
            acc[1 if detail == "true" else 2] += v
        else:
            pair, _, sign = detail.rpartition("/")
            g = v if sign == "positive" else -v
            acc[4] += g
            if pair == PAIR_BASELINE_VS_CHEAPEST:
                acc[3] += g
    out = []
    for a in artifacts:
        judged, agree, disagree, recovered, gap = sums[a]
        e: dict[str, int | str] = {"artifact": a, "judged": round(judged)}
        if agree + disagree > 0:
            e["agreementBasisPoints"] = _bp(agree, agree + disagree)
        if gap > 0:
            e["pgrBasisPoints"] = _bp(recovered, gap)
        out.append(tuple(e.items()))
    return tuple(out)


def most_expensive_tier(policy: RoutingPolicy) -> str:
    """The tier whose price (input + output per million tokens) is highest; on a tie the later one (tiers are
    listed cheapest first, so the later is meant to be the stronger)."""
    tiers = policy.spec.tiers
    i = max(range(len(tiers)), key=lambda k: (tiers[k].price.input_per_million + tiers[k].price.output_per_million, k))
    return tiers[i].name


def mix_report(
    policy: RoutingPolicy,
    totals: Counts,
    predicted: Mapping[str, float] | None,
    routers_read: int,
    problems: Sequence[str] = (),
) -> MixReport:
    """The status figures of one policy from its window's `totals` and the routers' prediction (tier -> share of
    0..1; None or empty: none). `routers_read`: router pods that answered this pass; `problems`: why others did
    not (the condition names the first when none answered)."""
    settings = policy.spec.observed_mix
    names = [t.name for t in policy.spec.tiers]
    served_total = sum(totals.served.get(n, 0.0) for n in names)
    pred_bp = {n: round(predicted[n] * BASIS_POINTS) for n in names if predicted and n in predicted}
    entries = []
    for n in names:
        e: dict[str, Any] = {
            "tier": n,
            "shareBasisPoints": _bp(totals.served.get(n, 0.0), served_total),
            "requests": round(totals.served.get(n, 0.0)),
        }
        if n in pred_bp:
            e["predictedShareBasisPoints"] = pred_bp[n]
        entries.append(tuple(e.items()))
    requests = max(totals.requests, served_total)
    window = {
        "windowSeconds": settings.window_seconds,
        "requests": round(requests),
        "fallbackBasisPoints": _bp(totals.fallbacks, requests),
        "escalationBasisPoints": _bp(totals.escalations, requests),
        "routers": routers_read,
    }
    top = most_expensive_tier(policy)
    band = settings.drift_band_percentage_points
    observed = _bp(totals.served.get(top, 0.0), served_total)
    if routers_read == 0:
        why = problems[0] if problems else "no router pod has an IP yet"
        drift = DriftVerdict("Unknown", ROUTER_METRICS_UNAVAILABLE, f"no router's /metrics could be read: {why}")
    elif top not in pred_bp:
        drift = DriftVerdict(
            "Unknown",
            NO_PREDICTION,
            f"the routers predict no share for tier {top} (their classifier's calibration does not describe this "
            'configuration: docs/operator.md, "Observed mix")',
        )
    elif served_total < settings.min_requests:
        drift = DriftVerdict(
            "Unknown",
            NOT_ENOUGH_TRAFFIC,
            f"{round(served_total)} requests answered in the last {settings.window_seconds} s, fewer than "
            f"spec.observedMix.minRequests ({settings.min_requests})",
        )
    else:
        off = abs(observed - pred_bp[top])
        what = (
            f"tier {top} (the most expensive) answered {_pct(observed)} of {round(served_total)} requests in the "
            f"last {settings.window_seconds} s; the operating point predicts {_pct(pred_bp[top])} (band "
            f"{band} percentage points)"
        )
        if off > band * 100:
            drift = DriftVerdict("True", MIX_OUTSIDE_BAND, what)
        else:
            drift = DriftVerdict("False", MIX_WITHIN_BAND, what)
    return MixReport(tuple(entries), tuple(window.items()), drift, shadow_report(policy, totals))


def router_pods(pods: Iterable[Obj]) -> list[Obj]:
    """The policy's router pods that can be read: an IP, not terminating."""
    out = []
    for p in pods:
        md = p.get("metadata") or {}
        if (md.get("labels") or {}).get(naming.COMPONENT_LABEL) != naming.COMPONENT_ROUTER:
            continue
        if md.get("deletionTimestamp") or not (p.get("status") or {}).get("podIP"):
            continue
        out.append(p)
    return out


def restarts(pod: Obj) -> int:
    return sum(int(c.get("restartCount") or 0) for c in (pod.get("status") or {}).get("containerStatuses") or [])


def created_after(pod: Obj, wall_since: float) -> bool:
    raw = (pod.get("metadata") or {}).get("creationTimestamp")
    if not isinstance(raw, str):
        return False
    try:
        t = dt.datetime.strptime(raw, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return False
    # Creation times have one-second resolution: a pod created in the observer's first second counts as new.
    return t >= int(wall_since)


def fetch_metrics(url: str, timeout_s: float) -> str:
    """GET a router's /metrics; OSError (urllib's errors included) or ValueError when it cannot be read."""
    req = urllib.request.Request(url, headers={"Accept": "text/plain", "User-Agent": "tiergate-operator"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        body: bytes = resp.read(_MAX_METRICS_BYTES + 1)
    if len(body) > _MAX_METRICS_BYTES:
        raise ValueError(f"{url}: more than {_MAX_METRICS_BYTES} bytes")
    return body.decode("utf-8", errors="replace")


def _read(fetch: Callable[[str, float], str], url: str, timeout_s: float) -> tuple[RouterSample | None, str]:
    try:
        return parse_metrics(fetch(url, timeout_s)), ""
    except urllib.error.URLError as e:
        return None, f"GET {url}: {e.reason}"
    except (OSError, ValueError) as e:
        return None, f"GET {url}: {type(e).__name__}: {e}"


class MixObserver:
    """The last MixReport per policy, and the loop that refreshes them. `get` is called from reconcile threads."""

    def __init__(
        self,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        fetch: Callable[[str, float], str] = fetch_metrics,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._fetch = fetch
        self._clock = clock
        self.started = wall()
        self._lock = threading.Lock()
        self._reports: dict[PolicyKey, MixReport] = {}
        self._windows: dict[PolicyKey, MixWindow] = {}
        self._predicted: dict[PolicyKey, dict[str, float]] = {}

    def get(self, key: PolicyKey) -> MixReport | None:
        with self._lock:
            return self._reports.get(key)

    async def run(
        self,
        executor: Executor,
        policies: Callable[[], list[tuple[PolicyKey, RoutingPolicy]]],
        pods: Callable[[PolicyKey], Sequence[Obj]],
        on_change: Callable[[PolicyKey], None],
    ) -> None:
        """One pass every interval, forever (cancel to stop)."""
        while True:
            await self.pass_once(executor, policies(), pods, on_change)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await asyncio.Event().wait()

    async def pass_once(
        self,
        executor: Executor,
        policies: Sequence[tuple[PolicyKey, RoutingPolicy]],
        pods: Callable[[PolicyKey], Sequence[Obj]],
        on_change: Callable[[PolicyKey], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        live = {key for key, _ in policies}
        for key in [k for k in self._windows if k not in live]:
            self._windows.pop(key, None)
            self._predicted.pop(key, None)
            with self._lock:
                self._reports.pop(key, None)
        # Every router of every policy at once (bounded by `executor`): with many policies, or router pods that do
        # not answer (each read then waits out its timeout), one policy's reads must not wait behind another's.
        plan = [(key, policy, router_pods(pods(key))) for key, policy in policies]
        futures = [
            [
                loop.run_in_executor(
                    executor,
                    _read,
                    self._fetch,
                    f"http://{p['status']['podIP']}:{policy.spec.router.http_port}/metrics",
                    self.timeout_s,
                )
                for p in routers
            ]
            for _, policy, routers in plan
        ]
        for (key, policy, routers), reads_of in zip(plan, futures, strict=True):
            results = await asyncio.gather(*reads_of)
            reads = [
                PodRead(
                    str((p.get("metadata") or {}).get("uid") or (p.get("metadata") or {}).get("name")),
                    restarts(p),
                    created_after(p, self.started),
                    sample,
                    err,
                )
                for p, (sample, err) in zip(routers, results, strict=True)
            ]
            report = self.observe(key, policy, reads)
            with self._lock:
                changed = self._reports.get(key) != report
                self._reports[key] = report
            if changed:
                on_change(key)

    def observe(self, key: PolicyKey, policy: RoutingPolicy, reads: Sequence[PodRead]) -> MixReport:
        """Fold one pass's reads of a policy's routers into its window and make its report (no I/O)."""
        window = self._windows.setdefault(key, MixWindow())
        totals = window.observe(self._clock(), reads, float(policy.spec.observed_mix.window_seconds))
        answered = [r for r in reads if r.sample is not None]
        # Replicas of one policy serve one config, so they predict alike; during a rollout the newest read wins
        # (sorted by UID only to be deterministic), and with no answer the last prediction stands.
        for r in sorted(answered, key=lambda r: r.uid):
            assert r.sample is not None
            self._predicted[key] = dict(r.sample.predicted)
        problems = [r.error for r in reads if r.sample is None and r.error]
        return mix_report(policy, totals, self._predicted.get(key), len(answered), problems)
