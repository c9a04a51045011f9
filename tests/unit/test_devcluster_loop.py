"""The whole loop's parts that need no cluster: the policy it applies, the pod server that stands in for a tier
pod's model server, and the relay that puts a router behind its pod's address (here both on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest

from tests.support.waiting import wait_for
from tiergate.api.policy import AutoscalingMode, parse_policy
from tiergate.devcluster import build, demo, netns, pod_server
from tiergate.devcluster.cluster import free_port
from tiergate.devcluster.errors import StartError
from tiergate.devcluster.loop import DEMAND_PER_REPLICA, MIX_CONCURRENCY, SCALE_MAX, SCALE_MIN, SCALED_TIER, loop_policy
from tiergate.devcluster.metrics import PROMETHEUS_ENV


def test_loop_policy_is_a_valid_policy_with_the_settings_asked_for() -> None:
    p = parse_policy(loop_policy(router_replicas=3, window_seconds=120, band_percentage_points=7, min_requests=10))
    assert [t.name for t in p.spec.tiers] == ["small", "large"]
    assert p.spec.router.replicas == 3
    assert p.spec.best_of_n is None  # no reward model runs on the dev cluster
    om = p.spec.observed_mix
    assert (om.window_seconds, om.drift_band_percentage_points, om.min_requests) == (120, 7, 10)
    # One tier autoscaled by its HPA on the routers' demand, the other kept at its minimum by the operator.
    scaled = p.spec.tier(SCALED_TIER)
    assert scaled.autoscaling is not None
    assert scaled.autoscaling.mode == AutoscalingMode.HPA
    assert scaled.autoscaling.targets is not None
    assert scaled.autoscaling.targets.router_demand_per_replica == DEMAND_PER_REPLICA
    assert (scaled.replicas.min, scaled.replicas.max) == (SCALE_MIN, SCALE_MAX)
    assert p.spec.tier("large").autoscaling is None
    # The mix phase's traffic alone never asks for more than the minimum, even summed over routers scraped at
    # different moments (each may report every request in flight).
    routers = loop_policy()["spec"]["router"]["replicas"]
    assert MIX_CONCURRENCY * routers <= SCALE_MIN * DEMAND_PER_REPLICA


def test_pod_server_holds_an_answer_per_token_asked_for_and_names_its_pod() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), pod_server.make_handler("m", "pod-b", seconds_per_token=0.05))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
        t0 = time.monotonic()
        status, answer = post(url, {"model": "m", "messages": [], "max_tokens": 10})
        held = time.monotonic() - t0
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200
    assert held >= 0.5  # 10 tokens at 0.05 s (a lower bound: sleeping is never shorter)
    assert pod_server.answering_pod(answer["choices"][0]["message"]["content"]) == "pod-b"  # type: ignore[index]
    with pytest.raises(ValueError, match="not a pod server's answer"):
        pod_server.answering_pod("hello")


def test_demo_names_prometheus_when_it_is_missing_before_building_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setattr(netns, "available", lambda: (True, ""))
    monkeypatch.setenv(PROMETHEUS_ENV, "/nonexistent/prometheus")

    def no_build(*_a: object, **_k: object) -> None:
        raise AssertionError("built before checking for Prometheus")

    monkeypatch.setattr(build, "ensure_all", no_build)
    with pytest.raises(StartError, match=r"HPA on metrics from Prometheus.*apt-get install prometheus"):
        demo.main(lambda _m: None)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        p.terminate()
        p.wait(10)


def start(procs: list[subprocess.Popen[str]], *argv: str) -> None:
    p = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("READY"), line


def post(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_pod_server_answers_as_a_model_server_and_the_relay_forwards_it(procs: list[subprocess.Popen[str]]) -> None:
    server, relay = free_port(), free_port()
    start(
        procs,
        "tiergate.devcluster.pod_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(server),
        "--model",
        "m",
        "--pod",
        "pod-a",
    )
    start(procs, "tiergate.devcluster.relay", "--listen", f"127.0.0.1:{relay}", "--to", f"127.0.0.1:{server}")
    base = f"http://127.0.0.1:{relay}"
    with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "m"
    status, answer = post(f"{base}/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert status == 200
    assert "pod-a" in answer["choices"][0]["message"]["content"]  # type: ignore[index]
    assert answer["usage"]["total_tokens"] > 0  # type: ignore[index]
    status, _ = post(f"{base}/v1/chat/completions", {"model": "other", "messages": []})
    assert status == 404
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        assert "vllm:num_requests_waiting 0" in r.read().decode()
    # The relay's target gone: the connection is closed, not hung.
    procs[0].terminate()
    procs[0].wait(10)
    wait_for("the relay to refuse", lambda: _refused(f"{base}/health"), timeout=10)


def _refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5).read()
    except (urllib.error.URLError, ConnectionError, OSError):
        return True
    return False
