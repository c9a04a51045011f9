"""Start and stop a real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, and kwok playing the kubelets of fake CPU and GPU nodes.

Everything listens on 127.0.0.1 on random free ports with TLS and RBAC, so several clusters (or a CI run beside
a developer's cluster) never collide. Each component logs to its own file; a component that dies or never gets
ready fails the start with its log tail instead of hanging.

The same class can instead drive a cluster someone else runs (kind on a laptop, a cloud cluster): then only kwok
is started against it, to register the fake node pools, and the caller's KUBECONFIG is used as is.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from . import netns, nodes, pki
from .errors import StartError

# Generous, because the first start after a cold build on 2 loaded cores is slow; a warm start takes ~9 s.
READY_TIMEOUT_S = 120.0
_STOP_GRACE_S = 10.0
# How often the HPA controller re-reads metrics and rescales. Kubernetes' default is 15 s; a test bed that proves
# scale-up and scale-down within a test wants it shorter, and 3 s still leaves the controller idle most of the time.
HPA_SYNC_PERIOD_S = 3
_LOG_TAIL_LINES = 30


T = TypeVar("T")

# The API server's audit policy: who changed what, as tests need to prove (e.g. that only the operator replica
# holding the lease writes). Writes only, and not the control plane's own chatter (node heartbeats, the
# controllers' service accounts), so the log stays small over a whole test session; Lease writes carry their
# body (the holder) so that a test can rebuild who held a lease when.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: None
    namespaces: ["kube-node-lease", "kube-system"]
  - level: None
    userGroups: ["system:serviceaccounts:kube-system", "system:nodes"]
  - level: None
    users: ["system:kube-controller-manager", "system:kube-scheduler", "system:apiserver"]
  - level: None
    resources: [{group: "", resources: ["nodes", "nodes/status", "pods/status"]}]
  - level: Request
    verbs: ["create", "update", "patch"]
    resources: [{group: "coordination.k8s.io", resources: ["leases"]}]
  - level: Metadata
    verbs: ["create", "update", "patch", "delete", "deletecollection"]
  - level: None
"""


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.3) -> T:
    """Poll `fn` until it returns something truthy and return that; on timeout raise naming `what` and the last
    value seen, so a failing cluster test says what it was waiting for instead of just "timed out"."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # PR_SET_PDEATHSIG: if the test process is killed outright, its control plane goes with it.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Component:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def failure(self, what: str) -> StartError:
        status = "running" if self.alive() else f"exited with {self.proc.returncode}"
        return StartError(f"{self.name} {what} ({status}); last lines of {self.log}:\n{log_tail(self.log)}")


def spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> Component:
    """Start one component logging to `workdir/logs/NAME.log`, in its own process group, killed with its parent;
    `env` adds to (or overrides) this process's environment."""
    log = workdir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    out: IO[bytes] = log.open("ab")
    try:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env=None if env is None else {**os.environ, **env},
            start_new_session=True,  # its own process group, so a Ctrl-C in a terminal reaches only us
            preexec_fn=_die_with_parent,
        )
    finally:
        out.close()
    return Component(name, proc, log)


