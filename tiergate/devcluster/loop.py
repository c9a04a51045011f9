"""The whole loop on the dev cluster, one implementation for `make demo-cluster` and its cluster test:
RoutingPolicy -> operator -> tier pods (kwok) -> a small OpenAI-compatible server at each tier pod's IP -> routers
that find those pods through EndpointSlices -> traffic -> the policy's status (observedMix, MixDrift) and, with the
metric pipeline (metrics.MetricsStack) beside the cluster, the HPA the operator makes for the tier `small` scaling
it on the routers' demand (`scale_tier`).

Every part runs as its user would start it: `tiergate operator` and `tiergate serve` are subprocesses (this package
imports neither the operator nor the router, `.importlinter` says why). kwok runs pods without containers, so the
processes a real pod would run are started here instead, at the pod's address:
- each tier pod's model server: `pod_server` inside the pod network namespace, bound to the pod's IP;
- each router pod: `tiergate serve` on the host (it must reach the API server on the host's loopback), listening on
  the host end of the pod network's veth pair, and a `relay` inside the namespace that forwards the router pod's IP
  and HTTP port to it. The operator reads the router's /metrics at the pod IP as it would in a cluster, and
  clients send their requests there too.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tiergate.api import naming
from tiergate.api.policy import API_VERSION, KIND
from tiergate.routing.artifact import DEFAULT_TWO_TIER

from . import pod_server
from .cluster import DevCluster, wait_for
from .errors import StartError
from .scaling import Sample, ScaleResult, run_scale_scenario

POLICY = "chat"
ARTIFACT_CONFIGMAP = "chat-router-artifact"
ARTIFACT_KEY = "router.json"
# Requests the router decides get the answering tier in this header.
TIER_HEADER = "x-tiergate-tier"
# Loading the router's encoder takes seconds, much longer on a loaded machine.
ROUTER_START_S = 180.0

# The tier the loop autoscales (autoscaling.mode HPA on the routers' demand) and its bounds. With 2 requests per
# replica, the mix phase (MIX_CONCURRENCY requests in flight at most) keeps it at its minimum, and a burst of
# SCALE_CONCURRENCY long requests asks for the maximum.
SCALED_TIER = "small"
SCALE_MIN, SCALE_MAX = 2, 4
DEMAND_PER_REPLICA = 2
SCALE_CONCURRENCY = SCALE_MAX * DEMAND_PER_REPLICA
# The HPA scales down after this long without demand (Kubernetes' default is 5 minutes; a demo cannot wait that).
SCALE_DOWN_WINDOW_S = 5
# The pod servers hold an answer this long per token asked for: the mix phase's short answers (16 tokens) take
# 0.08 s, the burst's (BURST_TOKENS) 3 s, so the burst's requests are in flight when Prometheus scrapes the routers.
SECONDS_PER_TOKEN = 0.005
MIX_TOKENS = 16
# Requests `send` keeps in flight. SCALE_MIN replicas must cover the demand the HPA can read from them, which is more
# than MIX_CONCURRENCY: Prometheus scrapes each router at its own moment, so the sum over the routers' last samples can
# count up to MIX_CONCURRENCY per router (with 4 in flight over 2 routers, a loaded CI run had the HPA at 3 replicas
# before the burst: a sum above 4, most likely this skew; the reading itself was not captured).
MIX_CONCURRENCY = 2
BURST_TOKENS = 600


def loop_policy(
    *,
    router_replicas: int = 2,
    window_seconds: int = 600,
    band_percentage_points: int = 5,
    min_requests: int = 50,
    strong_share_bp: int = 3000,
) -> dict[str, Any]:
    """The sample's two tiers (a small model on gpu-small, autoscaled by an HPA on the routers' demand between
    SCALE_MIN and SCALE_MAX; a large one on gpu-large) and its router, without best-of-N (no reward model runs
    here). The classifier is the shipped two-tier router, given as a ConfigMap as `tiergate train` output would
    be; `strong_share_bp` is the share of traffic the policy asks for on the large tier, which the artifact's
    calibration turns into a threshold and the routers export as their prediction."""
    tier = {"engine": {"args": ["--max-model-len", "8192"]}}
    autoscaling = {
        "mode": "HPA",
        "targets": {"routerDemandPerReplica": DEMAND_PER_REPLICA},
        "behavior": {"scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": SCALE_DOWN_WINDOW_S},
    }
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": POLICY},
        "spec": {
            "tiers": [
                {
                    **tier,
                    "name": "small",
                    "model": "Qwen/Qwen2.5-7B-Instruct",
                    "servedModelName": "qwen2.5-7b",
                    "pool": "gpu-small",
                    "resources": {"gpus": 1, "cpu": "4", "memory": "24Gi"},
                    "replicas": {"min": SCALE_MIN, "max": SCALE_MAX},
                    "autoscaling": autoscaling,
                    "price": {"inputPerMillion": "0.10", "outputPerMillion": "0.30"},
                },
                {
                    **tier,
                    "name": "large",
                    "model": "Qwen/Qwen2.5-72B-Instruct",
                    "servedModelName": "qwen2.5-72b",
                    "pool": "gpu-large",
                    "resources": {"gpus": 4, "cpu": "16", "memory": "160Gi"},
                    "replicas": {"min": 1, "max": 2},
                    "price": {"inputPerMillion": "0.90", "outputPerMillion": "2.70"},
                },
            ],
            "router": {
                "replicas": router_replicas,
                "pool": "cpu",
                "classifier": {"configMap": {"name": ARTIFACT_CONFIGMAP, "key": ARTIFACT_KEY}},
                "targetStrongShareBasisPoints": strong_share_bp,
                "fallbackOrder": ["large", "small"],
                # kwok marks a new pod Ready the moment it runs, a second or so before the loop has its server
                # listening (a real pod joins its EndpointSlice only once its probe passes). The routers' tries there
                # are refused meanwhile: enough tries (and retry budget) to reach a listening pod past every new one,
                # and a 1 s breaker so that the gap does not hide a new pod for the default 5 s.
                "retries": {"attemptsPerTier": 8, "minRetryConcurrency": 64},
                "circuitBreaker": {"openSeconds": 1},
            },
            "observedMix": {
                "windowSeconds": window_seconds,
                "driftBandPercentagePoints": band_percentage_points,
                "minRequests": min_requests,
            },
        },
    }


def service_account_kubeconfig(cluster: DevCluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig at `path` that authenticates as nothing but the ServiceAccount `account` of `namespace` (a
    bound token for an hour), its context's namespace `namespace`: to run a process with exactly the RBAC a pod of
    that account would have."""
    import yaml

    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=1h").strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    entry = admin["clusters"][0]
    kc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [entry],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": entry["name"], "user": account, "namespace": namespace}}],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(kc))
    return path


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def pod_ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return (
        any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)
        and bool((pod.get("status") or {}).get("podIP"))
        and not pod["metadata"].get("deletionTimestamp")
    )


