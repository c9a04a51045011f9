"""`tiergate dev-cluster` / `python -m tiergate.devcluster`: build, start and stop the local control plane.

`up` runs in the foreground until interrupted (Ctrl-C or `down`), so its processes and the pod network can
never outlive it: every component is started with a parent-death signal, and the pod network namespace is
named after this process, so a later run removes one left by a killed run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from . import build, netns, versions
from .cluster import ClusterInfo, DevCluster
from .errors import DevClusterError


def _state_dir() -> Path:
    return build.default_cache_dir() / "dev-cluster"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build the pinned binaries into the cache (nothing to do when cached)")
    b.add_argument(
        "--keda",
        action="store_true",
        help="also KEDA's operator and metrics API server (the KEDA test runs them; minutes to build)",
    )
    up = sub.add_parser("up", help="start a cluster and keep it running until Ctrl-C or `down`")
    up.add_argument(
        "--no-pod-network", action="store_true", help="skip the network namespace holding the pod IPs (it needs root)"
    )
    sub.add_parser("down", help="stop the cluster started by `up`")
    sub.add_parser("env", help="print the shell line that points kubectl and helm at the running cluster")
    sub.add_parser(
        "demo",
        help="the whole loop on a fresh cluster: chart, policy, operator, tier pods, routers, traffic, status "
        "(make demo-cluster); cleans up on exit",
    )


def _say(msg: str) -> None:
    print(f"[devcluster] {msg}", file=sys.stderr, flush=True)


def _current() -> ClusterInfo | None:
    pointer = _state_dir() / "current"
    if not pointer.exists():
        return None
    state = Path(pointer.read_text().strip()) / "state.json"
    if not state.exists():
        return None
    info = ClusterInfo.from_json(state.read_text())
    try:
        os.kill(info.owner_pid, 0)
    except ProcessLookupError:
        return None
    return info


def _up(args: argparse.Namespace) -> int:
    if (running := _current()) is not None:
        print(
            f"a dev cluster is already running (pid {running.owner_pid}); KUBECONFIG={running.kubeconfig}",
            file=sys.stderr,
        )
        return 1
    bins = build.ensure_all()
    state = _state_dir()
    state.mkdir(parents=True, exist_ok=True)
    workdir = state / f"run-{os.getpid()}"
    for old in state.glob("run-*"):
        shutil.rmtree(old, ignore_errors=True)
    pod_network = not args.no_pod_network
    if pod_network and not netns.available()[0]:
        _say(f"no pod network: {netns.available()[1]}; fake pods will not be reachable")
        pod_network = False
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster = DevCluster(bins, workdir, pod_network=pod_network, say=_say)
    with cluster:
        info = cluster.info
        assert info is not None
        (state / "current").write_text(str(workdir))
        bindir = bins["kubectl"].parent
        print(
            f"""
Tiergate dev cluster is up (Kubernetes {versions.KUBERNETES}, fake node pools by kwok).

  export KUBECONFIG={info.kubeconfig}
  export PATH={bindir}:{bins["helm"].parent}:$PATH
  kubectl get nodes -L tiergate.io/pool
  helm version

Pod IPs (198.18.0.0/16) live in network namespace {info.pod_netns or "(none)"}; run a fake pod's server with
  ip netns exec {info.pod_netns or "NS"} <command binding the pod IP>
Logs: {workdir}/logs.  Stop with Ctrl-C or `python -m tiergate.devcluster down`.
""",
            flush=True,
        )
        while not stop.wait(1.0):
            dead = [c for c in cluster.components if not c.alive()]
            if dead:
                _say(str(dead[0].failure("stopped unexpectedly")))
                return 1
    (state / "current").unlink(missing_ok=True)
    _say("stopped")
    return 0


def _down() -> int:
    info = _current()
    if info is None:
        _say("no dev cluster is running")
        return 0
    os.kill(info.owner_pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(info.owner_pid, 0)
        except ProcessLookupError:
            _say("stopped")
            return 0
        time.sleep(0.2)
    _say(f"pid {info.owner_pid} did not stop within 30s")
    return 1


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "build":
            bins = build.ensure_all()
            if args.keda:
                bins.update(build.ensure_keda())
            for name, path in sorted(bins.items()):
                print(f"{name}: {path}")
            return 0
        if args.action == "up":
            return _up(args)
        if args.action == "down":
            return _down()
        if args.action == "demo":
            from .demo import main as demo

            return demo(_say)
        info = _current()
        if info is None:
            _say("no dev cluster is running")
            return 1
        print(f"export KUBECONFIG={info.kubeconfig}")
        return 0
    except DevClusterError as e:
        _say(f"error: {e}")
        return 1
