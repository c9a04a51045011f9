"""Who wrote what, from the API server's audit log (tiergate.devcluster enables it).

Every operator replica sends its identity in its User-Agent (`tiergate-operator/IDENTITY`), and successful Lease
writes carry the holder they wrote (the audit policy logs their bodies), so the holder at any instant can be
rebuilt and every other write checked against it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

UA_PREFIX = "tiergate-operator/"
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}


@dataclass(frozen=True)
class Write:
    received: dt.datetime
    done: dt.datetime
    identity: str
    verb: str
    resource: str
    name: str
    code: int
    holder: str | None  # Lease writes: the holderIdentity written

    def __str__(self) -> str:
        return f"{self.received:%H:%M:%S.%f} {self.identity} {self.verb} {self.resource}/{self.name} -> {self.code}"


def _ts(raw: str) -> dt.datetime:
    return dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))


def operator_writes(events: list[dict[str, Any]], namespace: str) -> list[Write]:
    """Writes the operator replicas made in `namespace` (kubectl's and the control plane's left out), in order."""
    out = []
    for e in events:
        ref = e.get("objectRef") or {}
        ua = str(e.get("userAgent") or "")
        if ref.get("namespace") != namespace or e.get("verb") not in WRITE_VERBS:
            continue
        if not ua.startswith(UA_PREFIX):
            assert not ua.startswith("kopf"), f"kopf wrote on its own, past the write gate: {e}"
            continue
        resource = str(ref.get("resource")) + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        holder = None
        if resource == "leases":
            holder = str(((e.get("requestObject") or {}).get("spec") or {}).get("holderIdentity") or "")
        out.append(
            Write(
                received=_ts(e["requestReceivedTimestamp"]),
                done=_ts(e["stageTimestamp"]),
                identity=ua[len(UA_PREFIX) :],
                verb=str(e["verb"]),
                resource=resource,
                name=str(ref.get("name") or ""),
                code=int((e.get("responseStatus") or {}).get("code") or 0),
                holder=holder,
            )
        )
    return sorted(out, key=lambda w: w.received)


def writes_outside_the_lease(writes: list[Write]) -> list[str]:
    """Each write that is not a Lease write must come from the holder recorded by the last successful Lease write
    completed before the write reached the API server."""
    leases = sorted((w for w in writes if w.resource == "leases" and w.code < 300), key=lambda w: w.done)
    bad = []
    for w in writes:
        if w.resource == "leases":
            continue
        before = [lw for lw in leases if lw.done <= w.received]
        holder = before[-1].holder if before else None
        if holder != w.identity:
            bad.append(f"{w} while the lease was held by {holder!r}")
    return bad
