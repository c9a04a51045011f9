"""The operator's typed config (environment + flags) and the controller's event triage, without a cluster."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tiergate_operator.cache import ChildCache
from tiergate_operator.config import OperatorConfig
from tiergate_operator.controller import Controller
from tiergate_operator.errors import ConfigError, KubeError
from tiergate_operator.reconcile import Applied, PolicyMemory


def test_config_from_env_and_overrides() -> None:
    env = {
        "TIERGATE_OPERATOR_RESYNC_SECONDS": "30",
        "TIERGATE_OPERATOR_LEADER_ELECT": "true",
        "TIERGATE_OPERATOR_WORKERS": "4",
        "POD_NAMESPACE": "tiergate-system",
        "POD_NAME": "op-0",
    }
    cfg = OperatorConfig.from_env(env, namespace="team-a", workers=None)
    assert cfg.resync_seconds == 30.0
    assert cfg.leader_elect is True
    assert cfg.workers == 4
    assert cfg.lease_namespace == "tiergate-system"
    assert cfg.identity == "op-0"
    assert cfg.namespace == "team-a"
    assert OperatorConfig.from_env({}).namespace is None  # all namespaces by default


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"TIERGATE_OPERATOR_WORKERS": "many"}, "TIERGATE_OPERATOR_WORKERS"),
        ({"TIERGATE_OPERATOR_LEADER_ELECT": "maybe"}, "TIERGATE_OPERATOR_LEADER_ELECT"),
        ({"TIERGATE_OPERATOR_RESYNC_SECONDS": "0"}, "resync_seconds"),
        ({"TIERGATE_OPERATOR_LEASE_RENEW_DEADLINE_SECONDS": "20"}, "lease_renew_deadline_seconds"),
    ],
)
def test_bad_config_names_the_setting(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        OperatorConfig.from_env(env)


def test_kube_error_retryability() -> None:
    assert KubeError("x", 409).retryable
    assert KubeError("x", 503).retryable
    assert KubeError("x", 0).retryable
    assert not KubeError("x", 422).retryable
    assert not KubeError("x", 403).retryable


def _controller() -> Controller:
    # Triage never calls the API.
    return Controller(OperatorConfig(), kube=None, cache=ChildCache(["Deployment", "Service"]))  # type: ignore[arg-type]


def _child(kind: str, name: str, *, rv: str, gen: int | None = None, annotations: dict[str, str] | None = None) -> Any:
    md: dict[str, Any] = {"name": name, "namespace": "ns", "uid": "uid", "resourceVersion": rv}
    md["labels"] = {"tiergate.io/policy": "chat"}
    md["annotations"] = {"prometheus.io/scrape": "true"} if annotations is None else annotations
    if gen is not None:
        md["generation"] = gen
    return {"kind": kind, "metadata": md}


def test_child_events_are_triaged_into_apply_or_status_only() -> None:
    async def go() -> None:
        c = _controller()
        key = ("ns", "chat")
        mem = PolicyMemory(reconciled_generation=1)
        dep, svc = _child("Deployment", "chat-router", rv="40", gen=3), _child("Service", "chat-router", rv="17")
        mem.applied = {
            ("Deployment", "chat-router"): Applied.of(dep, "h1", dep),
            ("Service", "chat-router"): Applied.of(svc, "h2", svc),
        }
        c._memory[key] = mem
        # Our own write coming back, or a status change: status only.
        c.cache.upsert("Deployment", dep)
        c.child_event("ns", "chat", "Deployment", "chat-router", deleted=False, generation=3)
        c.cache.upsert("Deployment", _child("Deployment", "chat-router", rv="41", gen=3))  # status update
        c.child_event("ns", "chat", "Deployment", "chat-router", deleted=False, generation=3)
        c.cache.upsert("Service", svc)
        c.child_event("ns", "chat", "Service", "chat-router", deleted=False, generation=None, resource_version="17")
        c.child_event("ns", "chat", "Pod", "chat-router-abc", deleted=False, generation=None)
        assert key in c._queued
        assert key not in c._need_apply
        # Someone else changed the spec (new generation), removed our annotation, or deleted a child: re-apply.
        c.cache.upsert("Deployment", _child("Deployment", "chat-router", rv="42", gen=4))
        c.child_event("ns", "chat", "Deployment", "chat-router", deleted=False, generation=4)
        assert key in c._need_apply
        c._need_apply.clear()
        c.cache.upsert("Service", _child("Service", "chat-router", rv="18", annotations={}))
        c.child_event("ns", "chat", "Service", "chat-router", deleted=False, generation=None, resource_version="18")
        assert key in c._need_apply
        c._need_apply.clear()
        c.child_event("ns", "chat", "ConfigMap", "chat-router", deleted=True, generation=None)
        assert key in c._need_apply
        # Children of policies we do not know yet, and unlabelled objects.
        c.child_event("ns", "other", "Pod", "x", deleted=False, generation=None)
        assert ("ns", "other") in c._need_apply
        c.child_event("ns", None, "Pod", "x", deleted=False, generation=None)
        c._executor.shutdown()
        c._apply_pool.shutdown()

    asyncio.run(go())


def test_policy_events_skip_our_own_status_writes() -> None:
    async def go() -> None:
        c = _controller()
        key = ("ns", "chat")
        c._memory[key] = PolicyMemory(reconciled_generation=2)
        c.policy_event("ns", "chat", 2, deleted=False)
        assert key not in c._queued
        c.policy_event("ns", "chat", 3, deleted=False)
        assert key in c._queued
        c.policy_event("ns", "chat", 3, deleted=True)
        assert key not in c._memory
        c._executor.shutdown()
        c._apply_pool.shutdown()

    asyncio.run(go())


def test_unusable_kubeconfig_is_a_clear_config_error(tmp_path: Path) -> None:
    from tiergate_operator.kube import load_api_client

    with pytest.raises(ConfigError, match="cannot load Kubernetes credentials from /nonexistent"):
        load_api_client("/nonexistent")
    junk = tmp_path / "junk"
    junk.write_text("just a string\n")
    with pytest.raises(ConfigError, match=str(junk)):
        load_api_client(str(junk))


def test_cli_reports_bad_credentials_and_exits_nonzero(tmp_path: Path) -> None:
    from tiergate.cli import main

    assert main(["operator", "--kubeconfig", str(tmp_path / "missing")]) == 1
