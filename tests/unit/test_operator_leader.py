"""Leader election without a cluster: a fake Lease API (compare-and-swap on resourceVersion) and a fake clock.

What must hold: a standby takes over only after the record stayed unchanged for a lease duration; the leader's
writes stop once its last successful renewal started a renew deadline ago (also after a freeze, with no renewal
attempted in between), and start again only after it acquires the lease anew."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.audit import Write, writes_outside_the_lease
from tiergate_operator.config import OperatorConfig
from tiergate_operator.errors import ConfigError, KubeError, LeaseLost, NotLeader
from tiergate_operator.kube import Kube
from tiergate_operator.leader import LeaderElector

Obj = dict[str, Any]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeLeases:
    """One Lease store shared by the replicas; `latency` advances the clock per call, `fail` makes calls fail."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.obj: Obj | None = None
        self.rv = 0
        self.latency = 0.0
        self.fail = False
        self.calls: list[str] = []

    def _call(self, what: str) -> None:
        self.calls.append(what)
        self.clock.now += self.latency
        if self.fail:
            raise KubeError(f"{what}: connection refused", 0)

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        self._call("get")
        return copy.deepcopy(self.obj)

    def create(self, obj: Obj) -> Obj:
        self._call("create")
        if self.obj is not None:
            raise KubeError("exists", 409)
        return self._store(obj)

    def replace(self, obj: Obj) -> Obj:
        self._call("replace")
        assert self.obj is not None
        if obj["metadata"].get("resourceVersion") != self.obj["metadata"]["resourceVersion"]:
            raise KubeError("conflict", 409)
        return self._store(obj)

    def _store(self, obj: Obj) -> Obj:
        self.rv += 1
        self.obj = copy.deepcopy(obj)
        self.obj["metadata"]["resourceVersion"] = str(self.rv)
        return copy.deepcopy(self.obj)

    @property
    def holder(self) -> str:
        return str(((self.obj or {}).get("spec") or {}).get("holderIdentity") or "")


def _cfg(identity: str) -> OperatorConfig:
    return OperatorConfig(
        identity=identity,
        leader_elect=True,
        lease_duration_seconds=15,
        lease_renew_deadline_seconds=10,
        lease_retry_period_seconds=2,
    )


World = tuple[Clock, FakeLeases, LeaderElector, LeaderElector]


@pytest.fixture
def world() -> World:
    clock = Clock()
    leases = FakeLeases(clock)
    return clock, leases, LeaderElector(leases, _cfg("a"), clock=clock), LeaderElector(leases, _cfg("b"), clock=clock)


def test_first_replica_creates_the_lease_and_the_second_waits(world: World) -> None:
    _clock, leases, a, b = world
    assert a.try_acquire_or_renew()
    assert leases.holder == "a"
    assert a.holds_lease()
    a.check_leader()  # no exception: writes allowed
    assert not b.try_acquire_or_renew()
    assert not b.holds_lease()
    with pytest.raises(NotLeader):
        b.check_leader()


def test_standby_takes_over_only_after_the_record_is_unchanged_for_a_lease_duration(world: World) -> None:
    clock, leases, a, b = world
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # b first sees the record now
    clock.now += 14.9
    assert not b.try_acquire_or_renew()
    clock.now += 0.1
    assert b.try_acquire_or_renew()
    assert leases.holder == "b"
    assert leases.obj is not None
    assert leases.obj["spec"]["leaseTransitions"] == 1


def test_renewals_keep_the_standby_out(world: World) -> None:
    clock, leases, a, b = world
    assert a.try_acquire_or_renew()
    for _ in range(20):
        clock.now += 2
        assert not b.try_acquire_or_renew()
        assert a.try_acquire_or_renew()
    assert leases.holder == "a"


def test_leader_stops_writing_at_the_renew_deadline_before_the_standby_can_take_over(world: World) -> None:
    """A frozen leader attempts nothing: its clock alone closes the gate, before a standby may take over."""
    clock, leases, a, b = world
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.now += 9.9
    a.check_leader()
    clock.now += 0.1  # the renew deadline, with no request made in between (SIGSTOP)
    with pytest.raises(NotLeader, match="write refused"):
        a.check_leader()
    assert not b.try_acquire_or_renew(), "the standby still waits: the margin between deadline and duration"
    clock.now += 5
    assert b.try_acquire_or_renew()
    # Resumed: still refused, and its renewal finds the new holder instead of reopening the gate.
    assert not a.try_acquire_or_renew()
    with pytest.raises(NotLeader):
        a.check_leader()
    assert leases.holder == "b"


