"""The metric pipeline on the test bed: the chart's monitoring files, the PromQL they hold, and a RoutingPolicy's
pods played for real (a router in this process bound to its pod's IP, fake vLLM servers at the tier pods' IPs).

The chart's files/metrics/ is the one source: the test bed's Prometheus runs its scrape configs, the adapter its
rules, and the PromQL check reads the dashboard from there, so nothing here can drift from what ships.

The pods are the operator's shape (names from tiergate.api.naming, the same labels and scrape annotations), made
by hand so that these tests need no operator: what they check is the scraping, the adapter and the HPA controller.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.harness import LoopThread
from tests.support.procs import FakeProcess
from tiergate.api import naming
from tiergate.devcluster import metrics, scaling
from tiergate.devcluster.cluster import DevCluster
from tiergate.devcluster.loop import ready_pod_ips
from tiergate_operator.builders import _scrape_annotations
from tiergate_router.classifier import MicroBatcher
from tiergate_router.config import RouterConfig, ServiceRef, TierConfig
from tiergate_router.server import RouterServer, ServeOptions

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tiergate"
METRICS_DIR = CHART / metrics.CHART_METRICS_DIR
TIER_PORT = 8000
ROUTER_PORT = 8080
# What Grafana puts for $__rate_interval at a 1 s scrape interval and a short time range is a few seconds; 30 s
# keeps enough samples for rate() while the test's traffic lasts.
RATE_INTERVAL = "30s"
# Metrics from kube-state-metrics, which the dashboard documents as a requirement and the test bed does not run:
# their queries must parse, and return nothing here.
KSM_PREFIX = "kube_"
# The router's predicted tier mix, exported only where the classifier artifact's calibration describes the policy's
# decision (tiergate_router.config.predicted): the test bed's three tiers over a two-tier artifact have none, so its
# queries must parse and return nothing there (tests/unit/test_router_predicted_mix.py covers the series itself).
PREDICTED_SHARE = "tiergate_router_predicted_share"


def scrape_configs() -> list[dict[str, Any]]:
    return metrics.chart_scrape_configs(CHART)


def adapter_rules_text() -> str:
    return metrics.chart_adapter_rules(CHART)


def chart_stack(cluster: DevCluster) -> metrics.MetricsStack:
    """Prometheus and prometheus-adapter beside `cluster` with the chart's scrape configs and rules (not started)."""
    from tiergate.devcluster import build

    return metrics.MetricsStack(
        cluster,
        adapter=build.ensure_all()["prometheus-adapter"],
        scrape_configs=scrape_configs(),
        adapter_rules=adapter_rules_text(),
    )


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((METRICS_DIR / "dashboard.json").read_text())
    return doc


# --- PromQL extraction ------------------------------------------------------------------------------------------

_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$")


@dataclass(frozen=True)
class Expression:
    where: str  # e.g. "panel 'Cost per request' target B"
    promql: str
    # A Grafana label_values(...) variable: the label its series must carry.
    label: str | None = None

    @property
    def needs_kube_state_metrics(self) -> bool:
        return bool(re.search(rf"\b{KSM_PREFIX}\w+", self.promql))

    @property
    def needs_prediction(self) -> bool:
        return bool(re.search(rf"\b{PREDICTED_SHARE}\b", self.promql))


def dashboard_expressions(doc: dict[str, Any]) -> list[Expression]:
    """Every PromQL expression in a dashboard: each panel target's `expr`, and each query variable (Grafana's
    `label_values(SELECTOR, LABEL)` becomes the series selector, whose series must carry LABEL)."""
    out = []
    for panel in doc["panels"]:
        for t in panel.get("targets", []):
            out.append(Expression(f"panel {panel['title']!r} target {t['refId']}", t["expr"]))
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = _LABEL_VALUES.match(q.strip())
        if m is None:
            raise AssertionError(f"variable {var['name']}: not a label_values(...) query: {q!r}")
        out.append(Expression(f"variable {var['name']}", m["selector"] or '{__name__=~".+"}', m["label"]))
    return out


def render_dashboard(promql: str, namespace: str, policy: str) -> str:
    """Grafana's variables replaced by what a user viewing this policy would have selected."""
    return promql.replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", namespace).replace("$policy", policy)