def wait_ready(comp: Component, check: Callable[[], bool], timeout: float, what: str = "did not become ready") -> None:
    """Poll `check` until true; a component that dies or never gets ready raises StartError with its log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not comp.alive():
            raise comp.failure("died during start")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ssl.SSLError, subprocess.SubprocessError):
            pass
        time.sleep(0.2)
    raise comp.failure(f"{what} within {timeout:.0f}s")


@dataclass
class ClusterInfo:
    """What a started cluster exposes to tools and tests; also written to `state.json` for `dev-cluster down`."""

    workdir: Path
    kubeconfig: Path
    server: str
    owner_pid: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    pod_netns: str | None = None
    pod_cidr: str = netns.POD_CIDR
    external: bool = False

    def to_json(self) -> str:
        return json.dumps(
            {
                "workdir": str(self.workdir),
                "kubeconfig": str(self.kubeconfig),
                "server": self.server,
                "owner_pid": self.owner_pid,
                "pids": self.pids,
                "pod_netns": self.pod_netns,
                "pod_cidr": self.pod_cidr,
                "external": self.external,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> ClusterInfo:
        d = json.loads(text)
        return cls(
            workdir=Path(d["workdir"]),
            kubeconfig=Path(d["kubeconfig"]),
            server=d["server"],
            owner_pid=int(d["owner_pid"]),
            pids={k: int(v) for k, v in d["pids"].items()},
            pod_netns=d["pod_netns"],
            pod_cidr=d["pod_cidr"],
            external=bool(d["external"]),
        )


class DevCluster:
    """One control plane. Use as a context manager, or call start()/stop() (stop is idempotent)."""

    def __init__(
        self,
        bins: dict[str, Path],
        workdir: Path | None = None,
        *,
        pod_network: bool = True,
        external_kubeconfig: Path | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        node_prefix: str = nodes.DEFAULT_PREFIX,
        kwok_owner: str = nodes.DEFAULT_OWNER,
        say: Callable[[str], None] = lambda _m: None,
        hpa_sync_period_s: int = HPA_SYNC_PERIOD_S,
    ) -> None:
        self.bins = bins
        self.hpa_sync_period_s = hpa_sync_period_s
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="tiergate-cluster-"))
        self.want_pod_network = pod_network
        self.external_kubeconfig = external_kubeconfig
        self.say = say
        self.ready_timeout = ready_timeout
        self.node_prefix = node_prefix
        self.kwok_owner = kwok_owner
        self.components: list[Component] = []
        self.network: netns.PodNetwork | None = None
        self.info: ClusterInfo | None = None
        self._nodes_registered = False

    # -- process plumbing -------------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> Component:
        comp = spawn(name, argv, self.workdir)
        self.components.append(comp)
        return comp

    def _wait(
        self,
        comp: Component,
        check: Callable[[], bool],
        what: str = "did not become ready",
        timeout: float | None = None,
    ) -> None:
        wait_ready(comp, check, self.ready_timeout if timeout is None else timeout, what)

    def _https_ok(self, url: str, creds: pki.Pki | None) -> bool:
        ctx = ssl.create_default_context(cafile=str(creds.ca_crt)) if creds else ssl._create_unverified_context()
        if creds:
            ctx.load_cert_chain(str(creds.crt("admin")), str(creds.key("admin")))
        with urllib.request.urlopen(url, context=ctx, timeout=2) as r:
            return bool(r.status == 200)

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> ClusterInfo:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> ClusterInfo:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.external_kubeconfig is not None:
            kubeconfig = self.external_kubeconfig
            server = self.kubectl(
                "config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}", kubeconfig=kubeconfig
            ).strip()
        else:
            kubeconfig, server = self._start_control_plane()
        self.info = ClusterInfo(
            workdir=self.workdir,
            kubeconfig=kubeconfig,
            server=server,
            owner_pid=os.getpid(),
            external=self.external_kubeconfig is not None,
        )
        if self.want_pod_network:
            self.network = netns.create()
            self.info.pod_netns = self.network.name
            self.info.pod_cidr = self.network.cidr
        self._start_kwok(kubeconfig)
        self._register_nodes()
        self.info.pids = {c.name: c.proc.pid for c in self.components}
        (self.workdir / "state.json").write_text(self.info.to_json())
        self.say(f"cluster ready in {time.monotonic() - t0:.1f}s; KUBECONFIG={kubeconfig}")
        return self.info

    def _start_control_plane(self) -> tuple[Path, str]:
        b = self.bins
        creds = pki.make_pki(self.workdir / "pki")
        etcd_port, etcd_peer, api_port, cm_port, sched_port = (free_port() for _ in range(5))

        etcd = self._spawn(
            "etcd",
            [
                str(b["etcd"]),
                "--name",
                "tiergate",
                "--data-dir",
                str(self.workdir / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster",
                f"tiergate=http://127.0.0.1:{etcd_peer}",
                # Test data only: durability is not worth the fsync latency on a shared CI disk.
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
        )
        self._wait(
            etcd, lambda: urllib.request.urlopen(f"http://127.0.0.1:{etcd_port}/health", timeout=2).status == 200
        )

        server = f"https://127.0.0.1:{api_port}"
        api = self._spawn(
            "kube-apiserver",
            [
                str(b["kube-apiserver"]),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                # No kubelets run the apiserver's own Endpoints; `none` stops it advertising an unreachable one.
                "--endpoint-reconciler-type=none",
                "--authorization-mode=Node,RBAC",
                f"--client-ca-file={creds.ca_crt}",
                f"--tls-cert-file={creds.crt('apiserver')}",
                f"--tls-private-key-file={creds.key('apiserver')}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={creds.sa_pub}",
                f"--service-account-signing-key-file={creds.sa_key}",
                f"--service-cluster-ip-range={pki.SERVICE_CIDR}",
                "--allow-privileged=true",
                "--profiling=false",
                f"--audit-policy-file={self._audit_policy()}",
                f"--audit-log-path={self.workdir / 'audit' / 'audit.log'}",
                "--audit-log-maxsize=200",
                "--audit-log-maxbackup=1",
                # The aggregation layer, for extension API servers such as prometheus-adapter (custom and external
                # metrics for the HPA controller). Aggregator routing dials the endpoint address from the
                # APIService's Service's EndpointSlice: ClusterIPs have no kube-proxy behind them here.
                f"--requestheader-client-ca-file={creds.front_proxy_ca_crt}",
                f"--requestheader-allowed-names={pki.FRONT_PROXY_CLIENT}",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={creds.crt(pki.FRONT_PROXY_CLIENT)}",
                f"--proxy-client-key-file={creds.key(pki.FRONT_PROXY_CLIENT)}",
                "--enable-aggregator-routing=true",
            ],
        )
        self._wait(api, lambda: self._https_ok(f"{server}/readyz", creds))

        kubeconfigs = {}
        for user in pki.CLIENTS:
            path = self.workdir / f"{user}.kubeconfig"
            path.write_text(pki.kubeconfig(creds, server, user))
            kubeconfigs[user] = path

        cm = self._spawn(
            "kube-controller-manager",
            [
                str(b["kube-controller-manager"]),
                f"--kubeconfig={kubeconfigs['controller-manager']}",
                f"--authentication-kubeconfig={kubeconfigs['controller-manager']}",
                f"--authorization-kubeconfig={kubeconfigs['controller-manager']}",
                "--controllers=*",
                f"--root-ca-file={creds.ca_crt}",
                f"--service-account-private-key-file={creds.sa_key}",
                # Each controller gets its own service account, as in a real cluster, so RBAC is exercised.
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={creds.ca_crt}",
                f"--cluster-signing-key-file={creds.ca_key}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={cm_port}",
                f"--horizontal-pod-autoscaler-sync-period={self.hpa_sync_period_s}s",
            ],
        )
        sched_cfg = self.workdir / "scheduler.yaml"
        sched_cfg.write_text(
            "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\n"
            f"clientConnection:\n  kubeconfig: {kubeconfigs['scheduler']}\nleaderElection:\n  leaderElect: false\n"
        )
        sched = self._spawn(
            "kube-scheduler",
            [
                str(b["kube-scheduler"]),
                f"--config={sched_cfg}",
                f"--authentication-kubeconfig={kubeconfigs['scheduler']}",
                f"--authorization-kubeconfig={kubeconfigs['scheduler']}",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched_port}",
            ],
        )
        self._wait(cm, lambda: self._https_ok(f"https://127.0.0.1:{cm_port}/healthz", None))
        self._wait(sched, lambda: self._https_ok(f"https://127.0.0.1:{sched_port}/healthz", None))
        # The namespace controller and the service-account controllers create `default` ServiceAccounts;
        # pods can't be created in a namespace before its default ServiceAccount exists.
        self._wait(
            cm,
            lambda: (
                self.kubectl(
                    "get", "serviceaccount", "default", "-n", "default", kubeconfig=kubeconfigs["admin"], check=False
                )
                != ""
            ),
            "did not create the default ServiceAccount",
        )
        return kubeconfigs["admin"], server

    def _start_kwok(self, kubeconfig: Path) -> None:
        stages_dir = self.bins["kwok-stages"]
        cfg = self.workdir / "kwok-stages.yaml"
        cfg.write_text("\n---\n".join(p.read_text() for p in sorted(stages_dir.glob("*.yaml"))))
        kwok = self._spawn(
            "kwok",
            [
                str(self.bins["kwok"]),
                f"--kubeconfig={kubeconfig}",
                f"--config={cfg}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={nodes.KWOK_ANNOTATION}={self.kwok_owner}",
                # kwok's default is a /24; each cluster gets its own slice of the pod range (see netns).
                f"--cidr={self.network.cidr if self.network else netns.POD_CIDR}",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{free_port()}",
            ],
        )
        self._wait(kwok, lambda: True)  # kwok has no readiness endpoint; nodes turning Ready below proves it

    def _register_nodes(self) -> None:
        self.kubectl(
            "apply",
            "--server-side",
            "--field-manager=tiergate-devcluster",
            "-f",
            "-",
            input=nodes.all_nodes_json(self.node_prefix, self.kwok_owner),
        )
        self._nodes_registered = True
        kwok = next(c for c in self.components if c.name == "kwok")
        names = nodes.node_names(self.node_prefix)

        def all_ready() -> bool:
            out = self.kubectl(
                "get",
                "nodes",
                *names,
                "-o",
                'jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}',
                check=False,
            )
            return out.split() == ["True"] * len(names)

        self._wait(kwok, all_ready, "did not make the fake nodes Ready")

    def stop(self) -> None:
        """Stop every component (reverse start order) and remove the pod network; safe to call twice."""
        if self.external_kubeconfig is not None and self._nodes_registered:
            # On someone else's cluster, leave nothing of ours behind.
            self.kubectl(
                "delete",
                "nodes",
                *nodes.node_names(self.node_prefix),
                "--ignore-not-found",
                "--wait=false",
                check=False,
            )
            self._nodes_registered = False
        for comp in reversed(self.components):
            terminate(comp.proc)
        self.components.clear()
        if self.network is not None:
            netns.remove(self.network.name, self.network.cidr)
            self.network = None

    def __enter__(self) -> DevCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _audit_policy(self) -> Path:
        path = self.workdir / "audit-policy.yaml"
        path.write_text(AUDIT_POLICY)
        (self.workdir / "audit").mkdir(exist_ok=True)
        return path

    # -- what tests and tools use -----------------------------------------------------------------------------
    def audit_events(self) -> list[dict[str, object]]:
        """The API server's audit events so far (see AUDIT_POLICY), oldest first; rotated files included.
        Raises StartError for a cluster someone else runs: its audit log is not ours to read."""
        if self.external_kubeconfig is not None:
            raise StartError("an external cluster's audit log is not available")
        events: list[dict[str, object]] = []
        for path in sorted((self.workdir / "audit").glob("audit*.log"), key=lambda p: p.stat().st_mtime):
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):  # a line being written right now
                    events.append(json.loads(line))
        return events

    @property
    def kubeconfig(self) -> Path:
        assert self.info is not None, "cluster not started"
        return self.info.kubeconfig

    @property
    def bin_dir(self) -> Path:
        """Directory of the pinned kubectl (helm sits in its own cache entry: use `helm_path`)."""
        return self.bins["kubectl"].parent

    @property
    def helm_path(self) -> Path:
        return self.bins["helm"]

    @property
    def pod_netns(self) -> str | None:
        return self.network.name if self.network else None

    def netns_cmd(self, argv: list[str]) -> list[str]:
        """Prefix a command to run inside the pod network namespace, where it can bind fake pods' IPs."""
        if self.network is None:
            raise StartError("this cluster has no pod network namespace (needs root; not made for external clusters)")
        return self.network.cmd(argv)

    # -- tools ------------------------------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None) -> str:
        """Run the pinned kubectl against this cluster; raises StartError naming the command on failure."""
        kc = kubeconfig or (self.info.kubeconfig if self.info else self.external_kubeconfig)
        return run_tool([str(self.bins["kubectl"]), f"--kubeconfig={kc}", *args], input=input, check=check)

    def helm(self, *args: str, check: bool = True) -> str:
        assert self.info is not None
        return run_tool(
            [str(self.bins["helm"]), f"--kubeconfig={self.info.kubeconfig}", *args],
            check=check,
            env={
                "HELM_CACHE_HOME": str(self.workdir / "helm" / "cache"),
                "HELM_CONFIG_HOME": str(self.workdir / "helm" / "config"),
                "HELM_DATA_HOME": str(self.workdir / "helm" / "data"),
            },
        )


def run_tool(argv: list[str], input: str | None = None, check: bool = True, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    if check and proc.returncode != 0:
        raise StartError(
            f"{Path(argv[0]).name} {' '.join(argv[2:])[:200]} failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout if proc.returncode == 0 else ""


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after a grace period."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=_STOP_GRACE_S)
