"""Operator benchmark: apply-to-children latency, a burst of policies, and the operator's peak memory.

    python bench/operator_bench.py                   # starts its own local control plane (tiergate.devcluster)
    KUBECONFIG=... python bench/operator_bench.py --existing   # against a cluster that already has kwok pools

Figures printed:
  1. p50/p95 over N policies applied one after another: time from the create call returning to the moment the
     last of the policy's children is seen by a watch (and, separately, to Ready=True).
  2. M policies created at once (16 client threads): time until every child of every policy exists, and until
     every policy reports Ready=True for its generation.
  3. The operator process's peak resident memory (VmHWM), read from /proc after the run.
Goal from the issue: p50 <= 1 s; 200 policies <= 30 s.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"
CRD = ROOT / "tiergate" / "api" / "crd.yaml"
NS = "tiergate-bench"
CHILDREN_PER_POLICY = 16


def bench_policy(name: str, pods: bool) -> dict[str, Any]:
    """The sample with every pod on the CPU pool and few replicas, so hundreds of policies fit the fake nodes."""
    doc: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"] = {"name": name, "namespace": NS}
    for t in doc["spec"]["tiers"]:
        t["pool"] = "cpu"
        t["resources"] = {"gpus": 0, "cpu": "10m", "memory": "16Mi"}
        t["replicas"] = {"min": 0}
    doc["spec"]["tiers"][0]["replicas"] = {"min": 1 if pods else 0}
    doc["spec"]["router"]["replicas"] = 0
    doc["spec"]["router"]["resources"] = {"cpu": "10m", "memory": "16Mi"}
    # The shipped default classifier: a classifier ConfigMap would add a GET of it and a checked copy (a 17th child)
    # per policy, and the figures in docs/operator.md were measured with 16 children.
    doc["spec"]["router"].pop("classifier", None)
    doc["spec"]["bestOfN"]["rewardModel"].update({"replicas": 0, "gpus": 0, "pool": "cpu"})
    return doc


class Seen:
    """First time each child (kind, name) and each Ready policy generation was observed, via watches."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.lock = threading.Lock()
        self.children: dict[str, dict[tuple[str, str], float]] = {}
        self.ready: dict[str, float] = {}
        self.stop = threading.Event()

    def start(self) -> None:
        from kubernetes import client

        core, apps = client.CoreV1Api(self.api), client.AppsV1Api(self.api)
        pol, rbac = client.PolicyV1Api(self.api), client.RbacAuthorizationV1Api(self.api)
        lists = {
            "Deployment": apps.list_namespaced_deployment,
            "Service": core.list_namespaced_service,
            "ConfigMap": core.list_namespaced_config_map,
            "ServiceAccount": core.list_namespaced_service_account,
            "PodDisruptionBudget": pol.list_namespaced_pod_disruption_budget,
            "Role": rbac.list_namespaced_role,
            "RoleBinding": rbac.list_namespaced_role_binding,
        }
        for kind, fn in lists.items():
            threading.Thread(target=self._watch_kind, args=(kind, fn), daemon=True).start()
        threading.Thread(target=self._watch_policies, daemon=True).start()
        time.sleep(1.0)  # let the watches establish before anything is created

    def _watch_kind(self, kind: str, fn: Any) -> None:
        from kubernetes import watch

        while not self.stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(fn, NS, label_selector="tiergate.io/policy", timeout_seconds=60):
                    if ev["type"] != "ADDED":
                        continue
                    md = ev["object"].metadata
                    policy = (md.labels or {}).get("tiergate.io/policy", "")
                    now = time.monotonic()
                    with self.lock:
                        self.children.setdefault(policy, {}).setdefault((kind, md.name), now)
            except Exception:
                time.sleep(0.2)

    def _watch_policies(self) -> None:
        from kubernetes import client, watch

        co = client.CustomObjectsApi(self.api)
        while not self.stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(
                    co.list_namespaced_custom_object,
                    "tiergate.io",
                    "v1alpha1",
                    NS,
                    "routingpolicies",
                    timeout_seconds=60,
                ):
                    obj = ev["object"]
                    gen = obj["metadata"].get("generation")
                    for c in (obj.get("status") or {}).get("conditions") or []:
                        if c["type"] == "Ready" and c["status"] == "True" and c.get("observedGeneration") == gen:
                            with self.lock:
                                self.ready.setdefault(obj["metadata"]["name"], time.monotonic())
            except Exception:
                time.sleep(0.2)

    def done_at(self, name: str) -> float | None:
        with self.lock:
            got = self.children.get(name, {})
            return max(got.values()) if len(got) >= CHILDREN_PER_POLICY else None


