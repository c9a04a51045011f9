"""KEDA on the test bed: its own CRDs and its own operator, from KEDA's published Go module at a pinned release.

The operator's KEDA mode (spec.tiers[].autoscaling.mode KEDA) is checked against what the KEDA project ships, not
a hand-written copy: `go mod download` fetches `github.com/kedacore/keda/v2` at versions.KEDA from the Go module
proxy, verified against the checksum database like any module, and its CRDs are copied from `config/crd/bases/`
into the tiergate cache (`<cache>/keda/<version>/`), so a second run needs no network.

`KedaOperator` runs KEDA's operator (`cmd/operator`, built by build.ensure_keda) against the dev cluster, as its
Deployment would in a cluster: it reconciles the ScaledObjects the tiergate operator makes, queries the Prometheus
their triggers name, scales a tier from zero to one replica when the router's demand for it turns active and back to
zero after the cooldown, and makes the HPA for one to N. With `metrics_server=True` it also runs KEDA's metrics API
server (`cmd/adapter`) and registers it as the external metrics API (`v1beta1.external.metrics.k8s.io`), which the
HPA KEDA makes reads: then the HPA controller scales the tier from one to N on the same trigger. Only one server can
hold that API, so it runs beside Prometheus alone (metrics.MetricsStack with adapter=None), not beside
prometheus-adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from tiergate.cache import cache_root

from . import pki, versions
from .build import _go_env, ensure_keda
from .cluster import Component, DevCluster, free_port, spawn, terminate, wait_ready
from .errors import BuildError, StartError
from .metrics import adapter_objects, apiservices_available, extension_address

KEDA_MODULE = "github.com/kedacore/keda/v2"
SCALED_OBJECT_CRD = "keda.sh_scaledobjects.yaml"
SCALED_OBJECT_CRD_NAME = "scaledobjects.keda.sh"
# Every CRD KEDA's operator watches: it will not start while one of them is missing.
CRDS = (
    SCALED_OBJECT_CRD,
    "keda.sh_scaledjobs.yaml",
    "keda.sh_triggerauthentications.yaml",
    "keda.sh_clustertriggerauthentications.yaml",
    "eventing.keda.sh_cloudeventsources.yaml",
    "eventing.keda.sh_clustercloudeventsources.yaml",
)
# KEDA's own namespace (its Helm chart's default): where it looks for the Secrets of cluster-wide objects.
NAMESPACE = "keda"
# The metrics API server's Service (its Helm chart's name) and API group, and its address (metrics.extension_address:
# the pod network's second address from the end; prometheus-adapter's is the last).
METRICS_SERVER_SERVICE = "keda-metrics-apiserver"
EXTERNAL_METRICS_GROUP = "external.metrics.k8s.io"
METRICS_SERVER_ADDRESS_FROM_END = 2
_READY_TIMEOUT_S = 120.0


def keda_crds(cache: Path | None = None, version: str = versions.KEDA) -> dict[str, Path]:
    """KEDA's CRDs at `version` by file name (CRDS), downloading the module once. Raises BuildError when the Go
    module proxy cannot be reached and nothing is cached."""
    folder = (cache or cache_root()) / "keda" / version
    if all((folder / name).is_file() for name in CRDS):
        return {name: folder / name for name in CRDS}
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="keda-") as work:
        # Outside any module (an empty folder): `go mod download MODULE@VERSION` needs no go.mod there.
        proc = subprocess.run(
            ["go", "mod", "download", "-json", f"{KEDA_MODULE}@{version}"],
            cwd=work,
            env=_go_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    if proc.returncode != 0:
        raise BuildError(f"go mod download {KEDA_MODULE}@{version} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    try:
        bases = Path(json.loads(proc.stdout)["Dir"]) / "config" / "crd" / "bases"
    except (ValueError, KeyError) as e:
        raise BuildError(
            f"go mod download {KEDA_MODULE}@{version} printed no module folder: {proc.stdout[:500]}"
        ) from e
    out = {}
    for name in CRDS:
        source = bases / name
        if not source.is_file():
            raise BuildError(f"{KEDA_MODULE}@{version} has no config/crd/bases/{name}")
        # Written under a temporary name first: an interrupted copy never leaves a file a later run would trust.
        final = folder / name
        partial = final.with_suffix(f".partial-{os.getpid()}")
        shutil.copyfile(source, partial)
        partial.replace(final)
        out[name] = final
    return out


def scaled_object_crd(cache: Path | None = None, version: str = versions.KEDA) -> Path:
    """Path of KEDA's ScaledObject CRD at `version` (see keda_crds)."""
    return keda_crds(cache, version)[SCALED_OBJECT_CRD]


def install_crds(cluster: DevCluster) -> None:
    """Apply all of KEDA's CRDs and wait until the API server serves them."""
    paths = keda_crds()
    files = [arg for path in paths.values() for arg in ("-f", str(path))]
    cluster.kubectl("apply", "--server-side", "--field-manager=tiergate-devcluster", *files)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{crd_name(n)}" for n in paths))


def crd_name(file_name: str) -> str:
    """The CRD's name from its file's (controller-gen writes `<group>_<plural>.yaml`): `<plural>.<group>`."""
    group, plural = file_name.removesuffix(".yaml").split("_", 1)
    return f"{plural}.{group}"


