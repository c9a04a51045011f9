"""The control-plane test bed's own logic: build cache safety, start-up failure reporting, node pools."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.waiting import wait_for
from tiergate.devcluster import build, netns, nodes, versions
from tiergate.devcluster.cluster import Component, DevCluster
from tiergate.devcluster.errors import BuildError, StartError

GOMOD = """module k8s.io/kubernetes

require (
\tk8s.io/api v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tgithub.com/x/y => github.com/x/y v1.2.3
)
"""


def test_staging_modules_are_read_from_replace_lines() -> None:
    assert build.staging_modules(GOMOD) == ["k8s.io/api", "k8s.io/client-go"]


def test_staging_modules_refuses_a_go_mod_without_them() -> None:
    with pytest.raises(BuildError, match="no staging replaces"):
        build.staging_modules("module x\n")


COMP = versions.Component("fake-v1.0.0", ("alpha", "beta"))


def _fake_builder(fail_after_first: bool):
    def builder(work: Path, out: Path, log: Path) -> None:
        (out / "alpha").write_text("#!/bin/sh\n")
        (out / "alpha").chmod(0o755)
        if fail_after_first:
            raise BuildError("compiler exploded")
        (out / "beta").write_text("#!/bin/sh\n")
        (out / "beta").chmod(0o755)

    return builder


def test_failed_build_leaves_nothing_a_later_run_would_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(build._BUILDERS, "fake", _fake_builder(fail_after_first=True))
    with pytest.raises(BuildError, match="compiler exploded"):
        build.ensure_component(tmp_path, COMP, lambda _m: None)
    assert not build.is_built(tmp_path, COMP)
    # Neither the final entry nor the half-filled temporary directory survives.
    assert list((tmp_path / "bin").iterdir()) == []


def test_build_is_cached_by_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(work: Path, out: Path, log: Path) -> None:
        calls.append(1)
        _fake_builder(False)(work, out, log)

    monkeypatch.setitem(build._BUILDERS, "fake", counting)
    d1 = build.ensure_component(tmp_path, COMP, lambda _m: None)
    d2 = build.ensure_component(tmp_path, COMP, lambda _m: None)
    assert d1 == d2 == tmp_path / "bin" / "fake-v1.0.0"
    assert len(calls) == 1
    assert (d1 / "BUILD-INFO").read_text().startswith("fake-v1.0.0")


def test_an_incomplete_cache_entry_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(build._BUILDERS, "fake", _fake_builder(False))
    entry = tmp_path / "bin" / "fake-v1.0.0"
    entry.mkdir(parents=True)
    (entry / "alpha").write_text("stale")  # e.g. copied by hand, missing beta and not executable
    build.ensure_component(tmp_path, COMP, lambda _m: None)
    assert build.is_built(tmp_path, COMP)
    assert (entry / "alpha").read_text() == "#!/bin/sh\n"


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _fake_bins(tmp_path: Path, etcd_body: str) -> dict[str, Path]:
    bins = {
        name: _script(tmp_path / name, "sleep 600")
        for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "helm", "kwok")
    }
    bins["etcd"] = _script(tmp_path / "etcd", etcd_body)
    return bins


def _record_spawns(monkeypatch: pytest.MonkeyPatch) -> list[Component]:
    """The components a DevCluster starts, so a test can check each one's process after a failed start."""
    spawned: list[Component] = []
    spawn = DevCluster._spawn

    def recording(self: DevCluster, name: str, argv: list[str]) -> Component:
        comp = spawn(self, name, argv)
        spawned.append(comp)
        return comp

    monkeypatch.setattr(DevCluster, "_spawn", recording)
    return spawned


def test_a_component_that_dies_fails_the_start_with_its_log_tail(tmp_path: Path) -> None:
    bins = _fake_bins(tmp_path, 'echo "etcdmain: listen tcp: address already in use" >&2; exit 3')
    # The default (generous) deadline: the death is noticed at once, however slow the machine.
    dc = DevCluster(bins, tmp_path / "work", pod_network=False)
    with pytest.raises(StartError) as err:
        dc.start()
    msg = str(err.value)
    assert "etcd died during start (exited with 3)" in msg
    assert "address already in use" in msg