def adapter_expressions(
    rules: dict[str, Any], namespace: str, policy: str, tier: str, pods: list[str]
) -> list[Expression]:
    """Each rule's seriesQuery, and its metricsQuery expanded the way prometheus-adapter expands it for the requests
    the operator's HPAs make: a Pods metric for the tier's pods (namespace and pod matchers, grouped by pod), an
    External metric with the selector {routingpolicy, tier} in the namespace."""
    out = []
    pod_re = "|".join(pods)
    for kind, matchers, group_by in (
        ("rules", f'namespace="{namespace}",pod=~"{pod_re}"', "pod"),
        ("externalRules", f'routingpolicy="{policy}",tier="{tier}",namespace="{namespace}"', ""),
    ):
        for i, rule in enumerate(rules.get(kind, [])):
            series = rule["seriesQuery"]
            name = re.match(r"[\w:]+", series)
            assert name is not None, series
            q = (
                rule["metricsQuery"]
                .replace("<<.Series>>", name.group(0))
                .replace("<<.LabelMatchers>>", matchers)
                .replace("<<.GroupBy>>", group_by)
            )
            out.append(Expression(f"{kind}[{i}] seriesQuery", series))
            out.append(Expression(f"{kind}[{i}] metricsQuery", q))
    return out


# --- a policy's pods, played for real ---------------------------------------------------------------------------


def hard_scorer(prompts: Sequence[str]) -> list[float]:
    """0.9 for prompts saying HARD, else 0.1: with thresholds (5000, 10000) the first goes to the second tier, the
    rest to the first, and nothing to a third (which only requests naming it reach)."""
    return [0.9 if "HARD" in p else 0.1 for p in prompts]


def _labels(policy: str, component: str, tier: str | None = None) -> dict[str, str]:
    labels = {
        naming.POLICY_LABEL: policy,
        naming.COMPONENT_LABEL: component,
        naming.MANAGED_BY_LABEL: naming.MANAGED_BY,
    }
    if tier is not None:
        labels[naming.TIER_LABEL] = tier
    return labels


def _deployment(name: str, labels: dict[str, str], replicas: int, port: int, pool: str) -> dict[str, Any]:
    gpu = pool != "cpu"
    pod_spec: dict[str, Any] = {
        "nodeSelector": {naming.POOL_LABEL: pool},
        "containers": [
            {
                "name": "main",
                "image": "tiergate.invalid/fake:0",
                "ports": [{"containerPort": port, "name": "http"}],
                **({"resources": {"limits": {naming.GPU_RESOURCE: "1"}}} if gpu else {}),
            }
        ],
    }
    if gpu:
        pod_spec["tolerations"] = [{"key": naming.GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    # What the operator puts on router and tier pods.
                    "annotations": _scrape_annotations(port),
                },
                "spec": pod_spec,
            },
        },
    }


def policy_objects(policy: str, tiers: dict[str, int]) -> str:
    """The router Deployment (1 replica, CPU pool), and per tier a Deployment (`tiers[name]` replicas, small GPU
    pool) with its Service, named and labelled as the operator names and labels them."""
    docs: list[dict[str, Any]] = [
        _deployment(naming.router_name(policy), _labels(policy, naming.COMPONENT_ROUTER), 1, ROUTER_PORT, "cpu")
    ]
    for tier, replicas in tiers.items():
        name = naming.tier_name(policy, tier)
        labels = _labels(policy, naming.COMPONENT_TIER, tier)
        docs.append(_deployment(name, labels, replicas, TIER_PORT, "gpu-small"))
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "labels": labels},
                "spec": {"selector": labels, "ports": [{"name": "http", "port": TIER_PORT, "targetPort": "http"}]},
            }
        )
    return "\n---\n".join(json.dumps(d) for d in docs)


