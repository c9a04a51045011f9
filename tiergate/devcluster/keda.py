"""KEDA on the test bed: its own CRDs and its own operator, from KEDA's published Go module at a pinned release.

The operator's KEDA mode (spec.tiers[].autoscaling.mode KEDA) is checked against what the KEDA project ships, not
a hand-written copy: `go mod download` fetches `github.com/kedacore/keda/v2` at versions.KEDA from the Go module
proxy, verified against the checksum database like any module, and its CRDs are copied from `config/crd/bases/`
into the tiergate cache (`<cache>/keda/<version>/`), so a second run needs no network.

`KedaOperator` runs KEDA's operator (`cmd/operator`, built by build.ensure_keda_operator) against the dev cluster,
as its Deployment would in a cluster: it reconciles the ScaledObjects the tiergate operator makes, queries the
Prometheus their triggers name, scales a tier from zero to one replica when the router's demand for it turns
active and back to zero after the cooldown, and makes the HPA for one to N. That HPA reads its metrics through
KEDA's metrics API server (`cmd/adapter`), which does not run here (the test bed's external metrics API is
prometheus-adapter's), so the KEDA tests cover zero <-> one, what only KEDA's operator does.
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
from .build import _go_env, ensure_keda_operator
from .cluster import Component, DevCluster, free_port, spawn, terminate, wait_ready
from .errors import BuildError, StartError

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
    for path in paths.values():
        cluster.kubectl("apply", "--server-side", "--field-manager=tiergate-devcluster", "-f", str(path))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{crd_name(n)}" for n in paths))


def crd_name(file_name: str) -> str:
    """The CRD's name from its file's (controller-gen writes `<group>_<plural>.yaml`): `<plural>.<group>`."""
    group, plural = file_name.removesuffix(".yaml").split("_", 1)
    return f"{plural}.{group}"


class KedaOperator:
    """KEDA's operator against one started DevCluster. Use as a context manager, or start()/stop() (stop is
    idempotent). It runs with the cluster's admin kubeconfig (the test bed's stand-in for KEDA's ClusterRole), on
    loopback ports of its own, watching every namespace."""

    def __init__(self, cluster: DevCluster, *, binary: Path | None = None, workdir: Path | None = None) -> None:
        self.cluster = cluster
        self.binary = binary
        self.workdir = workdir or cluster.workdir / "keda"
        self.component: Component | None = None
        self.probe_url = ""
        self.metrics_url = ""

    def __enter__(self) -> KedaOperator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> KedaOperator:
        binary = self.binary or ensure_keda_operator()
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
        probe, metrics, grpc = free_port(), free_port(), free_port()
        self.probe_url = f"http://127.0.0.1:{probe}"
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        self.component = spawn(
            "keda-operator",
            [
                str(binary),
                f"--health-probe-bind-address=127.0.0.1:{probe}",
                f"--metrics-bind-address=127.0.0.1:{metrics}",
                f"--metrics-service-bind-address=127.0.0.1:{grpc}",
                f"--cert-dir={certs.dir}",
                f"--ca-dir={certs.dir}",
                "--leader-elect=false",
                "--zap-log-level=info",
            ],
            self.workdir,
            env={
                "KUBECONFIG": str(self.cluster.kubeconfig),
                # "": every namespace, as KEDA's chart installs it by default.
                "WATCH_NAMESPACE": "",
                "POD_NAMESPACE": NAMESPACE,
                "KEDA_CLUSTER_OBJECT_NAMESPACE": NAMESPACE,
            },
        )
        try:
            wait_ready(self.component, self._ready, _READY_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"{self.probe_url}/readyz", timeout=2) as r:
            return bool(r.status == 200)

    def log(self) -> str:
        if self.component is None:
            return ""
        return self.component.log.read_text(errors="replace")

    def stop(self) -> None:
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
