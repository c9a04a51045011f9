"""`make demo-cluster` (`python -m tiergate.devcluster demo`): the whole loop on a local control plane, narrated.

It starts a dev cluster with its pod network, installs the chart (CRD, RBAC, the operator's Deployment; kwok runs
that pod without a container, so the operator itself runs here as a process with the chart's ServiceAccount token:
exactly the permissions the chart grants it), applies a two-tier RoutingPolicy, serves every tier pod's IP with a
small OpenAI-compatible server, runs a router for every router pod, sends routed and then forced traffic, and prints
the tiers chosen and the policy's status (observed mix against the prediction, MixDrift). Beside the cluster runs the
metric pipeline (metrics.MetricsStack: Prometheus and prometheus-adapter with the chart's scrape configs and rules),
so the HPA the operator makes for the tier `small` scales it: a burst of long requests raises the routers' demand,
the demo prints the replicas over time as the HPA scales the tier up, kwok runs the new pods, the routers find them
and they answer, and then down again when the burst stops. Everything is stopped and removed on exit, Ctrl-C
included. The loop itself is `loop.WholeLoop` and `loop.scale_tier`, which the cluster test runs.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tiergate.api import naming

from . import build, metrics, netns
from .cluster import DevCluster, wait_for
from .errors import StartError
from .loop import (
    SCALE_CONCURRENCY,
    SCALE_MAX,
    SCALE_MIN,
    SCALED_TIER,
    WholeLoop,
    loop_policy,
    scale_tier,
    service_account_kubeconfig,
    wait_ready,
)
from .scaling import Sample

CHART = Path(__file__).resolve().parents[2] / "charts" / "tiergate"
RELEASE = "tiergate"
# The chart names what it makes `<release>-operator` when the release name holds the chart name.
OPERATOR_ACCOUNT = f"{RELEASE}-operator"
SYSTEM_NS = "tiergate-system"
DEMO_NS = "demo"
BAND_PP = 5

# Routed prompts: the shipped classifier decides (easy chat to the small tier, harder reasoning more likely large).
PROMPTS = (
    "hi! how are you today?",
    "What is the capital of France?",
    "Translate 'good morning' into Spanish.",
    "Give me a synonym for happy.",
    "Prove that there are infinitely many primes, then generalise the argument to primes of the form 4k+3.",
    "Derive the closed form of the sum of k^3 for k = 1..n and prove it by induction.",
    "A train leaves at 3pm at 80 km/h, another at 4pm at 120 km/h on the same track: when does the second catch "
    "up, and how far from the station? Show your reasoning step by step.",
    "Write a Python function that merges overlapping intervals and analyse its complexity.",
)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def show_status(loop: WholeLoop, say: Callable[[str], None]) -> dict[str, Any]:
    obs = loop.observed()
    w = obs.get("window") or {}
    rows = [["tier", "requests", "observed", "predicted"]]
    for tier, e in obs.items():
        if tier == "window":
            continue
        pred = e.get("predictedShareBasisPoints")
        rows.append(
            [
                tier,
                str(e["requests"]),
                f"{e['shareBasisPoints'] / 100:.1f}%",
                "-" if pred is None else f"{pred / 100:.1f}%",
            ]
        )
    say(f"status.observedMix (window {w.get('windowSeconds')} s, {w.get('routers')} routers read):\n{_table(rows)}")
    say(
        f"  fallbacks {w.get('fallbackBasisPoints', 0) / 100:.1f}% of requests, best-of-N escalations "
        f"{w.get('escalationBasisPoints', 0) / 100:.1f}%"
    )
    for type_ in ("MixDrift", "AutoscalerReady"):
        c = loop.condition(type_)
        say(f"condition {type_}={c.get('status')} ({c.get('reason')}): {c.get('message')}")
    return obs


def _sample_line(s: Sample) -> str:
    return (
        f"  {s.t_s:6.1f} s  {s.phase:4}  replicas {s.replicas} (HPA desired {s.desired}), pods serving {s.served}, "
        f"router demand {s.demand:g}"
    )


def _always(text: str) -> Callable[[int], str]:
    return lambda _i: text


def _mix_drift(loop: WholeLoop, status: str) -> dict[str, Any] | None:
    c = loop.condition("MixDrift")
    return c if c.get("status") == status else None


def run_loop(
    cluster: DevCluster, workdir: Path, say: Callable[[str], None], *, prometheus: Path, adapter: Path
) -> None:
    say(f"installing the chart {CHART} as release {RELEASE!r} in {SYSTEM_NS}")
    cluster.helm(
        "install", RELEASE, str(CHART), "--namespace", SYSTEM_NS, "--create-namespace", "--wait", "--timeout", "300s"
    )
    cluster.kubectl("create", "namespace", DEMO_NS)
    wait_for(
        "the demo namespace's default ServiceAccount",
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", DEMO_NS, "-o", "name", check=False),
        120,
    )
    creds = service_account_kubeconfig(cluster, SYSTEM_NS, OPERATOR_ACCOUNT, workdir / "operator.kubeconfig")
    say("starting the metric pipeline: Prometheus (the chart's scrape configs) and prometheus-adapter (its rules)")
    stack = metrics.MetricsStack(
        cluster,
        adapter=adapter,
        prometheus=prometheus,
        scrape_configs=metrics.chart_scrape_configs(CHART),
        adapter_rules=metrics.chart_adapter_rules(CHART),
    )
    with stack, WholeLoop(cluster, DEMO_NS, workdir / "loop", say=say, mix_report_seconds=2.0) as loop:
        say("starting the operator with the chart's ServiceAccount (its RBAC only), watching namespace demo")
        loop.start_operator(kubeconfig=creds)
        loop.apply_policy(loop_policy(router_replicas=2, band_percentage_points=BAND_PP, min_requests=50))
        say(
            f"applied RoutingPolicy demo/chat (tiers small, autoscaled by an HPA {SCALE_MIN}..{SCALE_MAX}, and large; "
            "2 router replicas); waiting for Ready"
        )
        wait_ready(loop, 180)
        loop.wait_pods(naming.COMPONENT_TIER, 3)
        for pod, ip in sorted(loop.serve_tiers().items()):
            say(f"  tier pod {pod} served at {ip}:8000")
        loop.wait_pods(naming.COMPONENT_ROUTER, 2)
        say("starting a router (tiergate serve, EndpointSlice discovery) for each router pod; loading the encoder")
        for pod, ip in sorted(loop.serve_routers().items()):
            say(f"  router pod {pod} reached at {ip}:8080")
        say(f"replicas (ready/desired): {json.dumps(loop.replicas())}")

        say("routed traffic (model 'tiergate'): the classifier chooses")
        for prompt in PROMPTS:
            (tier,) = loop.send(["tiergate"], prompt=_always(prompt))
            say(f"  {tier:6} <- {prompt[:70]}" + ("..." if len(prompt) > 70 else ""))
        pred = wait_for(
            "the routers' predicted mix in status",
            lambda: loop.observed().get("large", {}).get("predictedShareBasisPoints"),
            60,
        )
        n = 200
        large = round(n * pred / 10_000)
        say(f"load generator: {n} requests with the predicted mix ({large} forced to large, {n - large} to small)")
        loop.send(["large"] * large + ["small"] * (n - large))
        loop.wait_observed_requests(len(PROMPTS) + n)
        wait_for("MixDrift False", lambda: _mix_drift(loop, "False"), 60)
        show_status(loop, say)

        extra = 150
        say(f"pushing the mix: {extra} more requests, all to the large tier")
        loop.send(["large"] * extra)
        loop.wait_observed_requests(len(PROMPTS) + n + extra)
        wait_for("MixDrift True", lambda: _mix_drift(loop, "True"), 60)
        show_status(loop, say)

        say(
            f"burst: {SCALE_CONCURRENCY} long requests at a time to tier {SCALED_TIER} (HPA on the routers' demand, "
            f"{SCALE_MIN}..{SCALE_MAX} replicas); replicas over time, seconds from the load's start:"
        )
        result = scale_tier(loop, report=lambda s: say(_sample_line(s)))
        say(
            f"load start -> replicas raised by the HPA seen {result.replicas_seen_s:.1f} s, first new pod answering "
            f"{result.first_new_pod_serving_s:.1f} s, all {SCALE_MAX - SCALE_MIN} new pods answering "
            f"{result.all_new_pods_serving_s:.1f} s; load stop -> back to {SCALE_MIN} replicas "
            f"{result.back_to_min_s:.1f} s"
        )
        say(f"answers by pod during the burst: {json.dumps(dict(sorted(result.answers_by_pod.items())))}")
        if result.errors:
            say(f"{len(result.errors)} requests failed during the burst, first: {result.errors[0]}")
        show_status(loop, say)
        say(f"replicas (ready/desired): {json.dumps(loop.replicas())}")
        print(cluster.kubectl("get", "routingpolicy,hpa", "-n", DEMO_NS), flush=True)


def main(say: Callable[[str], None]) -> int:
    if not CHART.is_dir():
        raise StartError(f"the chart is not at {CHART}: run the demo from a checkout (make demo-cluster)")
    ok, why = netns.available()
    if not ok:
        raise StartError(f"the demo serves pod IPs from a network namespace: {why}")
    try:
        prometheus = metrics.find_prometheus()
    except StartError as e:
        raise StartError(f"the demo scales a tier with the HPA on metrics from Prometheus: {e}") from e
    # The control plane, kwok, helm and prometheus-adapter, built once from the Go module proxy and cached.
    bins = build.ensure_all()
    with tempfile.TemporaryDirectory(prefix="tiergate-demo-") as tmp:
        workdir = Path(tmp)
        with DevCluster(bins, workdir / "cluster", pod_network=True, say=say) as cluster:
            try:
                run_loop(cluster, workdir, say, prometheus=prometheus, adapter=bins["prometheus-adapter"])
            except BaseException:
                for log in sorted((workdir / "loop").glob("*.log")):
                    say(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}")
                raise
    say("demo done: cluster stopped, pod network removed")
    return 0
