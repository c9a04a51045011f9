"""Prometheus and prometheus-adapter beside a dev cluster, so that the real HPA controller scales on real metrics.

Prometheus (Debian's `prometheus` package; the binary on PATH, or TIERGATE_PROMETHEUS) runs on loopback with the
scrape configs it is given, their Kubernetes service discovery pointed at the cluster through the admin
kubeconfig: it finds the fake pods by the labels and annotations on the Pod objects and scrapes them at their pod
IPs (reachable through the pod network namespace), exactly as in a cluster. prometheus-adapter (built by
tiergate.devcluster.build) serves the custom and external metrics APIs from it with the rules it is given, and is
registered as the APIServices `v1beta1.custom.metrics.k8s.io` and `v1beta1.external.metrics.k8s.io`.

The adapter must be reached by the API server at an address an EndpointSlice accepts (not loopback), so it runs on
the host but bound to an address of the cluster's pod slice made local to the host (PodNetwork.host_address); a
Service without selector and a hand-made EndpointSlice point at it, and the API server's aggregator routing dials
that address (no kube-proxy here). Stopping deletes the APIServices first: an unavailable aggregated API makes the
namespace controller's discovery fail, and namespaces being deleted would then hang in Terminating.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .cluster import Component, DevCluster, free_port, spawn, terminate, wait_for, wait_ready
from .errors import StartError

PROMETHEUS_ENV = "TIERGATE_PROMETHEUS"
# Scrape every second: a test that raises a tier's demand should see the HPA react within a few seconds, and the
# fake pods answer /metrics in well under a millisecond.
SCRAPE_INTERVAL_S = 1
# How often the adapter re-lists series names from Prometheus: a metric that appears (a tier's first request)
# becomes servable within this long.
ADAPTER_RELIST_S = 5
ADAPTER_NAMESPACE = "tiergate-metrics"
ADAPTER_SERVICE = "prometheus-adapter"
METRICS_GROUPS = ("custom.metrics.k8s.io", "external.metrics.k8s.io")
METRICS_VERSION = "v1beta1"
_READY_TIMEOUT_S = 120.0


def find_prometheus() -> Path:
    """The Prometheus binary: TIERGATE_PROMETHEUS, else `prometheus` on PATH (Debian's package puts it in /usr/bin)."""
    env = os.environ.get(PROMETHEUS_ENV)
    found = env or shutil.which("prometheus")
    if not found or not os.access(found, os.X_OK):
        raise StartError(
            f"no Prometheus binary ({PROMETHEUS_ENV}={env!r}, none on PATH): `apt-get install prometheus` "
            "(Debian's package, 2.42 verified), or point TIERGATE_PROMETHEUS at one"
        )
    return Path(found)


def prometheus_config(scrape_configs: list[dict[str, Any]], kubeconfig: Path) -> dict[str, Any]:
    """A Prometheus config running `scrape_configs` (the chart's, unchanged but for how Kubernetes service
    discovery reaches the API server: the kubeconfig instead of in-cluster credentials) every SCRAPE_INTERVAL_S."""
    jobs = copy.deepcopy(scrape_configs)
    for job in jobs:
        for sd in job.get("kubernetes_sd_configs", []):
            sd["kubeconfig_file"] = str(kubeconfig)
    interval = f"{SCRAPE_INTERVAL_S}s"
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": jobs,
    }


def adapter_objects(address: str, port: int) -> list[dict[str, Any]]:
    """The Namespace, Service, EndpointSlice and APIServices that put the adapter at `address:port` behind the API
    server."""
    labels = {"app.kubernetes.io/name": ADAPTER_SERVICE}
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ADAPTER_NAMESPACE}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": ADAPTER_SERVICE, "namespace": ADAPTER_NAMESPACE, "labels": labels},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": ADAPTER_SERVICE,
                "namespace": ADAPTER_NAMESPACE,
                "labels": {**labels, "kubernetes.io/service-name": ADAPTER_SERVICE},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        },
    ]
    for group in METRICS_GROUPS:
        objs.append(
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": f"{METRICS_VERSION}.{group}"},
                "spec": {
                    "group": group,
                    "version": METRICS_VERSION,
                    "service": {"namespace": ADAPTER_NAMESPACE, "name": ADAPTER_SERVICE, "port": 443},
                    # The adapter serves a self-signed certificate it makes at start (--cert-dir).
                    "insecureSkipTLSVerify": True,
                    "groupPriorityMinimum": 100,
                    "versionPriority": 100,
                },
            }
        )
    return objs