@dataclass
class PolicyBed:
    """Plays a policy's pods: the router in this process at the router pod's IP (made a host address, so that the
    router reaches the API server on loopback and Prometheus scrapes it where Kubernetes says it is), and a fake
    vLLM process per Ready tier pod, bound to the pod's IP in the pod network namespace (`sync`, the kubelet's
    part). Tiers listed in `absent` get a Service-less config entry: a tier with no pods, which requests forced to
    it fall back from."""

    cluster: DevCluster
    namespace: str
    policy: str
    tiers: dict[str, int]
    k8s_api: Any
    latency_s: float = 0.0
    absent: tuple[str, ...] = ()
    # False: the operator made the objects (a RoutingPolicy applied); the bed only plays the pods.
    make_objects: bool = True
    fakes: dict[str, FakeProcess] = field(default_factory=dict)
    router_ip: str = ""
    _loop: LoopThread | None = None
    server: RouterServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> PolicyBed:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> PolicyBed:
        if self.make_objects:
            objects = policy_objects(self.policy, self.tiers)
            self.cluster.kubectl("apply", "-n", self.namespace, "-f", "-", input=objects)
        router_sel = f"{naming.POLICY_LABEL}={self.policy},{naming.COMPONENT_LABEL}={naming.COMPONENT_ROUTER}"
        from tiergate.devcluster.cluster import wait_for

        ips = wait_for("the router pod Ready", lambda: ready_pod_ips(self.cluster, self.namespace, router_sel), 120)
        self.router_ip = next(iter(ips.values()))
        assert self.cluster.network is not None
        self.cluster.network.host_local_address(self.router_ip)
        tiers = [
            TierConfig(
                name=t,
                service=ServiceRef(namespace=self.namespace, name=naming.tier_name(self.policy, t), port=TIER_PORT),
                # Prices so that the estimated-cost counter moves (dollars per million tokens).
                input_price_per_mtok=0.5 * (i + 1),
                output_price_per_mtok=1.5 * (i + 1),
                priced=True,
            )
            for i, t in enumerate([*self.tiers, *self.absent])
        ]
        thresholds = (5000, 10000)[: len(tiers) - 1]
        # kwok marks a pod Ready the moment it runs (no readiness probe), a second or two before `sync` has a server
        # listening at its IP, where a real pod joins the EndpointSlice only once its probe passes. The router's tries
        # there are refused meanwhile: enough attempts (and retry budget) to reach a listening pod past every new one,
        # and a 1 s breaker so that the gap does not hide a new pod for the default 5 s.
        cfg = RouterConfig(
            tiers=tuple(tiers),
            thresholds_bp=thresholds,
            breaker_open_s=1.0,
            max_attempts_per_tier=8,
            min_retry_concurrency=64,
        )
        self._loop = LoopThread()
        self.server = RouterServer(
            cfg,
            MicroBatcher(hard_scorer),
            ServeOptions(
                host=self.router_ip, port=ROUTER_PORT, discovery=True, kube_api_client=self.k8s_api, grace_s=1.0
            ),
        )
        self._loop.call(self.server.start())
        return self

    @property
    def policy_name(self) -> str:
        return self.policy

    def tier_selector(self, tier: str) -> str:
        return f"{naming.POLICY_LABEL}={self.policy},{naming.TIER_LABEL}={tier}"

    def sync(self) -> dict[str, str]:
        """Start a fake server for every Ready tier pod without one, kill those of pods gone; returns the tier
        pods now served, name -> IP."""
        with self._lock:
            served: dict[str, str] = {}
            for tier in self.tiers:
                served.update(ready_pod_ips(self.cluster, self.namespace, self.tier_selector(tier)))
            for pod in [p for p in self.fakes if p not in served]:
                self.fakes.pop(pod).kill()
            for pod, ip in served.items():
                if pod not in self.fakes:
                    self.fakes[pod] = FakeProcess(
                        f"{pod}-model",
                        name=pod,
                        host=ip,
                        port=TIER_PORT,
                        latency_s=self.latency_s,
                        prefix=self.cluster.netns_cmd([]),
                    )
            return served

    def endpoints(self, tier: str) -> set[str]:
        assert self.server is not None
        return {ep.base_url for ep in self.server.router.dispatcher.pools[tier].endpoints}

    def ask(self, prompt: str, model: str = "tiergate", timeout: float = 60.0) -> tuple[str, str]:
        """One chat request through the router: (answering tier, the pod that generated the answer)."""
        req = urllib.request.Request(
            f"http://{self.router_ip}:{ROUTER_PORT}/v1/chat/completions",
            data=json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            tier = r.headers["x-tiergate-tier"]
            text = json.loads(r.read())["choices"][0]["message"]["content"]
        # The fake tags its text with its --name (the pod), as in "POD-tok0 ...".
        return tier, text.split("-tok")[0]

    def stop(self) -> None:
        if self.server is not None and self._loop is not None:
            self._loop.call(self.server.stop())
            self._loop.close()
        self.server = None
        for p in self.fakes.values():
            p.kill()
        self.fakes.clear()
        if self.router_ip and self.cluster.network is not None:
            self.cluster.network.drop_host_local_address(self.router_ip)


# --- autoscaling a tier on the router's demand ------------------------------------------------------------------

DEMAND_METRIC = scaling.DEMAND_METRIC


def hpa_object(policy: str, tier: str, *, average_demand: int, min_replicas: int, max_replicas: int) -> dict[str, Any]:
    """An autoscaling/v2 HPA on the tier's Deployment in the shape the operator's HPA mode makes: the External metric
    tiergate_router_tier_demand selected by {routingpolicy, tier}, an AverageValue target. Behaviour: scale up at
    once, down after 5 s of lower demand (the test bed's short windows; production keeps Kubernetes' defaults)."""
    name = naming.tier_name(policy, tier)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": _labels(policy, naming.COMPONENT_TIER, tier)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {
                            "name": DEMAND_METRIC,
                            "selector": {"matchLabels": {"routingpolicy": policy, "tier": tier}},
                        },
                        "target": {"type": "AverageValue", "averageValue": str(average_demand)},
                    },
                }
            ],
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Percent", "value": 400, "periodSeconds": 1}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": 5,
                    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 1}],
                },
            },
        },
    }