def wait(what: str, cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def apiserver_requests(api: Any) -> Counter[str]:
    """apiserver_request_total from the API server's /metrics, summed by "VERB resource[/subresource]"."""
    method, url, headers, _, _ = api.param_serialize("GET", "/metrics", auth_settings=["BearerToken"])
    resp = api.call_api(method, url, header_params=headers)
    counts: Counter[str] = Counter()
    for line in resp.read().decode().splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        what = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        counts[f"{labels.get('verb')} {what}"] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def run(
    kubeconfig: Path, kubectl: Path, sequential: int, burst: int, control_plane: dict[str, int] | None = None
) -> dict[str, Any]:
    """control_plane: name -> pid of the control-plane processes, whose CPU time in the burst is reported."""
    from kubernetes import client, config

    def k(*args: str, input: str | None = None) -> str:
        out = subprocess.run(
            [str(kubectl), f"--kubeconfig={kubeconfig}", *args], input=input, capture_output=True, text=True, check=True
        )
        return out.stdout

    k("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    k("wait", "--for=condition=Established", "crd/routingpolicies.tiergate.io")
    k("create", "namespace", NS)

    api = config.new_client_from_config(config_file=str(kubeconfig))
    co = client.CustomObjectsApi(api)
    seen = Seen(api)
    seen.start()

    log = Path(tempfile.mkstemp(prefix="tiergate-operator-bench-", suffix=".log")[1])
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with log.open("wb") as out:
        op = subprocess.Popen(
            [sys.executable, "-m", "tiergate.cli", "operator", "--namespace", NS],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    results: dict[str, Any] = {"operator_log": str(log)}
    try:
        time.sleep(3.0)  # operator start-up (imports, first list) is not part of the per-policy figure

        # 1. One after another.
        created_lat: list[float] = []
        ready_lat: list[float] = []
        for i in range(sequential):
            name = f"seq-{i}"
            t0 = time.monotonic()
            co.create_namespaced_custom_object(
                "tiergate.io", "v1alpha1", NS, "routingpolicies", bench_policy(name, pods=True)
            )
            t_api = time.monotonic()
            wait(f"{name} children", lambda n=name: seen.done_at(n) is not None, 60)
            wait(f"{name} ready", lambda n=name: n in seen.ready, 60)
            done = seen.done_at(name)
            assert done is not None
            created_lat.append(done - t_api)
            ready_lat.append(seen.ready[name] - t_api)
            _ = t0
        if sequential:
            results["sequential"] = {
                "n": sequential,
                "children_p50_s": statistics.median(created_lat),
                "children_p95_s": pct(created_lat, 95),
                "children_max_s": max(created_lat),
                "ready_p50_s": statistics.median(ready_lat),
                "ready_p95_s": pct(ready_lat, 95),
            }
        rss_after_seq = peak_rss_mib(op.pid)

        # 2. A burst: created at once from 16 threads.
        cpu0 = cpu_seconds(op.pid)
        cp_cpu0 = {n: cpu_seconds(pid) for n, pid in (control_plane or {}).items()}
        req0 = apiserver_requests(api)
        load0 = os.getloadavg()[0]
        names = [f"burst-{i}" for i in range(burst)]
        docs = [bench_policy(n, pods=False) for n in names]
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda d: co.create_namespaced_custom_object(
                        "tiergate.io", "v1alpha1", NS, "routingpolicies", copy.deepcopy(d)
                    ),
                    docs,
                )
            )
        t_created = time.monotonic() - t0
        wait("burst children", lambda: all(seen.done_at(n) is not None for n in names), 300)
        t_children = max(seen.done_at(n) or 0 for n in names) - t0
        cp_cpu_children = {n: cpu_seconds(pid) - cp_cpu0[n] for n, pid in (control_plane or {}).items()}
        op_cpu_children = cpu_seconds(op.pid) - cpu0
        req_children = apiserver_requests(api) - req0
        wait("burst ready", lambda: all(n in seen.ready for n in names), 400)
        t_ready = max(seen.ready[n] for n in names) - t0
        results["burst"] = {
            "n": burst,
            "create_calls_s": t_created,
            "all_children_s": t_children,
            "all_ready_s": t_ready,
            "children_objects": sum(len(seen.children.get(n, {})) for n in names),
            "operator_cpu_s": cpu_seconds(op.pid) - cpu0,
            "operator_cpu_to_children_s": op_cpu_children,
            "control_plane_cpu_to_children_s": {n: round(v, 1) for n, v in cp_cpu_children.items()},
            "control_plane_cpu_s": {
                n: round(cpu_seconds(pid) - cp_cpu0[n], 1) for n, pid in (control_plane or {}).items()
            },
            # API server requests (all clients) until every child existed, the biggest first.
            "apiserver_requests_to_children": dict(req_children.most_common(25)),
            "load_average_1m": {"start": load0, "end": os.getloadavg()[0]},
        }
        results["operator_peak_rss_mib"] = peak_rss_mib(op.pid)
        results["operator_peak_rss_after_sequential_mib"] = rss_after_seq
    finally:
        seen.stop.set()
        op.send_signal(signal.SIGTERM)
        try:
            op.wait(timeout=20)
        except subprocess.TimeoutExpired:
            op.kill()
        # The operator logs its own request counts at shutdown (whole run: sequential and burst).
        calls = [ln for ln in log.read_text(errors="replace").splitlines() if "API requests:" in ln]
        results["operator_requests"] = calls[-1].split("API requests: ", 1)[1] if calls else None
        subprocess.run(
            [str(kubectl), f"--kubeconfig={kubeconfig}", "delete", "namespace", NS, "--wait=false"], capture_output=True
        )
        api.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=50)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--existing", action="store_true", help="use KUBECONFIG instead of starting a cluster")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    if args.existing:
        from tiergate.devcluster import build

        bins = build.ensure_all()
        res = run(Path(os.environ["KUBECONFIG"]), bins["kubectl"], args.sequential, args.burst)
    else:
        from tiergate.devcluster import build
        from tiergate.devcluster.cluster import DevCluster

        bins = build.ensure_all()
        with DevCluster(bins, pod_network=False, say=lambda m: print(f"[devcluster] {m}", file=sys.stderr)) as dc:
            pids = {c.name: c.proc.pid for c in dc.components if c.name != "kwok"}
            res = run(dc.kubeconfig, bins["kubectl"], args.sequential, args.burst, pids)
    b = res["burst"]
    s = res.get("sequential")
    if s:
        print(
            f"sequential ({s['n']} policies): apply -> all {CHILDREN_PER_POLICY} children: "
            f"p50 {s['children_p50_s']:.3f} s, p95 {s['children_p95_s']:.3f} s, max {s['children_max_s']:.3f} s; "
            f"apply -> Ready=True: p50 {s['ready_p50_s']:.3f} s, p95 {s['ready_p95_s']:.3f} s"
        )
    print(
        f"burst ({b['n']} policies created at once, creates took {b['create_calls_s']:.2f} s): "
        f"all {b['children_objects']} children in {b['all_children_s']:.2f} s, all Ready in {b['all_ready_s']:.2f} s"
    )
    print(
        f"operator peak RSS: {res['operator_peak_rss_mib']:.1f} MiB "
        f"(after the sequential phase: {res['operator_peak_rss_after_sequential_mib']:.1f} MiB)"
    )
    print(f"operator log: {res['operator_log']}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
