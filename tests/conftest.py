"""Shared fixtures: the session's Kubernetes cluster and a fresh namespace per test.

By default the suite starts its own control plane (built from pinned Go modules, see tiergate.devcluster) with
kwok node pools and a network namespace holding the fake pods' IPs. To run against an existing cluster instead
(e.g. kind on a laptop), set TIERGATE_TEST_CLUSTER=existing: KUBECONFIG (or ~/.kube/config) names it, and the
suite only starts kwok against it to register the fake node pools, removing them at the end.

Tests that read the public routing data (RouteLLM and LLMRouter outcomes; README: "Routing data") take the
`routing_data` fixture: the folder named by TIERGATE_ROUTING_DATA, else `../shared/data/routing` beside the
checkout. Where it is absent they skip, saying how to get it, except when TIERGATE_REQUIRE_ROUTING_DATA=1 (CI sets
it), where a missing folder fails the run instead of hiding the figures.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.routing_files import require_routing_files
from tests.support.waiting import wait_for
from tiergate.devcluster import build, netns
from tiergate.devcluster.cluster import DevCluster

ROOT = Path(__file__).resolve().parents[1]


def routing_data_dir() -> Path:
    """The one setting for where the routing data lives (see the module docstring)."""
    env = os.environ.get("TIERGATE_ROUTING_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data" / "routing"


@pytest.fixture(scope="session")
def routing_data() -> Path:
    return require_routing_files(
        routing_data_dir(),
        ("routellm-mmlu.jsonl", "routellm-gsm8k.jsonl", "llmrouter-train.jsonl", "llmrouter-models.json"),
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/cluster/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    bins = build.ensure_all()
    external: Path | None = None
    if os.environ.get("TIERGATE_TEST_CLUSTER") == "existing":
        external = Path(os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config")))
    pod_network = netns.available()[0]
    dc = DevCluster(
        bins,
        tmp_path_factory.mktemp("cluster"),
        pod_network=pod_network,
        external_kubeconfig=external,
        say=lambda m: print(f"[devcluster] {m}"),
    )
    with dc:
        yield dc


def _ns_name(nodeid: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", nodeid.split("::")[-1].lower()).strip("-")[:40].strip("-")
    return f"t-{base}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(cluster: DevCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of its own for each test, deleted afterwards (without waiting for finalizers)."""
    name = _ns_name(request.node.nodeid)
    cluster.kubectl("create", "namespace", name)
    # Pods are refused until the namespace's default ServiceAccount exists; the controller-manager makes it
    # within a second or two when idle, later on a loaded machine.
    wait_for(
        f"namespace {name}: its default ServiceAccount",
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, "-o", "name", check=False),
        timeout=120,
        interval=0.2,
    )
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture(scope="session")
def k8s_api(cluster: DevCluster) -> Iterator[Any]:
    """A kubernetes.client.ApiClient for the cluster (the `kubernetes` package comes with the dev extra)."""
    from kubernetes import config

    client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield client
    client.close()
