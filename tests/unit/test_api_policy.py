"""The typed policy model: loading, defaults, round trips, and errors that name the field."""

from __future__ import annotations

import copy
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from tiergate.api import PolicyParseError, PolicyValidationError, load_policy, parse_policy, parse_spec
from tiergate.api.policy import dump_policy, policy_json

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "tiergate_v1alpha1_routingpolicy.yaml"


def sample() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    return doc


def errors_of(doc: dict[str, Any]) -> PolicyValidationError:
    with pytest.raises(PolicyValidationError) as info:
        parse_policy(doc)
    return info.value


def test_sample_loads_from_path_and_from_text() -> None:
    a = load_policy(SAMPLE)
    b = load_policy(str(SAMPLE))
    c = load_policy(SAMPLE.read_text())
    assert a == b == c
    assert a.name == "chat"
    assert [t.name for t in a.spec.tiers] == ["small", "large"]
    small = a.spec.tier("small")
    assert small.price.input_per_million == Decimal("0.10")
    assert small.resources.gpus == 1
    assert small.pool == "gpu-small"
    assert a.spec.best_of_n is not None
    assert a.spec.best_of_n.max_samples == 4
    assert a.spec.router.target_strong_share_basis_points == 3000
    assert a.spec.strongest.name == "large"


def test_defaults_are_filled() -> None:
    p = parse_policy(
        {
            "apiVersion": "tiergate.io/v1alpha1",
            "kind": "RoutingPolicy",
            "metadata": {"name": "m"},
            "spec": {"tiers": [{"name": "a", "model": "x", "price": {"inputPerMillion": 1, "outputPerMillion": 2}}]},
        }
    )
    t = p.spec.tiers[0]
    assert t.engine.image.startswith("vllm/vllm-openai:")
    assert t.engine.port == 8000
    assert t.replicas.min == 1
    assert t.replicas.effective_max == 1
    assert t.autoscaling is None
    assert not t.autoscaled
    assert t.model_name == "a"
    assert p.spec.router.replicas == 2
    assert p.spec.effective_fallback_order() == ["a"]


def test_round_trip_through_yaml_and_json_is_stable() -> None:
    p = load_policy(SAMPLE)
    again = load_policy(dump_policy(p))
    assert again == p
    assert policy_json(again) == policy_json(p)
    # Prices go out as strings (or integers), never floats.
    out = p.to_manifest()
    assert out["spec"]["tiers"][0]["price"] == {"inputPerMillion": "0.10", "outputPerMillion": "0.30"}


def test_snake_case_names_also_accepted() -> None:
    doc = sample()
    doc["spec"]["router"]["fallback_order"] = doc["spec"]["router"].pop("fallbackOrder")
    assert parse_policy(doc).spec.router.fallback_order == ["large", "small"]


def _mutate(path: str, value: Any) -> dict[str, Any]:
    doc = sample()
    node: Any = doc
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node[p]
    last = parts[-1]
    if value is _DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


_DELETE = object()

# (mutation path, value, expected error path, fragment of the message)
INVALID = [
    ("spec.tiers", [], "spec.tiers", "at least 1"),
    ("spec.tiers.1.name", "small", "spec.tiers[1].name", "duplicate tier name"),
    ("spec.tiers.0.replicas", {"min": 5, "max": 2}, "spec.tiers[0].replicas", "must not exceed"),
    ("spec.bestOfN.tier", "medium", "spec.bestOfN.tier", "names no tier"),
    ("spec.bestOfN.maxSamples", 17, "spec.bestOfN.maxSamples", "less than or equal to 16"),
    ("spec.bestOfN.maxSamples", 0, "spec.bestOfN.maxSamples", "greater than or equal to 1"),
    ("spec.shadow", {"baselineTier": "large", "sampleRateBasisPoints": 100}, "spec.shadow.mode", "required"),
    ("spec.shadow", {"mode": "Sideways", "baselineTier": "large", "sampleRateBasisPoints": 0}, "spec.shadow.mode", ""),
    (
        "spec.shadow",
        {"mode": "Mirror", "baselineTier": "huge", "sampleRateBasisPoints": 100},
        "spec.shadow.baselineTier",
        "no tier",
    ),
    (
        "spec.shadow",
        {"mode": "Mirror", "baselineTier": "large", "sampleRateBasisPoints": 0.5},
        "spec.shadow.sampleRateBasisPoints",
        "integer",
    ),
    (
        "spec.router.canary",
        {"classifier": {"configMap": {"name": "r", "key": "a.json"}, "path": "/a.json"}, "shareBasisPoints": 2000},
        "spec.router.canary.classifier",
        "exactly one",
    ),
    (
        "spec.router.canary",
        {"classifier": {"path": "/a.json"}, "shareBasisPoints": 10001},
        "spec.router.canary.shareBasisPoints",
        "10000",
    ),
    ("spec.router.thresholdBasisPoints", 5000, "spec.router", "at most one"),
    ("spec.router.costWeightBasisPoints", 500, "spec.router", "at most one"),
    ("spec.router.budgetPerMillion", "0.5", "spec.router", "budgetPerMillion"),
    ("spec.router.budgetPerMillion", 0.5, "spec.router.budgetPerMillion", "not float"),
    ("spec.router.costWeightBasisPoints", 10001, "spec.router.costWeightBasisPoints", "10000"),
    ("spec.tiers.0.price.inputPerMillion", 0.1, "spec.tiers[0].price.inputPerMillion", "not float"),
    ("spec.tiers.0.price.inputPerMillion", "-1", "spec.tiers[0].price.inputPerMillion", "not a non-negative"),
    ("spec.tiers.0.price.inputPerMillion", "1" * 31, "spec.tiers[0].price.inputPerMillion", "longer than 30"),
    ("spec.tiers.0.name", "Small_Tier", "spec.tiers[0].name", "pattern"),
    ("spec.tiers.0.resources.gpus", -1, "spec.tiers[0].resources.gpus", "greater than or equal to 0"),
    ("spec.tiers.0.resources.memory", "lots", "spec.tiers[0].resources.memory", "quantity"),
    ("spec.tiers.0.model", _DELETE, "spec.tiers[0].model", "required"),
    ("spec.router.fallbackOrder", ["large", "huge"], "spec.router.fallbackOrder[1]", "names no tier"),
    ("spec.router.timeouts.requestSeconds", 1.5, "spec.router.timeouts.requestSeconds", "integer"),
    ("spec.tiers.0.replicas.managedBy", "Autoscaler", "spec.tiers[0].replicas.managedBy", "autoscaling.mode"),
    ("spec.tiers.0.unknownField", 1, "spec.tiers[0].unknownField", "not permitted"),
    ("metadata.name", "x" * 40, "metadata.name", "at most 36"),
]