def test_deadline_counts_from_the_start_of_a_slow_renewal(world: World) -> None:
    clock, leases, a, _b = world
    assert a.try_acquire_or_renew()
    leases.latency = 3.0  # GET and PUT take 3 s each
    start = clock.now
    assert a.try_acquire_or_renew()
    assert clock.now == start + 6
    clock.now = start + 9.99
    a.check_leader()
    clock.now = start + 10
    with pytest.raises(NotLeader):
        a.check_leader()


def test_failed_renewals_keep_the_gate_open_only_until_the_deadline(world: World) -> None:
    clock, leases, a, _b = world
    assert a.try_acquire_or_renew()
    leases.fail = True
    clock.now += 5
    with pytest.raises(KubeError):
        a.try_acquire_or_renew()
    a.check_leader()  # a failed request alone does not prove the lease is lost
    clock.now += 5
    with pytest.raises(NotLeader):
        a.check_leader()
    leases.fail = False
    assert a.try_acquire_or_renew(), "nobody took it over: renewing reopens the gate"
    a.check_leader()


def test_conflicting_write_closes_the_gate(world: World) -> None:
    _clock, leases, a, _b = world
    assert a.try_acquire_or_renew()
    real_replace = leases.replace

    def racing_replace(obj: Obj) -> Obj:
        leases.rv += 1  # another writer got in between our GET and PUT
        assert leases.obj is not None
        leases.obj["metadata"]["resourceVersion"] = str(leases.rv)
        return real_replace(obj)

    leases.replace = racing_replace  # type: ignore[method-assign]
    assert not a.try_acquire_or_renew()
    with pytest.raises(NotLeader):
        a.check_leader()


def test_release_hands_over_at_once_and_stops_writes(world: World) -> None:
    _clock, leases, a, b = world
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    with pytest.raises(NotLeader):
        a.check_leader()
    assert leases.holder == ""
    assert b.try_acquire_or_renew(), "a released lease is free without waiting"