# The guarantee is "fails, not hangs": pytest-timeout turns a hang into a failure; how long a start takes to give up
# on a loaded machine is not asserted (the code's own deadline is checked through what it reports).
@pytest.mark.timeout(120)
def test_a_component_that_never_gets_ready_fails_with_a_timeout_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = _record_spawns(monkeypatch)
    bins = _fake_bins(tmp_path, 'echo "waiting for quorum forever"; exec sleep 600')
    dc = DevCluster(bins, tmp_path / "work", pod_network=False, ready_timeout=1.5)
    with pytest.raises(StartError) as err:
        dc.start()
    msg = str(err.value)
    assert "etcd did not become ready within 2s (running)" in msg
    # The log tail is there (its content is checked where the process has surely written it: the test above; here
    # a loaded machine may not have run the script's echo within the 1.5 s).
    assert f"last lines of {tmp_path / 'work' / 'logs' / 'etcd.log'}:" in msg
    # The failed start stopped what it had started: no stray process (the pid, since `exec` renames it).
    assert [c.name for c in spawned] == ["etcd"]
    assert spawned[0].proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(spawned[0].proc.pid, 0)


def test_gpu_pools_are_tainted_and_advertise_gpus() -> None:
    by_pool = {p.name: p for p in nodes.POOLS}
    assert {"cpu", "gpu-small", "gpu-large", "reward"} <= set(by_pool)
    for pool in nodes.POOLS:
        m = nodes.node_manifest(pool, 0)
        capacity = m["status"]["capacity"]  # type: ignore[index]
        taints = m["spec"]["taints"]  # type: ignore[index]
        assert m["metadata"]["labels"][nodes.POOL_LABEL] == pool.name  # type: ignore[index]
        if pool.gpus:
            assert capacity[nodes.GPU_RESOURCE] == str(pool.gpus)
            assert taints == [nodes.GPU_TAINT]
        else:
            assert nodes.GPU_RESOURCE not in capacity
            assert taints == []


needs_root = pytest.mark.skipif(not netns.available()[0], reason=f"pod network: {netns.available()[1]}")


@needs_root
def test_pod_network_reaches_a_server_bound_to_a_pod_ip_and_is_removed() -> None:
    # A slice of its own, so this runs beside live dev clusters; a second one at once gets another slice.
    net = netns.create(tag="u")
    other = netns.create(tag="v")
    assert not ipaddress.ip_network(net.cidr).overlaps(ipaddress.ip_network(other.cidr))
    netns.remove(other.name, other.cidr)
    pod_ip = str(next(ipaddress.ip_network(net.cidr).hosts()) + 7)
    try:
        server = subprocess.Popen(
            net.cmd(
                [
                    sys.executable,
                    "-c",
                    (
                        "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                        "s.bind(('" + pod_ip + "',18080));s.listen();c,_=s.accept();c.sendall(b'pod says hi');c.close()"
                    ),
                ]
            )
        )
        try:

            def greeting() -> bytes | None:
                try:
                    with socket.create_connection((pod_ip, 18080), timeout=5) as c:
                        return c.recv(100)
                except ConnectionRefusedError:
                    return None  # not listening yet

            assert wait_for("the server in the pod network", greeting, interval=0.1) == b"pod says hi"
        finally:
            server.kill()
            server.wait()
    finally:
        netns.remove(net.name, net.cidr)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert net.name not in listed
    routes = subprocess.run(["ip", "route", "show", "exact", net.cidr], capture_output=True, text=True).stdout
    assert routes.strip() == ""


