"""A tier scaled by its HPA under load through the router, measured: one implementation for the whole loop
(`make demo-cluster`, tests/cluster/test_whole_loop.py), the metric-pipeline test and bench/hpa_scaleup.py.

The caller plays a policy's pods (a `ScaleBed`): `sync` is the kubelet's part (a model server at every Ready tier
pod's IP, none for pods gone) and `ask` one request through the router, returning the pod that answered. Clients
keep `concurrency` requests in flight on the tier until the HPA has raised the Deployment to `max_replicas` and
every new pod has answered; then the load stops and the HPA scales back to `min_replicas`. Times are seconds from
the load's start (down: from its stop), by the load generator's clock.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from tiergate.api import naming

from .cluster import DevCluster, wait_for

DEMAND_METRIC = naming.ROUTER_TIER_DEMAND_METRIC
# Seconds between two lines of the replicas-over-time report: often enough to see each step of the HPA (whose
# controller syncs every few seconds on the dev cluster), rarely enough to stay readable.
REPORT_EVERY_S = 2.0
_POLL_S = 0.3


class ScaleBed(Protocol):
    """What the scenario needs from whoever plays the policy's pods."""

    @property
    def cluster(self) -> DevCluster: ...

    @property
    def namespace(self) -> str: ...

    @property
    def policy_name(self) -> str: ...

    def sync(self) -> dict[str, str]:
        """Serve every Ready tier pod (stop the servers of pods gone); the tier pods served, name -> IP."""
        ...

    def ask(self, prompt: str, model: str) -> tuple[str, str]:
        """One request through the router: (answering tier, answering pod)."""
        ...


@dataclass(frozen=True)
class Sample:
    """One line of the replicas-over-time report."""

    t_s: float  # seconds since the load started
    phase: str  # "load" or "idle"
    replicas: int  # the Deployment's spec.replicas, as the HPA set it
    desired: int  # the HPA's status.desiredReplicas
    served: int  # the tier's Ready pods with a model server
    demand: float  # the External metric as the HPA reads it (through the API server and the adapter)


@dataclass
class ScaleResult:
    # The HPA raised the Deployment's replicas: its lastScaleTime, in whole seconds (so up to 1 s early, even below 0).
    replicas_raised_s: float
    replicas_seen_s: float  # the first poll (about every 0.3 s) that saw the Deployment's replicas raised
    first_new_pod_serving_s: float  # a request was answered by a pod the scale-up made
    all_new_pods_serving_s: float  # every pod the scale-up made has answered (seen by a poll of about 0.3 s)
    peak_replicas: int
    peak_demand: float
    peak_demand_per_pod: float  # the HPA's own reading of it per replica (status.currentMetrics)
    back_to_min_s: float
    answers_by_pod: dict[str, int]
    errors: list[str]
    timeline: list[Sample] = field(default_factory=list)


def quantity(q: str) -> float:
    """A Kubernetes quantity as the metrics APIs write it ("8", "1500m")."""
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def deployment_replicas(cluster: DevCluster, ns: str, name: str) -> int:
    return int(cluster.kubectl("get", "deployment", name, "-n", ns, "-o", "jsonpath={.spec.replicas}") or 0)


def _hpa_status(cluster: DevCluster, ns: str, name: str) -> dict[str, object]:
    hpa = json.loads(cluster.kubectl("get", "hpa", name, "-n", ns, "-o", "json", check=False) or "{}")
    status: dict[str, object] = hpa.get("status") or {}
    return status


def hpa_demand_per_pod(cluster: DevCluster, ns: str, name: str) -> float:
    metrics = _hpa_status(cluster, ns, name).get("currentMetrics") or []
    assert isinstance(metrics, list)
    for m in metrics:
        value = m.get("external", {}).get("current", {}).get("averageValue")
        if value:
            return quantity(value)
    return 0.0


def external_demand(cluster: DevCluster, ns: str, policy: str, tier: str) -> float:
    path = (
        f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{DEMAND_METRIC}"
        f"?labelSelector=routingpolicy={policy},tier={tier}"
    )
    # Not served yet (the adapter has not listed the series) reads as no demand.
    out = cluster.kubectl("get", "--raw", path, check=False)
    return sum(quantity(i["value"]) for i in json.loads(out)["items"]) if out else 0.0


def _last_scale_time(cluster: DevCluster, ns: str, name: str) -> float | None:
    stamp = str(_hpa_status(cluster, ns, name).get("lastScaleTime") or "")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else None


