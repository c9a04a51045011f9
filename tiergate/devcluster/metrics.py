"""Prometheus and prometheus-adapter beside a dev cluster, so that the real HPA controller scales on real metrics.

Prometheus (Debian's `prometheus` package; the binary on PATH, or TIERGATE_PROMETHEUS) runs on loopback with the
scrape configs it is given and scrapes the fake pods at their pod IPs (reachable through the pod network
namespace). Debian builds Prometheus without its Kubernetes service discovery, so the scrape configs' `role: pod`
discovery is played here: a thread lists the cluster's Pods every second and writes what Kubernetes SD would make
of them (one target per declared container port, with the same `__meta_kubernetes_*` labels) to a file_sd file.
The scrape configs' relabel_configs then run unchanged, and targets follow pods as the HPA adds and removes them.

prometheus-adapter (built by tiergate.devcluster.build) serves the custom and external metrics APIs from Prometheus
with the rules it is given, registered as the APIServices `v1beta1.custom.metrics.k8s.io` and
`v1beta1.external.metrics.k8s.io`. The API server must reach it at an address an EndpointSlice accepts (not
loopback), so it runs on the host but bound to an address of the cluster's pod slice made local to the host
(PodNetwork.host_address); a Service without selector and a hand-made EndpointSlice point at it, and the API
server's aggregator routing dials that address (no kube-proxy here). Stopping deletes the APIServices first: an
unavailable aggregated API makes the namespace controller's discovery fail, and namespaces being deleted would then
hang in Terminating.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import os
import re
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from . import pki
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
# Where prometheus-adapter listens: the pod network's last address (extension_address).
ADAPTER_ADDRESS_FROM_END = 1
_READY_TIMEOUT_S = 120.0
# Where the chart keeps what the metric pipeline runs (scrape configs, adapter rules, dashboard): the one source the
# chart ships and the test bed runs.
CHART_METRICS_DIR = Path("files") / "metrics"


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


def chart_scrape_configs(chart: Path) -> list[dict[str, Any]]:
    """The chart's Prometheus scrape configs (a YAML list of jobs)."""
    import yaml

    jobs: list[dict[str, Any]] = yaml.safe_load((chart / CHART_METRICS_DIR / "scrape-configs.yaml").read_text())
    return jobs


def chart_adapter_rules(chart: Path) -> str:
    """The chart's prometheus-adapter rules, as the adapter's config file."""
    return (chart / CHART_METRICS_DIR / "prometheus-adapter-rules.yaml").read_text()


def prometheus_config(scrape_configs: list[dict[str, Any]], targets_file: Path) -> dict[str, Any]:
    """A Prometheus config running `scrape_configs` (the chart's) every SCRAPE_INTERVAL_S, their Kubernetes pod
    discovery replaced by the file `targets_file` that PodDiscovery keeps up to date; relabel_configs unchanged."""
    jobs = copy.deepcopy(scrape_configs)
    for job in jobs:
        sds = job.pop("kubernetes_sd_configs", [])
        if any(sd.get("role") != "pod" for sd in sds):
            raise StartError(f"scrape job {job.get('job_name')!r}: the test bed plays only `role: pod` discovery")
        if sds:
            job["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": f"{SCRAPE_INTERVAL_S}s"}]
    interval = f"{SCRAPE_INTERVAL_S}s"
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": jobs,
    }


def _label_name(key: str) -> str:
    """Prometheus' sanitising of a Kubernetes label or annotation key into a label name."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def pod_targets(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What Prometheus' Kubernetes service discovery (role: pod) makes of these Pod objects, as file_sd target
    groups: per declared container port a target `podIP:port` (a container without ports: `podIP`), labelled with
    the pod's `__meta_kubernetes_*` labels. Pods without an IP yet have nothing to scrape and are left out."""
    groups = []
    for pod in pods:
        meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
        ip = status.get("podIP")
        if not ip:
            continue
        ready = next((c["status"] for c in status.get("conditions", []) if c["type"] == "Ready"), "unknown")
        common = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_uid": meta.get("uid", ""),
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_node_name": spec.get("nodeName", ""),
            "__meta_kubernetes_pod_host_ip": status.get("hostIP", ""),
            "__meta_kubernetes_pod_phase": status.get("phase", ""),
            "__meta_kubernetes_pod_ready": ready.lower(),
        }
        for kind, items in (("label", meta.get("labels") or {}), ("annotation", meta.get("annotations") or {})):
            for key, value in items.items():
                common[f"__meta_kubernetes_pod_{kind}_{_label_name(key)}"] = value
                common[f"__meta_kubernetes_pod_{kind}present_{_label_name(key)}"] = "true"
        for c in spec.get("containers", []):
            base = {**common, "__meta_kubernetes_pod_container_name": c["name"]}
            for port in c.get("ports") or [{}]:
                labels = dict(base)
                address = ip
                if port:
                    address = f"{ip}:{port['containerPort']}"
                    labels["__meta_kubernetes_pod_container_port_name"] = port.get("name", "")
                    labels["__meta_kubernetes_pod_container_port_number"] = str(port["containerPort"])
                    labels["__meta_kubernetes_pod_container_port_protocol"] = port.get("protocol", "TCP")
                groups.append({"targets": [address], "labels": labels})
    return groups