class KedaOperator:
    """KEDA's operator against one started DevCluster. Use as a context manager, or start()/stop() (stop is
    idempotent). It runs with the cluster's admin kubeconfig (the test bed's stand-in for KEDA's ClusterRole), on
    loopback ports of its own, watching every namespace."""

    def __init__(self, cluster: DevCluster, *, metrics_server: bool = False, workdir: Path | None = None) -> None:
        self.cluster = cluster
        self.metrics_server = metrics_server
        self.workdir = workdir or cluster.workdir / "keda"
        self.component: Component | None = None
        self.server: Component | None = None
        self.server_address: str | None = None
        self.probe_url = ""

    def __enter__(self) -> KedaOperator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> KedaOperator:
        bins = ensure_keda()
        info = self.cluster.info
        if info is None:
            raise StartError("KEDA's operator needs a started cluster")
        install_crds(self.cluster)
        if not self.cluster.kubectl("get", "namespace", NAMESPACE, "--ignore-not-found", "-o", "name").strip():
            self.cluster.kubectl("create", "namespace", NAMESPACE)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # KEDA's metrics service (gRPC, for its metrics API server) serves mutual TLS from a cert dir: a CA and a
        # pair of its own, as cert-manager or KEDA's cert rotation would mount them.
        certs = pki.make_serving_dir(self.workdir / "certs", "keda-operator")
        # Loopback ports of its own: the defaults (:8080, :8081, :9666) listen on every address and may be taken.
        probe, metrics, grpc = free_port(), free_port(), free_port()
        self.probe_url = f"http://127.0.0.1:{probe}"
        self.component = spawn(
            "keda-operator",
            [
                str(bins["keda-operator"]),
                f"--health-probe-bind-address=127.0.0.1:{probe}",
                f"--metrics-bind-address=127.0.0.1:{metrics}",
                f"--metrics-service-bind-address=127.0.0.1:{grpc}",
                f"--cert-dir={certs.dir}",
                f"--ca-dir={certs.dir}",
                "--leader-elect=false",
                "--zap-log-level=info",
            ],
            self.workdir,
            env=self._env(),
        )
        try:
            wait_ready(self.component, self._ready, _READY_TIMEOUT_S)
            if self.metrics_server:
                self._start_metrics_server(bins["keda-metrics-apiserver"], certs.dir, grpc)
        except BaseException:
            self.stop()
            raise
        return self

    def _env(self) -> dict[str, str]:
        return {
            "KUBECONFIG": str(self.cluster.kubeconfig),
            # "": every namespace, as KEDA's chart installs it by default.
            "WATCH_NAMESPACE": "",
            "POD_NAMESPACE": NAMESPACE,
            "KEDA_CLUSTER_OBJECT_NAMESPACE": NAMESPACE,
        }

    def _start_metrics_server(self, binary: Path, certs: Path, grpc_port: int) -> None:
        address = extension_address(self.cluster, METRICS_SERVER_ADDRESS_FROM_END)
        self.server_address = address
        port = free_port()
        kc = self.cluster.kubeconfig
        self.server = spawn(
            "keda-metrics-apiserver",
            [
                str(binary),
                f"--secure-port={port}",
                f"--bind-address={address}",
                # Its serving pair (made here if absent) and the mTLS pair for the operator's metrics service.
                f"--cert-dir={certs}",
                f"--lister-kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                f"--metrics-service-address=127.0.0.1:{grpc_port}",
                f"--port={free_port()}",
                "--zap-log-level=info",
            ],
            self.workdir,
            env=self._env(),
        )
        objs = adapter_objects(
            address, port, namespace=NAMESPACE, service=METRICS_SERVER_SERVICE, groups=(EXTERNAL_METRICS_GROUP,)
        )
        self.cluster.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=tiergate-devcluster",
            "-f",
            "-",
            input="\n---\n".join(json.dumps(o) for o in objs),
        )
        wait_ready(
            self.server,
            lambda: apiservices_available(self.cluster, (EXTERNAL_METRICS_GROUP,)),
            _READY_TIMEOUT_S,
            "was not Available as an APIService",
        )

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"{self.probe_url}/readyz", timeout=2) as r:
            return bool(r.status == 200)

    def log(self) -> str:
        return "\n".join(
            f"--- {c.name}\n{c.log.read_text(errors='replace')[-6000:]}" for c in (self.component, self.server) if c
        )

    def stop(self) -> None:
        if self.server is not None:
            self.cluster.kubectl(
                "delete", "apiservice", f"v1beta1.{EXTERNAL_METRICS_GROUP}", "--ignore-not-found", check=False
            )
            self.cluster.kubectl(
                "delete",
                "service,endpointslice",
                METRICS_SERVER_SERVICE,
                "-n",
                NAMESPACE,
                "--ignore-not-found",
                check=False,
            )
            terminate(self.server.proc)
            self.server = None
        if self.server_address is not None and self.cluster.network is not None:
            self.cluster.network.drop_host_local_address(self.server_address)
            self.server_address = None
        if self.component is None:
            return
        # KEDA puts its finalizer on every ScaledObject and only its running operator takes it off: a ScaledObject
        # left behind would keep its namespace Terminating for good. So every ScaledObject goes first, while KEDA
        # still runs (on the test bed they are all tests' objects); one still there after that loses the finalizer.
        if self.component.alive():
            self.cluster.kubectl(
                "delete",
                "scaledobjects.keda.sh",
                "--all",
                "--all-namespaces",
                "--wait=true",
                "--timeout=60s",
                check=False,
            )
        left = self.cluster.kubectl("get", "scaledobjects.keda.sh", "--all-namespaces", "-o", "json", check=False)
        for obj in json.loads(left or '{"items": []}')["items"]:
            meta = obj["metadata"]
            self.cluster.kubectl(
                "patch",
                "scaledobjects.keda.sh",
                meta["name"],
                "-n",
                meta["namespace"],
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )
        terminate(self.component.proc)
        self.component = None