@needs_root
def test_a_namespace_left_by_a_killed_run_is_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    net = netns.create(owner_pid=child.pid, tag="r")
    child.kill()
    child.wait()
    assert net.name in netns.reap_stale()
    assert net.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_two_builds_at_once_build_each_component_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    calls: list[int] = []
    other_waits = threading.Event()

    def slow(work: Path, out: Path, log: Path) -> None:
        calls.append(1)
        # Finish only once the other run has found the build locked, so the two surely overlap (a sleep here only
        # made that likely); the bound only keeps a broken lock from hanging the test.
        other_waits.wait(60)
        _fake_builder(False)(work, out, log)

    def say(message: str) -> None:
        if "another build is running" in message:
            other_waits.set()

    monkeypatch.setitem(build._BUILDERS, "fake", slow)
    monkeypatch.setattr(versions, "COMPONENTS", (COMP,))
    results: list[dict[str, Path]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(build.ensure_all(tmp_path, say=say))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert other_waits.is_set()
    assert len(calls) == 1
    assert results[0] == results[1]


def _keda_like_source(root: Path) -> Path:
    (root / "pkg" / "scalers").mkdir(parents=True)
    (root / "pkg" / "scaling").mkdir(parents=True)
    for name in ("newrelic_scaler.go", "newrelic_scaler_test.go", "solarwinds_scaler.go", "prometheus_scaler.go"):
        (root / "pkg" / "scalers" / name).write_text("package scalers\n")
    (root / "pkg" / "scaling" / "scalers_builder.go").write_text(
        'case "newrelic":\n\t\treturn scalers.NewNewRelicScaler(config)\n'
        'case "prometheus":\n\t\treturn scalers.NewPrometheusScaler(config)\n'
        'case "solarwinds":\n\t\treturn scalers.NewSolarWindsScaler(config)\n'
    )
    return root


def test_keda_source_is_trimmed_of_the_scalers_the_proxy_refuses(tmp_path: Path) -> None:
    src = _keda_like_source(tmp_path / "keda")
    build.trim_keda_source(src)
    assert sorted(f.name for f in (src / "pkg" / "scalers").iterdir()) == ["prometheus_scaler.go"]
    factory = (src / "pkg" / "scaling" / "scalers_builder.go").read_text()
    assert "NewNewRelicScaler" not in factory
    assert "NewSolarWindsScaler" not in factory
    assert 'fmt.Errorf("scaler newrelic is not in this build of KEDA")' in factory
    assert "return scalers.NewPrometheusScaler(config)" in factory  # every other scaler stays


def test_keda_source_of_another_layout_is_refused_not_built(tmp_path: Path) -> None:
    src = _keda_like_source(tmp_path / "keda")
    factory = src / "pkg" / "scaling" / "scalers_builder.go"
    factory.write_text(factory.read_text().replace("NewSolarWindsScaler", "NewSolarWindsScalerV2"))
    with pytest.raises(BuildError, match="NewSolarWindsScaler"):
        build.trim_keda_source(src)
    assert (src / "pkg" / "scalers" / "newrelic_scaler.go").is_file()  # checked before anything is changed
    with pytest.raises(BuildError, match=r"scalers_builder\.go"):
        build.trim_keda_source(tmp_path / "empty")


def test_keda_operator_is_built_only_on_request() -> None:
    assert versions.KEDA_COMPONENT not in versions.COMPONENTS  # ensure_all (every cluster start) does not wait for it
    assert versions.KEDA in versions.KEDA_COMPONENT.key


def test_keda_crd_names_come_from_their_files() -> None:
    from tiergate.devcluster.keda import CRDS, SCALED_OBJECT_CRD_NAME, crd_name

    assert crd_name(CRDS[0]) == SCALED_OBJECT_CRD_NAME == "scaledobjects.keda.sh"
    assert crd_name("eventing.keda.sh_cloudeventsources.yaml") == "cloudeventsources.eventing.keda.sh"


def test_serving_dir_holds_a_pair_its_ca_signed(tmp_path: Path) -> None:
    from tiergate.devcluster.pki import make_serving_dir

    d = make_serving_dir(tmp_path / "certs", "keda-operator").dir
    assert {"ca.crt", "tls.crt", "tls.key"} <= {f.name for f in d.iterdir()}
    check = subprocess.run(
        ["openssl", "verify", "-CAfile", str(d / "ca.crt"), str(d / "tls.crt")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(d / "tls.crt"), "-noout", "-text"], capture_output=True, text=True, check=True
    ).stdout
    assert "IP Address:127.0.0.1" in text
