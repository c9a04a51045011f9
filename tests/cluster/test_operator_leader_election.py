"""Two operator replicas, the leader frozen (SIGSTOP) and resumed: at most one replica writes at any moment.

Proof from the API server's audit log (tiergate.devcluster enables it; see tests/support/audit.py)."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.audit import Write, operator_writes, writes_outside_the_lease
from tests.support.operator_cluster import (
    Operator,
    apply_policy,
    child_keys,
    children,
    classifier_configmap,
    get_json,
    install_crd,
    sample_doc,
    wait_ready,
)
from tiergate.devcluster.cluster import DevCluster, wait_for

pytestmark = pytest.mark.cluster

LEASE = "tiergate-operator"
# Short timings so the test takes seconds, in the same proportions as the defaults (15 / 10 / 2).
TIMINGS = {
    "TIERGATE_OPERATOR_LEASE_DURATION_SECONDS": "6",
    "TIERGATE_OPERATOR_LEASE_RENEW_DEADLINE_SECONDS": "4",
    "TIERGATE_OPERATOR_LEASE_RETRY_PERIOD_SECONDS": "1",
}


def _holder(cluster: DevCluster, ns: str) -> str | None:
    for lease in get_json(cluster, "leases", "-n", ns)["items"]:
        if lease["metadata"]["name"] == LEASE:
            return str(lease["spec"].get("holderIdentity") or "")
    return None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _bump(cluster: DevCluster, ns: str, doc: dict[str, Any], arg: str) -> dict[str, Any]:
    """A spec change the leader must apply (an engine flag of the small tier); waits until it is Ready."""
    doc["spec"]["tiers"][0]["engine"].setdefault("args", []).append(arg)
    apply_policy(cluster, ns, doc)
    wait_ready(cluster, ns, "chat")
    d = get_json(cluster, "deployment", "chat-tier-small", "-n", ns)
    assert arg in d["spec"]["template"]["spec"]["containers"][0]["args"]
    return doc


def test_frozen_leader_writes_nothing_until_it_holds_the_lease_again(
    cluster: DevCluster, namespace: str, tmp_path: Path
) -> None:
    if cluster.external_kubeconfig is not None:
        pytest.skip("needs the API server's audit log, which only the suite's own control plane writes")
    install_crd(cluster)
    args = ("--namespace", namespace, "--leader-elect", "--lease-namespace", namespace)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Operator(cluster, tmp_path / "a", *args, env={**TIMINGS, "POD_NAME": "op-a"})
    b = Operator(cluster, tmp_path / "b", *args, env={**TIMINGS, "POD_NAME": "op-b"})
    classifier_configmap(cluster, namespace)
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    try:
        a.start()
        wait_for("op-a holds the lease", lambda: _holder(cluster, namespace) == "op-a", timeout=60)
        b.start()
        doc = sample_doc()
        apply_policy(cluster, namespace, doc)
        wait_ready(cluster, namespace, "chat")

        # Freeze the leader. The standby takes over once the record has been still for a lease duration.
        a.pause()
        stopped = time.monotonic()
        wait_for("op-b takes the lease", lambda: _holder(cluster, namespace) == "op-b", timeout=60, interval=0.1)
        marks["takeover after SIGSTOP"] = time.monotonic() - stopped
        cluster.kubectl("delete", "deployment", "chat-tier-small", "-n", namespace)
        wait_for(
            "op-b restores a deleted child",
            lambda: ("Deployment", "chat-tier-small") in child_keys(children(cluster, namespace, "chat")),
            timeout=60,
        )

        # Resume the old leader: its clock says its lease is stale before it writes anything; it steps down.
        resumed_at = _now()
        a.resume()
        doc = _bump(cluster, namespace, doc, "--enable-prefix-caching")
        wait_for("op-a steps down", lambda: not a.alive(), timeout=30)
        assert a.proc is not None
        assert a.proc.returncode == 1, a.log()
        assert "lost lease" in a.log()

        # Restarted (as its pod would be), it stays a standby while op-b renews ...
        a.start()
        doc = _bump(cluster, namespace, doc, "--max-num-seqs=64")
        assert _holder(cluster, namespace) == "op-b"
        # ... and writes again only once op-b hands the lease over.
        assert b.stop() == 0
        wait_for("op-a takes the released lease", lambda: _holder(cluster, namespace) == "op-a", timeout=30)
        _bump(cluster, namespace, doc, "--max-model-len=4096")
    finally:
        a.stop()
        b.stop()
        print(a.log(), b.log())

    def audited() -> list[Write] | None:
        w = operator_writes(cluster.audit_events(), namespace)
        last = [x for x in w if x.identity == "op-a" and x.resource == "deployments" and x.received > resumed_at]
        return w if last else None

    writes = wait_for("op-a's last writes in the audit log", audited, timeout=30)
    for w in writes:
        print(w)
    by = {i: [w for w in writes if w.identity == i and w.resource != "leases"] for i in ("op-a", "op-b")}
    assert by["op-a"], "op-a reconciled as the first leader"
    assert by["op-b"], "op-b reconciled while op-a was frozen"
    assert writes_outside_the_lease(writes) == []
    # The frozen leader, once resumed, sent nothing at all (not even a Lease write) until its restart acquired
    # the lease anew; its first write after that is the Lease.
    after = [w for w in writes if w.identity == "op-a" and w.received > resumed_at]
    assert after, "op-a wrote again after re-acquiring"
    assert after[0].resource == "leases", after[0]
    assert after[0].holder == "op-a"
    assert after[0].code < 300
    marks["test"] = time.monotonic() - t0
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in marks.items()))