class MetricsStack:
    """Prometheus plus prometheus-adapter for one started DevCluster (with a pod network). Use as a context
    manager, or start()/stop() (stop is idempotent)."""

    def __init__(
        self,
        cluster: DevCluster,
        *,
        adapter: Path,
        scrape_configs: list[dict[str, Any]],
        adapter_rules: str,
        prometheus: Path | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.cluster = cluster
        self.adapter_bin = adapter
        self.scrape_configs = scrape_configs
        self.adapter_rules = adapter_rules
        self.prometheus_bin = prometheus
        self.workdir = workdir or cluster.workdir / "metrics"
        self.components: list[Component] = []
        self.prometheus_url = ""
        self.adapter_address: str | None = None

    def __enter__(self) -> MetricsStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> MetricsStack:
        try:
            self._start_prometheus()
            self._start_adapter()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_prometheus(self) -> None:
        binary = self.prometheus_bin or find_prometheus()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "prometheus.yaml"
        # JSON is YAML: no YAML library needed here.
        cfg.write_text(json.dumps(prometheus_config(self.scrape_configs, self.cluster.kubeconfig)))
        port = free_port()
        self.prometheus_url = f"http://127.0.0.1:{port}"
        prom = spawn(
            "prometheus",
            [
                str(binary),
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=2h",
                "--log.level=warn",
            ],
            self.workdir,
        )
        self.components.append(prom)
        wait_ready(prom, lambda: self._get(f"{self.prometheus_url}/-/ready") is not None, _READY_TIMEOUT_S)

    def _start_adapter(self) -> None:
        network = self.cluster.network
        if network is None:
            raise StartError("prometheus-adapter needs the cluster's pod network (root): the API server dials it there")
        # The slice's last address: kwok hands out pod IPs from the start of the range.
        address = str(list(ipaddress.ip_network(network.cidr).hosts())[-1])
        network.host_local_address(address)
        self.adapter_address = address
        port = free_port()
        rules = self.workdir / "adapter-rules.yaml"
        rules.write_text(self.adapter_rules)
        kc = self.cluster.kubeconfig
        adapter = spawn(
            "prometheus-adapter",
            [
                str(self.adapter_bin),
                f"--secure-port={port}",
                f"--bind-address={address}",
                f"--cert-dir={self.workdir / 'adapter-certs'}",
                f"--lister-kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                f"--prometheus-url={self.prometheus_url}/",
                f"--config={rules}",
                f"--metrics-relist-interval={ADAPTER_RELIST_S}s",
                "--v=1",
            ],
            self.workdir,
        )
        self.components.append(adapter)
        objs = adapter_objects(address, port)
        self.cluster.kubectl(
            "apply",
            "--server-side",
            "--field-manager=tiergate-devcluster",
            "-f",
            "-",
            input="\n---\n".join(json.dumps(o) for o in objs),
        )
        wait_ready(adapter, self._apiservices_available, _READY_TIMEOUT_S, "was not Available as an APIService")

    def _apiservices_available(self) -> bool:
        for group in METRICS_GROUPS:
            status = self.cluster.kubectl(
                "get",
                "apiservice",
                f"{METRICS_VERSION}.{group}",
                "-o",
                'jsonpath={.status.conditions[?(@.type=="Available")].status}',
                check=False,
            )
            if status.strip() != "True":
                return False
        return True

    def stop(self) -> None:
        if self.adapter_address is not None and self.cluster.info is not None:
            self.cluster.kubectl(
                "delete",
                "apiservice",
                *(f"{METRICS_VERSION}.{g}" for g in METRICS_GROUPS),
                "--ignore-not-found",
                check=False,
            )
            self.cluster.kubectl(
                "delete", "namespace", ADAPTER_NAMESPACE, "--wait=false", "--ignore-not-found", check=False
            )
        for comp in reversed(self.components):
            terminate(comp.proc)
        self.components.clear()
        if self.adapter_address is not None and self.cluster.network is not None:
            self.cluster.network.drop_host_local_address(self.adapter_address)
        self.adapter_address = None

    # -- what tests and tools use -----------------------------------------------------------------------------
    def _get(self, url: str) -> bytes | None:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body: bytes = r.read()
                return body if r.status == 200 else None
        except OSError:
            return None

    def api(self, path: str, **params: str) -> Any:
        """GET Prometheus' HTTP API (`/api/v1/...`) and return its `data`; raises StartError with Prometheus'
        error (a PromQL parse error names the position) on failure."""
        url = f"{self.prometheus_url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as e:
            doc = json.loads(e.read() or b"{}")
        except OSError as e:
            raise StartError(f"Prometheus at {self.prometheus_url} did not answer {path}: {e}") from e
        if doc.get("status") != "success":
            raise StartError(f"Prometheus refused {params or path}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector (a scalar comes back as one sample without labels)."""
        data = self.api("/api/v1/query", query=promql, time=f"{time.time():.3f}")
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def active_targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.api("/api/v1/targets", state="active")["activeTargets"]
        return targets

    def metrics_api(self, path: str) -> Any:
        """GET through the API server from the metrics APIs, e.g. `external.metrics.k8s.io/v1beta1/namespaces/NS/M`."""
        return json.loads(self.cluster.kubectl("get", "--raw", f"/apis/{path}"))

    def wait_for_series(self, promql: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        return wait_for(f"series for {promql}", lambda: self.query(promql), timeout=timeout, interval=0.5)