def ready_pod_ips(cluster: DevCluster, ns: str, selector: str) -> dict[str, str]:
    """Ready, not terminating pods matching the label `selector`: name -> pod IP."""
    pods = json.loads(cluster.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json"))["items"]
    return {p["metadata"]["name"]: p["status"]["podIP"] for p in pods if pod_ready(p)}


@dataclass
class Proc:
    """A process started for the loop; its output goes to `log`."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class RouterProcess:
    pod: str
    pod_ip: str
    port: int
    serve: Proc
    relay: Proc
    http_port: int


@dataclass
class WholeLoop:
    """The loop in one namespace of a running dev cluster (with its pod network). `close` stops every process it
    started; the namespace and the cluster are the caller's."""

    cluster: DevCluster
    namespace: str
    workdir: Path
    say: Callable[[str], None] = lambda _m: None
    mix_report_seconds: float = 1.0
    seconds_per_token: float = SECONDS_PER_TOKEN
    tier_servers: dict[str, Proc] = field(default_factory=dict)
    # Tiers served ahead of their pods (serve_tier_ahead): tier name -> the one server for all of its pods.
    tiers_served_ahead: dict[str, Proc] = field(default_factory=dict)
    routers: dict[str, RouterProcess] = field(default_factory=dict)
    operator: Proc | None = None
    _starts: Counter[str] = field(default_factory=Counter)
    _next_router: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def policy_name(self) -> str:
        return POLICY

    # -- processes -----------------------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        self._starts[name] += 1
        log = self.workdir / f"{name}-{self._starts[name]}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        out: IO[bytes] = log.open("wb")
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}
        )
        out.close()
        return Proc(name, proc, log)

    def _wait_ready_line(self, p: Proc, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if p.proc.poll() is not None:
                raise StartError(f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}")
            return "READY" in p.tail(200_000)

        wait_for(f"{p.name} to listen", ready, timeout, 0.1)

    @property
    def kube_env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.cluster.kubeconfig), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def start_operator(self, kubeconfig: Path | None = None) -> Proc:
        """`tiergate operator` watching this namespace, reading the routers' metrics every `mix_report_seconds`;
        `kubeconfig`: its credentials (default the cluster's admin; `service_account_kubeconfig` gives a chart's)."""
        env = {**self.kube_env, "TIERGATE_OPERATOR_MIX_REPORT_SECONDS": str(self.mix_report_seconds)}
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        self.operator = self._spawn(
            "operator", [sys.executable, "-m", "tiergate.cli", "operator", "--namespace", self.namespace], env
        )
        return self.operator

    def apply_policy(self, doc: dict[str, Any]) -> None:
        """The classifier ConfigMap (the shipped two-tier router, as `tiergate train` writes one) and the policy."""
        cm = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": ARTIFACT_CONFIGMAP},
            "data": {ARTIFACT_KEY: DEFAULT_TWO_TIER.read_text()},
        }
        for obj in (cm, doc):
            self.cluster.kubectl(
                "apply", "--server-side", "--force-conflicts", "-n", self.namespace, "-f", "-", input=json.dumps(obj)
            )

    # -- reading the cluster -------------------------------------------------------------------------------------
    def policy(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(
            self.cluster.kubectl("get", "routingpolicy", POLICY, "-n", self.namespace, "-o", "json")
        )
        return out

    def condition(self, type_: str) -> dict[str, Any]:
        for c in (self.policy().get("status") or {}).get("conditions") or []:
            if c.get("type") == type_:
                return dict(c)
        return {}

    def pods(self, component: str) -> list[dict[str, Any]]:
        sel = f"{naming.POLICY_LABEL}={POLICY},{naming.COMPONENT_LABEL}={component}"
        items: list[dict[str, Any]] = json.loads(
            self.cluster.kubectl("get", "pods", "-n", self.namespace, "-l", sel, "-o", "json")
        )["items"]
        return [p for p in items if pod_ready(p)]

    def replicas(self) -> dict[str, str]:
        """Deployment -> ready/desired replicas."""
        sel = f"{naming.POLICY_LABEL}={POLICY}"
        items = json.loads(self.cluster.kubectl("get", "deployments", "-n", self.namespace, "-l", sel, "-o", "json"))
        return {
            d["metadata"]["name"]: f"{d['status'].get('readyReplicas', 0)}/{d['spec'].get('replicas', 0)}"
            for d in items["items"]
        }

    def wait_pods(self, component: str, count: int, timeout: float = 120.0) -> list[dict[str, Any]]:
        return wait_for(
            f"{count} ready {component} pods",
            lambda: (lambda ps: ps if len(ps) >= count else None)(self.pods(component)),
            timeout,
        )

    # -- serving the pods ----------------------------------------------------------------------------------------
    def serve_tiers(self) -> dict[str, str]:
        """A model server at every ready tier pod's IP not served yet (pod name -> IP); servers of pods gone are
        stopped."""
        served = self._tier_serving()
        pods = self.pods(naming.COMPONENT_TIER)
        names = {p["metadata"]["name"] for p in pods}
        for gone in [n for n in self.tier_servers if n not in names]:
            self.tier_servers.pop(gone).stop()
        out = {}
        for p in pods:
            name, ip = p["metadata"]["name"], p["status"]["podIP"]
            out[name] = ip
            tier = p["metadata"]["labels"][naming.TIER_LABEL]
            if name in self.tier_servers or tier in self.tiers_served_ahead:
                continue
            model, port = served[tier]
            self.tier_servers[name] = self._start_pod_server(f"tier-{name}", ip, port, model, name)
        return out

    def serve_tier_ahead(self, tier: str) -> str:
        """One model server for every pod `tier` will have, started before they exist: bound to every address of
        the pod network namespace on the tier's port, so it must be a port no other tier uses (engine.port). A real
        pod joins its EndpointSlice once its readiness probe passes, so the first request after a scale-up finds a
        listening server; kwok marks a pod Ready at once, and a server started only after the pod is seen would
        leave a gap (requests refused) that only the test bed has. Its answers name the pod `<deployment>-ahead`
        (returned)."""
        model, port = self._tier_serving()[tier]
        if any(p == port for t, (_m, p) in self._tier_serving().items() if t != tier):
            raise StartError(f"tier {tier} shares port {port} with another tier: set its engine.port apart")
        pod = f"{naming.tier_name(POLICY, tier)}-ahead"
        self.tiers_served_ahead[tier] = self._start_pod_server(f"tier-{tier}-ahead", "0.0.0.0", port, model, pod)
        return pod

    def _tier_serving(self) -> dict[str, tuple[str, int]]:
        """Tier -> (the model name its server answers to, its port), from the policy."""
        return {
            t["name"]: (t.get("servedModelName") or t["name"], (t.get("engine") or {}).get("port", 8000))
            for t in self.policy()["spec"]["tiers"]
        }

    def _start_pod_server(self, name: str, host: str, port: int, model: str, pod: str) -> Proc:
        argv = [sys.executable, "-m", "tiergate.devcluster.pod_server", "--host", host, "--port", str(port)]
        argv += ["--model", model, "--pod", pod, "--seconds-per-token", str(self.seconds_per_token)]
        proc = self._spawn(name, self.cluster.netns_cmd(argv))
        self._wait_ready_line(proc)
        return proc

    def sync(self) -> dict[str, str]:
        """The kubelet's part, for scaling.run_scale_scenario: serve_tiers."""
        return self.serve_tiers()

    def _policy_file(self) -> Path:
        p = self.policy()
        doc = {
            "apiVersion": p["apiVersion"],
            "kind": p["kind"],
            "metadata": {"name": p["metadata"]["name"], "namespace": self.namespace},
            "spec": p["spec"],
        }
        path = self.workdir / "policy.json"
        path.write_text(json.dumps(doc))
        return path

    def serve_routers(self) -> dict[str, str]:
        """`tiergate serve` for every ready router pod not served yet, reached at the pod's IP (pod name -> IP)."""
        assert self.cluster.network is not None
        host = self.cluster.network.host_address()
        http_port = int(self.policy()["spec"]["router"].get("httpPort", 8080))
        artifact = self.workdir / "router.json"
        artifact.write_text(DEFAULT_TWO_TIER.read_text())
        policy_file = self._policy_file()
        out = {}
        for p in self.pods(naming.COMPONENT_ROUTER):
            name, ip = p["metadata"]["name"], p["status"]["podIP"]
            out[name] = ip
            if name in self.routers:
                continue
            port = free_port(host)
            serve = self._start_serve(name, policy_file, artifact, host, port)
            relay = self._spawn(
                f"relay-{name}",
                self.cluster.netns_cmd(
                    [
                        sys.executable,
                        "-m",
                        "tiergate.devcluster.relay",
                        "--listen",
                        f"{ip}:{http_port}",
                        "--to",
                        f"{host}:{port}",
                    ]
                ),
            )
            self._wait_ready_line(relay)
            self.routers[name] = RouterProcess(name, ip, port, serve, relay, http_port)
        return out

    def _start_serve(self, pod: str, policy_file: Path, artifact: Path, host: str, port: int) -> Proc:
        argv = [sys.executable, "-m", "tiergate.cli", "serve", "-f", str(policy_file), "--router", str(artifact)]
        argv += ["--discovery", "on", "--host", host, "--port", str(port), "--grpc-port", "-1"]
        proc = self._spawn(f"router-{pod}", argv, self.kube_env)

        def healthy() -> bool:
            if proc.proc.poll() is not None:
                raise StartError(f"router for {pod} exited with {proc.proc.returncode}:\n{proc.tail()}")
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/ready", timeout=2) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_for(f"the router of pod {pod} ready (tiers discovered)", healthy, ROUTER_START_S, 0.3)
        return proc

    def restart_router(self, pod: str) -> None:
        """Stop the router process of `pod` and start it again at the same address: its counters start from zero,
        as after a container restart."""
        r = self.routers[pod]
        r.serve.stop()
        assert self.cluster.network is not None
        artifact = self.workdir / "router.json"
        r.serve = self._start_serve(pod, self._policy_file(), artifact, self.cluster.network.host_address(), r.port)

    # -- traffic -------------------------------------------------------------------------------------------------
    def _router_urls(self) -> list[str]:
        # From what serve_routers recorded, not the policy: a load generator's every request must not wait on
        # kubectl.
        urls = [f"http://{r.pod_ip}:{r.http_port}/v1/chat/completions" for r in self.routers.values()]
        if not urls:
            raise StartError("no router is being served")
        return urls

    @staticmethod
    def _chat(url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, str]:
        """One chat request: (the answering tier, from the router's header; the answer's text)."""
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            text = json.loads(r.read())["choices"][0]["message"]["content"]
            return str(r.headers.get(TIER_HEADER)), str(text)

    def send(
        self,
        models: Iterable[str],
        prompt: Callable[[int], str] = lambda i: f"question {i}",
        max_tokens: int = MIX_TOKENS,
    ) -> Counter[str]:
        """One chat request per entry of `models` (a tier name forces that tier; `tiergate` lets the classifier
        choose), MIX_CONCURRENCY at a time, spread over the router pods' IPs as their Service would; counts the
        answering tiers."""
        urls = self._router_urls()
        jobs = list(enumerate(models))

        def one(job: tuple[int, str]) -> str:
            i, model = job
            return self._chat(urls[i % len(urls)], model, prompt(i), max_tokens)[0]

        with ThreadPoolExecutor(MIX_CONCURRENCY) as pool:
            return Counter(pool.map(one, jobs))

    def ask(self, prompt: str, model: str) -> tuple[str, str]:
        """One long request (BURST_TOKENS) through the next router: (answering tier, answering pod)."""
        urls = self._router_urls()
        tier, text = self._chat(urls[next(self._next_router) % len(urls)], model, prompt, BURST_TOKENS)
        return tier, pod_server.answering_pod(text)

    def observed(self) -> dict[str, Any]:
        """status.observedMix by tier, plus status.observedMixWindow under "window"."""
        st = self.policy().get("status") or {}
        out: dict[str, Any] = {e["tier"]: e for e in st.get("observedMix") or []}
        out["window"] = st.get("observedMixWindow") or {}
        return out

    def wait_observed_requests(self, total: int, timeout: float = 60.0) -> dict[str, Any]:
        """Until the policy's status counts `total` answered requests in its window."""

        def counted() -> dict[str, Any] | None:
            obs = self.observed()
            n = sum(e.get("requests", 0) for k, e in obs.items() if k != "window")
            return obs if n == total else None

        return wait_for(f"status.observedMix to count {total} requests", counted, timeout, 0.5)

    def close(self) -> None:
        for r in self.routers.values():
            r.relay.stop()
            r.serve.stop()
        for p in [*self.tier_servers.values(), *self.tiers_served_ahead.values()]:
            p.stop()
        if self.operator is not None:
            self.operator.stop()
        self.routers.clear()
        self.tier_servers.clear()
        self.tiers_served_ahead.clear()

    def logs(self) -> str:
        """The tails of every log, for a failure message."""
        parts = []
        for log in sorted(self.workdir.glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    def __enter__(self) -> WholeLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_ready(loop: WholeLoop, timeout: float = 120.0) -> None:
    """The policy Ready for its current generation."""

    def ready() -> bool:
        p = loop.policy()
        conds: list[dict[str, Any]] = (p.get("status") or {}).get("conditions") or []
        c = next((c for c in conds if c.get("type") == "Ready"), {})
        return c.get("status") == "True" and c.get("observedGeneration") == p["metadata"]["generation"]

    wait_for("the RoutingPolicy Ready", ready, timeout, 0.5)


def scale_tier(loop: WholeLoop, report: Callable[[Sample], None] | None = None) -> ScaleResult:
    """SCALE_CONCURRENCY long requests at a time to SCALED_TIER until its HPA has scaled it to SCALE_MAX and every
    new pod has answered, then none until it is back at SCALE_MIN (scaling.run_scale_scenario). Needs the metric
    pipeline (metrics.MetricsStack) running beside the cluster: without it the HPA has no metric and never scales."""
    name = naming.tier_name(POLICY, SCALED_TIER)
    wait_for(
        f"the operator's HPA {name}",
        lambda: loop.cluster.kubectl("get", "hpa", name, "-n", loop.namespace, "-o", "name", check=False),
        60,
    )
    return run_scale_scenario(
        loop,
        SCALED_TIER,
        concurrency=SCALE_CONCURRENCY,
        min_replicas=SCALE_MIN,
        max_replicas=SCALE_MAX,
        report=report,
    )
