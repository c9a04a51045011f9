"""Fixtures of the cluster tests that run the metric pipeline and the whole loop beside the dev cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import metrics_pipeline as mp
from tests.support.operator_cluster import install_crd
from tiergate.devcluster.cluster import DevCluster
from tiergate.devcluster.loop import WholeLoop
from tiergate.devcluster.metrics import MetricsStack


# Per module, not per session: a module's tests share one Prometheus and adapter, and the metrics APIServices it
# registers are gone again before the next module (test_operator_autoscaling looks for FailedGetExternalMetric where
# no external metrics API is served).
@pytest.fixture(scope="module")
def stack(cluster: DevCluster) -> Iterator[MetricsStack]:
    """Prometheus and prometheus-adapter with the chart's scrape configs and rules (tests/support/metrics_pipeline)."""
    if cluster.pod_netns is None:
        pytest.skip("external cluster without a pod network namespace: the adapter and fake pods cannot be bound")
    with mp.chart_stack(cluster) as s:
        yield s


@pytest.fixture
def loop(cluster: DevCluster, namespace: str, tmp_path: Path, stack: MetricsStack) -> Iterator[WholeLoop]:
    """The whole loop (tiergate.devcluster.loop) in the test's namespace, the metric pipeline beside it; its logs
    are printed when the test fails."""
    install_crd(cluster)
    with WholeLoop(cluster, namespace, tmp_path / "loop", mix_report_seconds=1.0) as wl:
        try:
            yield wl
        except BaseException:
            print(wl.logs())
            raise
