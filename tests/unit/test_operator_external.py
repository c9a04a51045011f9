"""External tiers in status by a real check: `GET {url}/models` against servers on loopback, the cache of verdicts
and its loop (off the reconcile path), and what status says for a reachable, an unreachable and an unchecked tier."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from tiergate.api import parse_policy
from tiergate.api.policy import RoutingPolicy
from tiergate_operator.external import ExternalCheck, ExternalChecks, probe
from tiergate_operator.reconcile import external_verdicts
from tiergate_operator.status import EXTERNAL_CHECKING, EXTERNAL_UNREACHABLE, compute_status

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"


class _Handler(http.server.BaseHTTPRequestHandler):
    code = 200
    seen: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        body = b'{"object": "list", "data": []}'
        self.send_response(self.code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


SEEN: dict[str, list[tuple[str, str | None]]] = {}


def _serve(code: int) -> Iterator[str]:
    handler = type(f"H{code}", (_Handler,), {"code": code, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        SEEN[url] = handler.seen
        yield url
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def ok_url() -> Iterator[str]:
    yield from _serve(200)


def test_probe_asks_models_without_credentials_and_reads_the_answer(ok_url: str) -> None:
    v = probe(ok_url + "/")
    assert v == ExternalCheck(True, f"GET {ok_url}/models: HTTP 200")
    assert SEEN[ok_url] == [("/v1/models", None)]  # the models list, and no Authorization header
    # Any answer below 500 is a server that is there (401: the operator sends no key); 5xx is not serving.
    for code, ok in ((401, True), (404, True), (503, False)):
        gen = _serve(code)
        url = next(gen)
        try:
            v = probe(url)
            assert v.ok is ok, (code, v)
            assert f"GET {url}/models: HTTP {code}" in v.message
            if code == 401:
                assert "the API key is the router's" in v.message
        finally:
            gen.close()


def test_probe_reports_a_refused_connection_and_a_silent_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    v = probe(f"http://127.0.0.1:{port}/v1")
    assert not v.ok
    assert v.message.startswith(f"GET http://127.0.0.1:{port}/v1/models: ")
    assert "refused" in v.message.lower()
    # Accepts the connection, never answers: the timeout ends the check, as unreachable.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        v = probe(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", timeout_s=0.2)
    assert not v.ok
    assert "timed out" in v.message.lower()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_checks_are_due_at_once_then_every_interval_and_forgotten_when_unwanted() -> None:
    clock = Clock()
    checks = ExternalChecks(interval_s=30, clock=clock)
    checks.want(["http://a/v1", "http://b/v1"])
    assert checks.due() == ["http://a/v1", "http://b/v1"]
    assert checks.get("http://a/v1") is None
    assert checks.record("http://a/v1", ExternalCheck(True, "HTTP 200"))
    assert not checks.record("http://a/v1", ExternalCheck(True, "HTTP 200"))  # unchanged: no refresh due
    assert checks.due() == ["http://b/v1"]
    clock.t += 30
    assert checks.due() == ["http://a/v1", "http://b/v1"]
    assert checks.record("http://a/v1", ExternalCheck(False, "refused"))  # changed
    # Not named by any reconcile for three intervals: dropped, verdict and all.
    clock.t += 91
    assert checks.due() == []
    assert checks.get("http://a/v1") is None


def test_the_loop_probes_a_new_url_at_once_and_reports_changes(ok_url: str) -> None:
    """No reconcile waits for a probe: `want` returns at once; the loop probes and calls back."""
    changed: list[str] = []

    async def go() -> None:
        checks = ExternalChecks(interval_s=3600)
        pool = ThreadPoolExecutor(2)
        task = asyncio.create_task(checks.run(pool, changed.append))
        await asyncio.sleep(0)
        checks.want([ok_url])
        for _ in range(500):
            if changed:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        pool.shutdown()
        assert checks.get(ok_url) == ExternalCheck(True, f"GET {ok_url}/models: HTTP 200")

    asyncio.run(go())
    assert changed == [ok_url]


def _policy(url: str) -> RoutingPolicy:
    doc: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"].update({"namespace": "team-a", "generation": 2})
    doc["spec"]["tiers"].append(
        {
            "name": "frontier",
            "model": "gpt-5",
            "endpoint": {"url": url},
            "price": {"inputPerMillion": 1, "outputPerMillion": 2},
        }
    )
    return parse_policy(doc)


def _ready_children(policy: RoutingPolicy) -> dict[str, Any]:
    from tiergate_operator.status import components

    out = {}
    for c in components(policy):
        n = c.desired or 1
        out[c.deployment] = {
            "metadata": {"generation": 1},
            "spec": {"replicas": n},
            "status": {"observedGeneration": 1, "readyReplicas": n, "updatedReplicas": n, "replicas": n},
        }
    return out


def _conds(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_status_counts_an_external_tier_only_when_its_check_answered() -> None:
    pol = _policy("https://api.example.invalid/v1")
    deps = _ready_children(pol)

    # Not checked yet: not ready, Progressing says what it waits for.
    st = compute_status(pol, deps, [], external={"frontier": None})
    c = _conds(st)
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", EXTERNAL_CHECKING)
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("True", EXTERNAL_CHECKING)
    assert c["Degraded"]["status"] == "False"
    assert st["readyTiers"] == "2/3"

    ok = ExternalCheck(True, "GET https://api.example.invalid/v1/models: HTTP 401 (reachable; ...)")
    st = compute_status(pol, deps, [], external={"frontier": ok})
    c = _conds(st)
    assert c["Ready"]["status"] == "True"
    assert st["readyTiers"] == "3/3"
    frontier = st["tiers"][2]
    assert (frontier["name"], frontier["reachable"], frontier["message"]) == ("frontier", True, ok.message)

    down = ExternalCheck(False, "GET https://api.example.invalid/v1/models: [Errno -2] Name or service not known")
    st = compute_status(pol, deps, [], external={"frontier": down})
    c = _conds(st)
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("True", EXTERNAL_UNREACHABLE)
    assert (
        "tier frontier (external): unreachable: GET https://api.example.invalid/v1/models" in c["Degraded"]["message"]
    )
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", EXTERNAL_UNREACHABLE)
    assert st["readyTiers"] == "2/3"
    assert st["tiers"][2]["reachable"] is False
    # The status model takes what the operator writes.
    RoutingPolicy.model_validate({**pol.model_dump(by_alias=True, mode="json"), "status": st})


def test_reconcile_registers_the_urls_and_reads_verdicts_without_probing() -> None:
    calls: list[str] = []

    def never(url: str, timeout: float) -> ExternalCheck:
        calls.append(url)
        raise AssertionError("a reconcile never probes")

    checks = ExternalChecks(never, interval_s=30)
    pol = _policy("https://api.example.invalid/v1")
    assert external_verdicts(pol, checks) == {"frontier": None}
    assert checks.due() == ["https://api.example.invalid/v1"]
    checks.record("https://api.example.invalid/v1", ExternalCheck(True, "HTTP 200"))
    assert external_verdicts(pol, checks) == {"frontier": ExternalCheck(True, "HTTP 200")}
    assert calls == []
