"""`spec.tenants`, `spec.unauthenticated` and `spec.limitStore`: the model's validation, what the router builds from
them (`from_policy`), and what the operator mounts for them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tiergate.api import naming
from tiergate.api.errors import PolicyValidationError
from tiergate.api.policy import RoutingPolicy, parse_policy
from tiergate_operator import builders
from tiergate_router.config import from_policy
from tiergate_router.errors import ConfigError
from tiergate_router.tenants import key_env

BASE: dict[str, Any] = {
    "apiVersion": "tiergate.io/v1alpha1",
    "kind": "RoutingPolicy",
    "metadata": {"name": "p", "namespace": "ns", "uid": "uid-1"},
    "spec": {
        "tiers": [
            {
                "name": "small",
                "model": "s",
                "endpoint": {"url": "http://s:8000/v1"},
                "price": {"inputPerMillion": "0.1", "outputPerMillion": "0.2"},
            },
            {
                "name": "large",
                "model": "l",
                "endpoint": {"url": "http://l:8000/v1"},
                "price": {"inputPerMillion": 1, "outputPerMillion": 2},
            },
        ],
        "router": {"thresholdBasisPoints": 5000, "replicas": 3},
        "tenants": [
            {
                "name": "team-a",
                "apiKeySecretRef": {"name": "team-a-key", "key": "apiKey"},
                "tiers": ["small"],
                "limits": {"requestsPerMinute": 600, "tokensPerMinute": 100000},
                "budget": {"dailyUsd": "25.50", "lowRemainingBasisPoints": 1000, "whenSpent": "CheapestTier"},
            },
            {"name": "team-b", "apiKeySecretRef": {"name": "team-b-key", "key": "apiKey"}},
        ],
        "limitStore": {"redisAddress": "tiergate-redis:6379", "whenUnavailable": "Refuse"},
    },
}


def doc(mutate: Any = None) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    if mutate is not None:
        mutate(d["spec"])
    return d


def load(mutate: Any = None) -> RoutingPolicy:
    return parse_policy(doc(mutate))


def test_tenants_load_and_build_the_routers_tenancy() -> None:
    cfg = from_policy(load())
    t = cfg.tenancy
    assert not t.allow_unauthenticated  # tenants declared, nothing said: refused
    assert (t.redis_address, t.fail_closed, t.replicas, t.scope) == ("tiergate-redis:6379", True, 3, "ns/p")
    a = t.tenant("team-a")
    assert a.tiers == frozenset({"small"})
    assert (a.requests_per_minute, a.tokens_per_minute) == (600, 100000)
    assert a.budget is not None
    assert a.budget.daily_nano_usd == 25_500_000_000  # exact, from the decimal string
    assert a.budget.low_remaining_bp == 1000
    assert not a.budget.refuse_when_spent
    b = t.tenant("team-b")
    assert (b.tiers, b.requests_per_minute, b.budget) == (None, 0, None)


def test_unauthenticated_access_is_explicit() -> None:
    assert from_policy(load(lambda s: s.update(unauthenticated="Allow"))).tenancy.allow_unauthenticated
    no_tenants = load(lambda s: s.pop("tenants"))
    assert no_tenants.spec.unauthenticated_allowed  # no tenants: the router is open, as before tenants existed
    assert not from_policy(no_tenants).tenancy.enabled
    closed = from_policy(load(lambda s: (s.pop("tenants"), s.update(unauthenticated="Refuse")))).tenancy
    assert closed.enabled


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda s: s["tenants"].append(dict(s["tenants"][1])), "spec.tenants[2].name"),
        (lambda s: s["tenants"][0].update(tiers=["medium"]), "spec.tenants[0].tiers[0]"),
        (lambda s: s["tenants"][0]["budget"].update(dailyUsd=2.5), "spec.tenants[0].budget.dailyUsd"),
        (lambda s: s["tenants"][0]["limits"].update(requestsPerMinute=0), "spec.tenants[0].limits.requestsPerMinute"),
        (lambda s: s["tenants"][0].update(name="Team_A"), "spec.tenants[0].name"),
        (lambda s: s["limitStore"].update(redisAddress="redis"), "spec.limitStore.redisAddress"),
        (lambda s: s.update(unauthenticated="Maybe"), "spec.unauthenticated"),
    ],
)
def test_bad_tenant_fields_are_refused_naming_the_field(mutate: Any, path: str) -> None:
    with pytest.raises(PolicyValidationError) as e:
        load(mutate)
    assert path in [f.path for f in e.value.errors]


def test_a_tenant_cost_weight_needs_an_n_tier_artifact() -> None:
    with pytest.raises(ConfigError, match=r"tenants\[1\]\.costWeightBasisPoints"):
        from_policy(load(lambda s: s["tenants"][1].update(costWeightBasisPoints=800)))


def test_key_environment_variable_name() -> None:
    assert key_env("team-a") == naming.tenant_key_env("team-a") == "TIERGATE_TENANT_KEY_TEAM_A"


def test_operator_mounts_tenant_keys_and_grants_no_secret_access() -> None:
    p = load()
    d = builders.build_router_deployment(p)
    pod = d["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "tenant-keys")
    assert vol["projected"]["sources"] == [
        {"secret": {"name": "team-a-key", "items": [{"key": "apiKey", "path": "team-a"}], "optional": True}},
        {"secret": {"name": "team-b-key", "items": [{"key": "apiKey", "path": "team-b"}], "optional": True}},
    ]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "tenant-keys")
    assert mount == {"name": "tenant-keys", "mountPath": naming.TENANT_KEYS_DIR, "readOnly": True}
    role = builders.build_router_role(p)
    assert all("secrets" not in r["resources"] for r in role["rules"])
    no_tenants = builders.build_router_deployment(load(lambda s: s.pop("tenants")))
    assert all(v["name"] != "tenant-keys" for v in no_tenants["spec"]["template"]["spec"]["volumes"])


def test_the_tenants_sample_loads_and_builds() -> None:
    from tiergate.api.policy import load_policy

    sample = (
        Path(__file__).resolve().parents[2] / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy_tenants.yaml"
    )
    p = load_policy(sample)
    assert [t.name for t in p.spec.tenants] == ["search", "assistant"]
    tenancy = from_policy(p).tenancy
    assert tenancy.tenant("search").tiers == frozenset({"small"})
    assert tenancy.redis_address == "tiergate-tiergate-redis.tiergate-system.svc:6379"


def test_a_tenants_price_budget_becomes_its_cost_weight_through_the_artifact(tmp_path: Path) -> None:
    from tests.support.artifacts import constant_multi_tier_artifact
    from tiergate.routing.artifact import load_artifact
    from tiergate_router.artifact_classifier import LoadedClassifier
    from tiergate_router.classifier import MicroBatcher

    # The policy's tiers cost 0.3 and 3 $/Mtok: twice the artifact's, so its calibration holds with budgets halved.
    art = constant_multi_tier_artifact(tmp_path / "m.json", [("small", 0.15), ("large", 1.5)], [0.5, 0.9])
    multi = LoadedClassifier(MicroBatcher(lambda prompts: []), art, load_artifact(art), scorer=None)

    def knobs(s: dict[str, Any]) -> None:
        s["router"] = {"replicas": 1}
        s["tenants"][0]["budgetPerMillion"] = "0.5"
        s["tenants"][1]["costWeightBasisPoints"] = 700

    cfg = from_policy(load(knobs), multi=multi)
    t = cfg.tenancy
    # The table's weight for 0.25 at the artifact's prices is that weight / 2 against the policy's prices.
    assert t.tenant("team-a").cost_weight_bp == round(multi.cost_weight_for_budget_bp(0.25) / 2)
    assert t.tenant("team-b").cost_weight_bp == 700
    assert cfg.multi_tier is not None
    assert cfg.multi_tier.price_scale == pytest.approx(2.0)

    # Prices in other ratios: no calibration turns the tenant's budget into a weight.
    other = constant_multi_tier_artifact(tmp_path / "o.json", [("small", 0.15), ("large", 2.0)], [0.5, 0.9])
    multi_other = LoadedClassifier(MicroBatcher(lambda prompts: []), other, load_artifact(other), scorer=None)

    def priced(s: dict[str, Any]) -> None:
        knobs(s)
        s["router"]["costWeightBasisPoints"] = 100

    with pytest.raises(ConfigError, match=r"tenants\[0\]\.budgetPerMillion: the tiers' prices"):
        from_policy(load(priced), multi=multi_other)
    with pytest.raises(ConfigError, match=r"tenants\[0\]\.budgetPerMillion"):
        from_policy(load(lambda s: s["tenants"][0].update(budgetPerMillion="0.5")))
    with pytest.raises(PolicyValidationError):
        load(lambda s: s["tenants"][0].update(budgetPerMillion="0.5", costWeightBasisPoints=10))
