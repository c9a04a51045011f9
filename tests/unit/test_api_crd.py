"""The CRD is generated from the typed model: every committed copy matches, and model and schema agree."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from tiergate.api.crd import CRD_COPIES, build_crd, render_crd, stale_copies
from tiergate.api.policy import RoutingPolicySpec, RoutingPolicyStatus

ROOT = Path(__file__).resolve().parents[2]


def _schema() -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / CRD_COPIES[0]).read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize("copy", CRD_COPIES, ids=str)
def test_committed_copy_matches_generator(copy: Path) -> None:
    assert (ROOT / copy).read_text() == render_crd(), f"{copy} drifted: run python -m tiergate.api.crd"


def test_stale_copies_detects_a_hand_edit(tmp_path: Path) -> None:
    for c in CRD_COPIES:
        (tmp_path / c).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / c).write_text(render_crd())
    assert stale_copies(tmp_path) == []
    edited = tmp_path / CRD_COPIES[1]
    edited.write_text(edited.read_text().replace("maximum: 16", "maximum: 32"))
    assert stale_copies(tmp_path) == [CRD_COPIES[1]]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside X, X | None, list[X], Annotated[...]; None for scalars."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _model_of(get_args(annotation)[0])
    if origin in (Union, types.UnionType, list):
        for arg in get_args(annotation):
            m = _model_of(arg)
            if m is not None:
                return m
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _walk(model: type[BaseModel], schema: dict[str, Any], path: str, seen: list[str]) -> None:
    props = schema.get("properties", {})
    aliases = {(f.alias or name): f for name, f in model.model_fields.items()}
    assert set(aliases) == set(props), f"{path}: model fields {sorted(aliases)} != CRD properties {sorted(props)}"
    required = {a for a, f in aliases.items() if f.is_required()}
    assert required == set(schema.get("required", [])), f"{path}: required fields differ"
    for alias, field in aliases.items():
        sub = props[alias]
        seen.append(f"{path}.{alias}")
        child = _model_of(field.annotation)
        if child is None:
            continue
        node = sub["items"] if sub.get("type") == "array" else sub
        _walk(child, node, f"{path}.{alias}", seen)


def test_model_and_crd_have_the_same_fields() -> None:
    """Walks the pydantic classes themselves (not their JSON schema) against the committed CRD."""
    schema = _schema()
    seen: list[str] = []
    _walk(RoutingPolicySpec, schema["properties"]["spec"], "spec", seen)
    _walk(RoutingPolicyStatus, schema["properties"]["status"], "status", seen)
    # Guard against a vacuous walk.
    assert "spec.tiers.price.inputPerMillion" in seen
    assert "spec.bestOfN.rewardModel.gpus" in seen
    assert "status.conditions.observedGeneration" in seen


def test_defaults_agree() -> None:
    """The API server fills the CRD's defaults; the model fills its own: they must be the same values."""
    schema = _schema()["properties"]["spec"]
    engine = schema["properties"]["tiers"]["items"]["properties"]["engine"]["properties"]
    from tiergate.api.policy import Engine, Replicas, Router, Timeouts

    assert engine["image"]["default"] == Engine().image
    assert engine["port"]["default"] == Engine().port
    rep = schema["properties"]["tiers"]["items"]["properties"]["replicas"]["properties"]
    assert rep["min"]["default"] == Replicas().min
    assert "default" not in rep["managedBy"]
    assert Replicas().managed_by is None
    router = schema["properties"]["router"]["properties"]
    assert router["replicas"]["default"] == Router().replicas
    assert router["timeouts"]["properties"]["requestSeconds"]["default"] == Timeouts().request_seconds


def _structural_problems(node: dict[str, Any], path: str) -> list[str]:
    out: list[str] = []
    special = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    if "type" not in node and not special:
        out.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        out.append(f"{path}: properties and additionalProperties together")
    for bad in ("$ref", "title", "nullable", "allOf", "oneOf"):
        if bad in node:
            out.append(f"{path}: {bad}")
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        out.append(f"{path}: anyOf outside int-or-string")
    for k, v in node.get("properties", {}).items():
        out += _structural_problems(v, f"{path}.{k}")
    if "items" in node:
        out += _structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _structural_problems(node["additionalProperties"], f"{path}{{}}")
    if node.get("type") == "array" and "x-kubernetes-validations" in str(node.get("items", {})):
        assert "maxItems" in node or path.startswith("status"), f"{path}: CEL under an unbounded list"
    return out


def test_schema_is_structural() -> None:
    assert _structural_problems(_schema(), "") == []


def test_crd_shape() -> None:
    crd = build_crd()
    v = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["rp"]
    assert v["subresources"] == {"status": {}}
    cols = {c["name"]: c["jsonPath"] for c in v["additionalPrinterColumns"]}
    assert cols["Tiers"] == ".status.tierNames"
    assert "Ready" in cols
    assert cols["Reward"] == '.status.conditions[?(@.type=="RewardModelReady")].status'
    assert cols["Age"] == ".metadata.creationTimestamp"
    tiers = v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["tiers"]
    assert tiers["x-kubernetes-list-type"] == "map"
    assert tiers["minItems"] == 1
    rules = [r["rule"] for r in v["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]]
    assert any("bestOfN.tier" in r for r in rules)
    assert any("shadow.baselineTier" in r for r in rules)


def _property_names(node: dict[str, Any]) -> list[str]:
    out = list(node.get("properties", {}))
    for v in node.get("properties", {}).values():
        out += _property_names(v)
    if "items" in node:
        out += _property_names(node["items"])
    return out


def test_no_field_name_is_a_yaml_1_1_boolean() -> None:
    """kubectl parses manifests as YAML 1.1, where a bare `n:` or `on:` key is a boolean, not a string."""
    bad = {"y", "n", "yes", "no", "on", "off", "true", "false"}
    assert not [n for n in _property_names(_schema()) if n.lower() in bad]