@pytest.mark.parametrize(
    ("path", "value", "where", "fragment"),
    INVALID,
    ids=[f"{i[0]}={i[1]!r}"[:60] if i[1] is not _DELETE else f"{i[0]}-missing" for i in INVALID],
)
def test_invalid_policy_names_the_field(path: str, value: Any, where: str, fragment: str) -> None:
    err = errors_of(_mutate(path, value if value is _DELETE else copy.deepcopy(value)))
    assert where in err.paths, f"{where} not in {err.paths}: {err}"
    assert fragment in str(err), str(err)


def test_every_problem_is_reported_at_once() -> None:
    doc = _mutate("spec.bestOfN.maxSamples", 99)
    doc["spec"]["tiers"][0]["resources"]["gpus"] = -3
    err = errors_of(doc)
    assert {"spec.bestOfN.maxSamples", "spec.tiers[0].resources.gpus"} <= set(err.paths)


def test_parse_spec_prefixes_paths() -> None:
    doc = sample()["spec"]
    doc["bestOfN"]["maxSamples"] = 0
    with pytest.raises(PolicyValidationError) as info:
        parse_spec(doc)
    assert info.value.paths == ["spec.bestOfN.maxSamples"]


def test_wrong_kind_and_bad_yaml_are_parse_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyParseError):
        load_policy("a: [unclosed\n")
    f = tmp_path / "two.yaml"
    f.write_text(SAMPLE.read_text() + "\n---\n" + SAMPLE.read_text())
    with pytest.raises(PolicyParseError, match="exactly one RoutingPolicy"):
        load_policy(f)
    with pytest.raises(PolicyValidationError) as info:
        load_policy("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert "kind" in info.value.paths


def test_multi_document_file_with_other_kinds_loads(tmp_path: Path) -> None:
    f = tmp_path / "bundle.yaml"
    f.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n" + SAMPLE.read_text())
    assert load_policy(f).name == "chat"


def test_body_from_api_server_with_extra_metadata_and_status_loads() -> None:
    doc = sample()
    doc["metadata"].update({"uid": "u-1", "generation": 3, "resourceVersion": "42", "managedFields": []})
    doc["status"] = {"observedGeneration": 2, "conditions": [{"type": "Ready", "status": "True", "reason": "AllReady"}]}
    p = parse_policy(doc)
    assert p.metadata.generation == 3
    assert p.status is not None
    assert p.status.observed_generation == 2


def test_shadow_and_canary_are_accepted() -> None:
    doc = sample()
    doc["spec"]["shadow"] = {"mode": "Mirror", "baselineTier": "large", "sampleRateBasisPoints": 500}
    doc["spec"]["router"]["canary"] = {"classifier": {"path": "/models/new.json"}, "shareBasisPoints": 2000}
    p = parse_policy(doc)
    assert p.spec.shadow is not None
    assert p.spec.shadow.mode.value == "Mirror"
    assert p.spec.shadow.max_concurrent == 16
    assert p.spec.router.canary is not None
    assert p.spec.router.canary.share_basis_points == 2000


def test_judging_shadow_answers_needs_a_reward_model() -> None:
    doc = sample()
    del doc["spec"]["bestOfN"]
    doc["spec"]["shadow"] = {"mode": "Mirror", "baselineTier": "large", "sampleRateBasisPoints": 500}
    err = errors_of(doc)
    assert err.paths == ["spec.shadow"]
    assert "rewardUrl" in str(err)
    # Baseline mode without judging needs none; a rewardUrl serves Mirror without best-of-N.
    doc["spec"]["shadow"] = {"mode": "Baseline", "baselineTier": "large", "sampleRateBasisPoints": 0}
    assert parse_policy(doc).spec.shadow is not None
    doc["spec"]["shadow"] = {
        "mode": "Mirror",
        "baselineTier": "large",
        "sampleRateBasisPoints": 500,
        "rewardUrl": "http://reward:8000",
    }
    assert parse_policy(doc).spec.shadow is not None