def run_scale_scenario(
    bed: ScaleBed,
    tier: str,
    *,
    concurrency: int,
    min_replicas: int,
    max_replicas: int,
    timeout: float = 180.0,
    report: Callable[[Sample], None] | None = None,
) -> ScaleResult:
    """Send `concurrency` requests at a time to `tier` through the router until every pod the HPA adds has answered,
    then stop and wait for the HPA to scale back to `min_replicas`. Plays the kubelet (bed.sync) throughout;
    `report` gets a Sample every REPORT_EVERY_S and at each change of phase, replicas or pods served."""
    cluster, ns = bed.cluster, bed.namespace
    name = naming.tier_name(bed.policy_name, tier)

    def sync() -> dict[str, str]:
        # The bed serves every tier's pods; this tier's are its Deployment's (named DEPLOYMENT-HASH-SUFFIX).
        return {pod: ip for pod, ip in bed.sync().items() if pod.startswith(name + "-")}

    initial = set(sync())
    answers: dict[str, int] = {}
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()
    t0, t0_wall = time.monotonic(), time.time()
    first_new: list[float] = []
    timeline: list[Sample] = []

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                _, pod = bed.ask(f"client {i} request {n}", tier)
            except OSError as e:
                with lock:
                    errors.append(f"{time.monotonic() - t0:.1f}s: {e}")
                continue
            with lock:
                answers[pod] = answers.get(pod, 0) + 1
                if pod not in initial and not first_new:
                    first_new.append(time.monotonic() - t0)

    def sample(phase: str, replicas: int, served: int, demand: float) -> None:
        desired = _hpa_status(cluster, ns, name).get("desiredReplicas") or 0
        s = Sample(round(time.monotonic() - t0, 1), phase, replicas, int(str(desired)), served, demand)
        last = timeline[-1] if timeline else None
        changed = (s.phase, s.replicas, s.served) != (last.phase, last.replicas, last.served) if last else True
        if changed or s.t_s - timeline[-1].t_s >= REPORT_EVERY_S:
            timeline.append(s)
            if report is not None:
                report(s)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    raised: list[float] = []
    seen: list[float] = []
    peak_replicas, peak_demand, peak_per_pod = [0], [0.0], [0.0]
    try:

        def all_new_serving() -> bool:
            served = sync()
            replicas = deployment_replicas(cluster, ns, name)
            if replicas > len(initial) and not seen:
                seen.append(time.monotonic() - t0)
                # When the HPA wrote the new scale (its own record, to the second), not when this poll saw it.
                scaled = _last_scale_time(cluster, ns, name)
                raised.append(scaled - t0_wall if scaled is not None else time.monotonic() - t0)
            demand = external_demand(cluster, ns, bed.policy_name, tier)
            peak_replicas[0] = max(peak_replicas[0], replicas)
            peak_demand[0] = max(peak_demand[0], demand)
            peak_per_pod[0] = max(peak_per_pod[0], hpa_demand_per_pod(cluster, ns, name))
            sample("load", replicas, len(served), demand)
            new = set(served) - initial
            with lock:
                return replicas == max_replicas and len(new) == max_replicas - len(initial) and new <= set(answers)

        wait_for(f"{name} scaled to {max_replicas} with every new pod answering", all_new_serving, timeout, _POLL_S)
        all_serving = time.monotonic() - t0
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    t_stop = time.monotonic()

    def back_to_min() -> bool:
        served = sync()
        replicas = deployment_replicas(cluster, ns, name)
        sample("idle", replicas, len(served), external_demand(cluster, ns, bed.policy_name, tier))
        return replicas == min_replicas and len(served) == min_replicas

    wait_for(f"{name} back to {min_replicas} replica(s) without load", back_to_min, timeout, _POLL_S)
    return ScaleResult(
        replicas_raised_s=raised[0] if raised else math.nan,
        replicas_seen_s=seen[0] if seen else math.nan,
        first_new_pod_serving_s=first_new[0] if first_new else math.nan,
        all_new_pods_serving_s=all_serving,
        peak_replicas=peak_replicas[0],
        peak_demand=peak_demand[0],
        peak_demand_per_pod=peak_per_pod[0],
        back_to_min_s=time.monotonic() - t_stop,
        answers_by_pod=dict(answers),
        errors=list(errors),
        timeline=timeline,
    )