class PodDiscovery:
    """Keeps `path` (a file_sd file) equal to pod_targets() of the cluster's Pods, every SCRAPE_INTERVAL_S, in a
    thread. Reads the API with the admin client certificate (no kubectl process per second)."""

    def __init__(self, server: str, creds: pki.Pki, path: Path) -> None:
        self.url = f"{server}/api/v1/pods"
        self.path = path
        self.ctx = ssl.create_default_context(cafile=str(creds.ca_crt))
        self.ctx.load_cert_chain(str(creds.crt("admin")), str(creds.key("admin")))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-discovery", daemon=True)
        self._last = ""

    def refresh(self) -> None:
        with urllib.request.urlopen(self.url, context=self.ctx, timeout=10) as r:
            pods = json.loads(r.read())["items"]
        text = json.dumps(pod_targets(pods), sort_keys=True)
        if text != self._last:
            # Written whole and renamed: Prometheus never reads half a file.
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)
            self._last = text

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_INTERVAL_S):
            # A failed listing (the API server restarting) keeps the last targets, as Kubernetes SD does.
            with contextlib.suppress(OSError, ValueError):
                self.refresh()

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)


def adapter_objects(
    address: str,
    port: int,
    *,
    namespace: str = ADAPTER_NAMESPACE,
    service: str = ADAPTER_SERVICE,
    groups: tuple[str, ...] = METRICS_GROUPS,
) -> list[dict[str, Any]]:
    """The Namespace, Service, EndpointSlice and APIServices (one per metrics API group) that put an extension API
    server at `address:port` behind the API server: prometheus-adapter by default, KEDA's metrics API server too."""
    labels = {"app.kubernetes.io/name": service}
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service, "namespace": namespace, "labels": labels},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": service,
                "namespace": namespace,
                "labels": {**labels, "kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        },
    ]
    for group in groups:
        objs.append(
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": f"{METRICS_VERSION}.{group}"},
                "spec": {
                    "group": group,
                    "version": METRICS_VERSION,
                    "service": {"namespace": namespace, "name": service, "port": 443},
                    # The server's certificate is self-signed or from a CA of the test bed's own (--cert-dir).
                    "insecureSkipTLSVerify": True,
                    "groupPriorityMinimum": 100,
                    "versionPriority": 100,
                },
            }
        )
    return objs


def apiservices_available(cluster: DevCluster, groups: tuple[str, ...] = METRICS_GROUPS) -> bool:
    """Whether the API server reports the metrics APIServices of `groups` Available (it reached their server)."""
    for group in groups:
        status = cluster.kubectl(
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


def extension_address(cluster: DevCluster, from_end: int) -> str:
    """An address for an extension API server that the API server dials: the pod network's `from_end`-th address
    from the end (kwok hands out pod IPs from the start of the range), added to the host's end of the network."""
    network = cluster.network
    if network is None:
        raise StartError("an extension API server needs the pod network (root): the API server dials it there")
    address = str(list(ipaddress.ip_network(network.cidr).hosts())[-from_end])
    network.host_local_address(address)
    return address


class MetricsStack:
    """Prometheus plus prometheus-adapter for one started DevCluster (with a pod network); Prometheus alone with
    `adapter=None` (where another server, KEDA's, serves the external metrics API). Use as a context manager, or
    start()/stop() (stop is idempotent)."""

    def __init__(
        self,
        cluster: DevCluster,
        *,
        adapter: Path | None,
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
        self.discovery: PodDiscovery | None = None

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
        info = self.cluster.info
        if info is None or info.external:
            raise StartError("the metric pipeline runs beside a control plane of our own (it reads the pods as admin)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        targets = self.workdir / "pod-targets.json"
        self.discovery = PodDiscovery(info.server, pki.Pki(info.workdir / "pki"), targets)
        self.discovery.start()
        cfg = self.workdir / "prometheus.yaml"
        # JSON is YAML: no YAML library needed here.
        cfg.write_text(json.dumps(prometheus_config(self.scrape_configs, targets)))
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
        if self.adapter_bin is None:
            return
        address = extension_address(self.cluster, ADAPTER_ADDRESS_FROM_END)
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
        wait_ready(
            adapter, lambda: apiservices_available(self.cluster), _READY_TIMEOUT_S, "was not Available as an APIService"
        )

    def stop(self) -> None:
        if self.adapter_address is not None and self.cluster.info is not None:
            self.cluster.kubectl(
                "delete",
                "apiservice",
                *(f"{METRICS_VERSION}.{g}" for g in METRICS_GROUPS),
                "--ignore-not-found",
                check=False,
            )
            # Waited for: a stack started right after this one (the next test module's) would otherwise apply its
            # Service into the namespace still being deleted, and lose it when the deletion ends.
            self.cluster.kubectl(
                "delete",
                "namespace",
                ADAPTER_NAMESPACE,
                "--wait=true",
                "--timeout=120s",
                "--ignore-not-found",
                check=False,
            )
        for comp in reversed(self.components):
            terminate(comp.proc)
        self.components.clear()
        if self.discovery is not None:
            self.discovery.stop()
            self.discovery = None
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
