"""The API server itself rejects bad RoutingPolicies (schema + CEL), naming the field, and nothing is created.

Each case is also run through the typed model, which must reject it too, naming the same field: the CRD and
the model enforce one set of rules.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.operator_cluster import CHILD_KINDS, Operator, get_json, install_crd, kubectl_raw, sample_doc
from tiergate.api import PolicyValidationError, parse_policy
from tiergate.devcluster.cluster import DevCluster

pytestmark = pytest.mark.cluster

Doc = dict[str, Any]


def _tier(i: int) -> Callable[[Doc], dict[str, Any]]:
    return lambda d: d["spec"]["tiers"][i]


def _set(path: Callable[[Doc], dict[str, Any]], key: str, value: Any) -> Callable[[Doc], None]:
    def go(d: Doc) -> None:
        path(d)[key] = value

    return go


def _del(path: Callable[[Doc], dict[str, Any]], key: str) -> Callable[[Doc], None]:
    def go(d: Doc) -> None:
        del path(d)[key]

    return go


spec: Callable[[Doc], dict[str, Any]] = lambda d: d["spec"]  # noqa: E731
router: Callable[[Doc], dict[str, Any]] = lambda d: d["spec"]["router"]  # noqa: E731
bon: Callable[[Doc], dict[str, Any]] = lambda d: d["spec"]["bestOfN"]  # noqa: E731


def _threshold_out_of_range(d: Doc) -> None:
    del router(d)["targetStrongShareBasisPoints"]
    router(d)["thresholdBasisPoints"] = 12000


# (id, mutation, field the API server names, field the model names)
CASES: list[tuple[str, Callable[[Doc], None], str, str]] = [
    ("no-tiers", _set(spec, "tiers", []), "spec.tiers", "spec.tiers"),
    ("duplicate-tier-name", _set(_tier(1), "name", "small"), "spec.tiers[1]", "spec.tiers[1].name"),
    (
        "modalities-without-text",
        _set(_tier(1), "modalities", ["image"]),
        "spec.tiers[1].modalities",
        "spec.tiers[1].modalities",
    ),
    (
        "min-above-max",
        _set(_tier(0), "replicas", {"min": 5, "max": 2}),
        "spec.tiers[0].replicas",
        "spec.tiers[0].replicas",
    ),
    ("best-of-n-unknown-tier", _set(bon, "tier", "medium"), "spec.bestOfN.tier", "spec.bestOfN.tier"),
    ("max-samples-too-large", _set(bon, "maxSamples", 17), "spec.bestOfN.maxSamples", "spec.bestOfN.maxSamples"),
    ("max-samples-zero", _set(bon, "maxSamples", 0), "spec.bestOfN.maxSamples", "spec.bestOfN.maxSamples"),
    (
        "shadow-unknown-baseline-tier",
        _set(spec, "shadow", {"mode": "Baseline", "baselineTier": "medium", "sampleRateBasisPoints": 0}),
        "spec.shadow.baselineTier",
        "spec.shadow.baselineTier",
    ),
    (
        "threshold-out-of-range",
        _threshold_out_of_range,
        "spec.router.thresholdBasisPoints",
        "spec.router.thresholdBasisPoints",
    ),
    ("two-decision-knobs", _set(router, "thresholdBasisPoints", 5000), "spec.router", "spec.router"),
    ("share-and-cost-weight", _set(router, "costWeightBasisPoints", 500), "spec.router", "spec.router"),
    (
        "float-budget",
        _set(router, "budgetPerMillion", 0.5),
        "spec.router.budgetPerMillion",
        "spec.router.budgetPerMillion",
    ),
    (
        "float-price",
        _set(lambda d: d["spec"]["tiers"][0]["price"], "inputPerMillion", 0.1),
        "spec.tiers[0].price.inputPerMillion",
        "spec.tiers[0].price.inputPerMillion",
    ),
    (
        "negative-price-string",
        _set(lambda d: d["spec"]["tiers"][0]["price"], "outputPerMillion", "-3"),
        "spec.tiers[0].price.outputPerMillion",
        "spec.tiers[0].price.outputPerMillion",
    ),
    ("bad-tier-name", _set(_tier(0), "name", "Small_Tier"), "spec.tiers[0].name", "spec.tiers[0].name"),
    ("missing-model", _del(_tier(0), "model"), "spec.tiers[0].model", "spec.tiers[0].model"),
    (
        "negative-gpus",
        _set(lambda d: d["spec"]["tiers"][0]["resources"], "gpus", -1),
        "spec.tiers[0].resources.gpus",
        "spec.tiers[0].resources.gpus",
    ),
    (
        "bad-memory-quantity",
        _set(lambda d: d["spec"]["tiers"][0]["resources"], "memory", "lots"),
        "spec.tiers[0].resources.memory",
        "spec.tiers[0].resources.memory",
    ),
    (
        "fallback-unknown-tier",
        _set(router, "fallbackOrder", ["large", "huge"]),
        "spec.router.fallbackOrder",
        "spec.router.fallbackOrder[1]",
    ),
    (
        "in-flight-budget-below-one-body",
        _set(router, "bodyLimits", {"maxInFlightRequestBytes": 1024 * 1024}),
        "spec.router.bodyLimits.maxInFlightRequestBytes",
        "spec.router.bodyLimits.maxInFlightRequestBytes",
    ),
    (
        "response-cap-as-quantity",
        _set(router, "bodyLimits", {"maxResponseBytes": "16Mi"}),
        "spec.router.bodyLimits.maxResponseBytes",
        "spec.router.bodyLimits.maxResponseBytes",
    ),
    (
        "fractional-timeout",
        _set(lambda d: d["spec"]["router"]["timeouts"], "requestSeconds", 1.5),
        "spec.router.timeouts.requestSeconds",
        "spec.router.timeouts.requestSeconds",
    ),
    (
        "per-try-beyond-deadline",
        _set(lambda d: d["spec"]["router"]["timeouts"], "perTrySeconds", 200),
        "spec.router.timeouts.perTrySeconds",
        "spec.router.timeouts.perTrySeconds",
    ),
    (
        "backoff-base-above-max",
        lambda d: d["spec"]["router"]["retries"].update(backoffBaseMilliseconds=500, backoffMaxMilliseconds=100),
        "spec.router.retries.backoffMaxMilliseconds",
        "spec.router.retries.backoffMaxMilliseconds",
    ),
    (
        "retry-budget-over-100",
        _set(lambda d: d["spec"]["router"]["retries"], "budgetPercent", 101),
        "spec.router.retries.budgetPercent",
        "spec.router.retries.budgetPercent",
    ),
    (
        "removed-replicas-manager",
        _set(lambda d: d["spec"]["tiers"][0]["replicas"], "managedBy", "Autoscaler"),
        "spec.tiers[0].replicas.managedBy",
        "spec.tiers[0].replicas.managedBy",
    ),
    (
        "classifier-both-sources",
        _set(lambda d: d["spec"]["router"]["classifier"], "path", "/models/router"),
        "spec.router.classifier",
        "spec.router.classifier",
    ),
    ("name-too-long", lambda d: d["metadata"].update(name="x" * 40), "metadata.name", "metadata.name"),
]


@pytest.fixture(scope="module")
def crd(cluster: DevCluster) -> None:
    install_crd(cluster)


@pytest.fixture
def operator(cluster: DevCluster, crd: None, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    op = Operator(cluster, tmp_path, "--namespace", namespace).start()
    yield op
    op.stop()


def test_at_least_ten_distinct_mistakes() -> None:
    assert len(CASES) >= 10
    assert len({c[0] for c in CASES}) == len(CASES)


def test_invalid_policies_are_rejected_naming_the_field(
    cluster: DevCluster, namespace: str, operator: Operator
) -> None:
    failures: list[str] = []
    for case_id, mutate, api_field, model_field in CASES:
        doc = copy.deepcopy(sample_doc())
        mutate(doc)
        r = kubectl_raw(cluster, "apply", "-n", namespace, "-f", "-", input=json.dumps(doc))
        if r.returncode == 0:
            failures.append(f"{case_id}: accepted by the API server: {r.stdout}")
            continue
        if api_field not in r.stderr:
            failures.append(f"{case_id}: rejection does not name {api_field}: {r.stderr.strip()}")
        print(f"{case_id}: {r.stderr.strip()[:300]}")
        with pytest.raises(PolicyValidationError) as info:
            parse_policy(doc)
        if model_field not in info.value.paths:
            failures.append(f"{case_id}: model names {info.value.paths}, not {model_field}")
    assert not failures, "\n".join(failures)

    # Nothing was created: no policy, and (with the operator running) no children.
    assert get_json(cluster, "routingpolicies", "-n", namespace)["items"] == []
    assert get_json(cluster, CHILD_KINDS, "-n", namespace, "-l", "tiergate.io/policy")["items"] == []


def test_the_valid_sample_is_accepted_by_a_dry_run(cluster: DevCluster, namespace: str, crd: None) -> None:
    """The control case: the same sample, unmutated, passes the same server-side validation."""
    r = kubectl_raw(cluster, "apply", "-n", namespace, "--dry-run=server", "-f", "-", input=json.dumps(sample_doc()))
    assert r.returncode == 0, r.stderr
