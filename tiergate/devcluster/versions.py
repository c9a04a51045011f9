"""Pinned versions of the control-plane components the test bed builds.

Every version here was built and run on the project's machine kind (Go 1.26, 2 cores); see
../shared/notes/k8s-control-plane.md. The cache of built binaries is keyed by these strings, so bumping
one rebuilds exactly that component and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

KUBERNETES = "v1.36.3"
# The staging modules (k8s.io/api, k8s.io/client-go, ...) are versioned v0.<minor>.<patch> in lockstep
# with k8s.io/kubernetes v1.<minor>.<patch>.
KUBERNETES_STAGING = "v0.36.3"
ETCD = "v3.6.13"
KWOK = "v0.8.0"
HELM = "v3.22.0"
# Serves the custom and external metrics APIs from Prometheus, so the real HPA controller scales on router demand.
PROMETHEUS_ADAPTER = "v0.12.0"
# KEDA's operator, which wakes a tier from zero on the router's demand (autoscaling mode KEDA). The newest KEDA
# release when this was written (2026-12); its CRDs declare keda.sh/v1alpha1, what the operator's builders emit.
KEDA = "v2.18.3"


@dataclass(frozen=True)
class Component:
    """One cache entry: a set of binaries built together from one pinned module version."""

    key: str
    binaries: tuple[str, ...]


COMPONENTS: tuple[Component, ...] = (
    Component(
        f"kubernetes-{KUBERNETES}",
        ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"),
    ),
    Component(f"etcd-{ETCD}", ("etcd",)),
    # The entry also holds the stage files the build picks (build._KWOK_STAGES): "+fast-stages" names that recipe.
    Component(f"kwok-{KWOK}+fast-stages", ("kwok",)),
    Component(f"helm-{HELM}", ("helm",)),
    Component(f"prometheus-adapter-{PROMETHEUS_ADAPTER}", ("prometheus-adapter",)),
)


# KEDA's operator and its metrics API server (cmd/adapter, which serves the external metrics of the HPA KEDA makes).
# Built only when a test asks for it (build.ensure_keda), not by ensure_all: it takes minutes and only the KEDA
# tests run it. "+no-newrelic-solarwinds" names the recipe: the Go module proxy here refuses (403) the SDKs of those
# two scalers, so the build leaves them out (build.trim_keda_source).
KEDA_COMPONENT = Component(f"keda-{KEDA}+no-newrelic-solarwinds", ("keda-operator", "keda-metrics-apiserver"))