class FakeApiClient:
    """What Kube.request uses of the kubernetes ApiClient, recording what was sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def param_serialize(self, method: str, path: str, **_: Any) -> tuple[str, str, dict[str, str], Any, None]:
        return method, path, {}, None, None

    def call_api(self, method: str, url: str, **_: Any) -> Any:
        self.sent.append(f"{method} {url}")

        class Resp:
            status = 200

            def read(self) -> bytes:
                return b"{}"

        return Resp()


def test_every_write_of_the_guarded_client_passes_the_gate(world: World) -> None:
    clock, _leases, a, _b = world
    api = FakeApiClient()
    kube = Kube(api, write_guard=a.check_leader)
    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "ns"}}
    writes: list[Callable[[], object]] = [
        lambda: kube.apply(obj, "tiergate-operator"),
        lambda: kube.create(obj),
        lambda: kube.replace(obj),
        lambda: kube.delete("ConfigMap", "ns", "x"),
        lambda: kube.patch_status("RoutingPolicy", "ns", "p", {"phase": "Ready"}),
    ]
    for write in writes:
        with pytest.raises(NotLeader):
            write()
    assert api.sent == [], "nothing is sent without the lease"
    kube.get("ConfigMap", "ns", "x")  # reads need no lease (a standby's caches stay warm)
    assert a.try_acquire_or_renew()
    for write in writes:
        write()
    assert len(api.sent) == 1 + len(writes)
    clock.now += 10
    with pytest.raises(NotLeader):
        kube.create(obj)
    assert len(api.sent) == 1 + len(writes)


class FakeWait:
    """Stands in for the retry-period sleep: advances the fake clock instead of waiting."""

    def __init__(self, clock: Clock, stop_after: int = 1000) -> None:
        self.clock = clock
        self.calls = 0
        self.stop_after = stop_after

    async def __call__(self, stop: asyncio.Event, seconds: float) -> bool:
        self.calls += 1
        self.clock.now += seconds
        if self.calls >= self.stop_after:
            stop.set()
        return stop.is_set()


def test_hold_steps_down_once_renewals_fail_for_the_renew_deadline() -> None:
    clock = Clock()
    leases = FakeLeases(clock)
    wait = FakeWait(clock)
    a = LeaderElector(leases, _cfg("a"), clock=clock, wait=wait)
    assert a.try_acquire_or_renew()
    leases.fail = True
    with pytest.raises(LeaseLost):
        asyncio.run(a.hold(asyncio.Event()))
    a.close()
    # Renewals every 2 s from t=0 fail; the gate closes at 10 s, so the fifth wake-up gives up.
    assert wait.calls == 5
    assert not a.holds_lease()


def test_hold_steps_down_at_once_when_another_replica_holds_the_lease() -> None:
    clock = Clock()
    leases = FakeLeases(clock)
    wait = FakeWait(clock)
    a = LeaderElector(leases, _cfg("a"), clock=clock, wait=wait)
    b = LeaderElector(leases, _cfg("b"), clock=clock)
    assert a.try_acquire_or_renew()
    clock.now += 20  # frozen far past the lease duration
    assert not b.try_acquire_or_renew()
    clock.now += 15
    assert b.try_acquire_or_renew()
    with pytest.raises(LeaseLost):
        asyncio.run(a.hold(asyncio.Event()))
    a.close()
    assert wait.calls == 1
    assert leases.calls.count("replace") == 1, "the resumed replica wrote nothing to the lease"


def test_hold_renews_until_stopped() -> None:
    clock = Clock()
    leases = FakeLeases(clock)
    wait = FakeWait(clock, stop_after=30)
    a = LeaderElector(leases, _cfg("a"), clock=clock, wait=wait)
    assert a.try_acquire_or_renew()
    asyncio.run(a.hold(asyncio.Event()))
    a.close()
    assert leases.calls.count("replace") == 29
    assert a.holds_lease()


def test_acquire_retries_every_retry_period_until_the_lease_expires() -> None:
    clock = Clock()
    leases = FakeLeases(clock)
    holder = LeaderElector(leases, _cfg("a"), clock=clock)
    assert holder.try_acquire_or_renew()
    wait = FakeWait(clock)
    b = LeaderElector(leases, _cfg("b"), clock=clock, wait=wait)
    assert asyncio.run(b.acquire(asyncio.Event()))
    b.close()
    assert wait.calls == 8  # 15 s at 2 s intervals: the 9th attempt, at 16 s, takes over
    assert leases.holder == "b"


@pytest.mark.parametrize(
    ("duration", "deadline", "retry"),
    [(15, 15, 2), (15, 10, 10), (15, 20, 2), (15, 10, 0)],
)
def test_config_requires_duration_over_deadline_over_retry(duration: float, deadline: float, retry: float) -> None:
    with pytest.raises(ConfigError, match="lease_duration_seconds > lease_renew_deadline_seconds"):
        OperatorConfig(
            lease_duration_seconds=duration,
            lease_renew_deadline_seconds=deadline,
            lease_retry_period_seconds=retry,
        )


def test_lease_timings_from_env() -> None:
    cfg = OperatorConfig.from_env(
        {
            "TIERGATE_OPERATOR_LEASE_DURATION_SECONDS": "6",
            "TIERGATE_OPERATOR_LEASE_RENEW_DEADLINE_SECONDS": "4",
            "TIERGATE_OPERATOR_LEASE_RETRY_PERIOD_SECONDS": "1",
        }
    )
    assert (cfg.lease_duration_seconds, cfg.lease_renew_deadline_seconds, cfg.lease_retry_period_seconds) == (6, 4, 1)
    assert cfg.lease_call_timeout_seconds * 2 < cfg.lease_renew_deadline_seconds
    defaults = OperatorConfig()
    assert (defaults.lease_duration_seconds, defaults.lease_renew_deadline_seconds) == (15, 10)
    assert defaults.lease_retry_period_seconds == 2


def _write(identity: str, resource: str, at: float, holder: str | None = None, code: int = 200) -> Write:
    t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=at)
    return Write(t, t + dt.timedelta(milliseconds=5), identity, "patch", resource, "x", code, holder)


def test_the_audit_check_catches_a_write_outside_the_lease() -> None:
    """The checker above, on made-up audit records: it must be able to fail."""
    good = [
        _write("op-a", "leases", 0, "op-a"),
        _write("op-a", "deployments", 1),
        _write("op-b", "leases", 2, "op-a", code=409),  # a failed take-over changes nothing
        _write("op-a", "deployments", 3),
        _write("op-b", "leases", 10, "op-b"),
        _write("op-b", "deployments", 11),
    ]
    assert writes_outside_the_lease(good) == []
    late = [*good, _write("op-a", "deployments", 12)]
    assert len(writes_outside_the_lease(late)) == 1
    assert len(writes_outside_the_lease([_write("op-a", "deployments", 0)])) == 1
