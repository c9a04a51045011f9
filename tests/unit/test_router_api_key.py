"""External tiers with `endpoint.apiKeySecretRef`: the operator puts the Secret's key into the router pod's
environment, the router sends it as `Authorization: Bearer <key>` to that tier only, and a missing key is a clear
error at load."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.procs import FakeProcess, fake_tiers
from tests.support.router_serve import ROOT, Serve
from tiergate.api import naming
from tiergate.api.policy import RoutingPolicy
from tiergate_operator.builders import build_router_deployment, router_policy_document
from tiergate_router.config import ConfigError, from_policy

KEY = "sk-test-0123456789"


def policy(hosted_url: str, local_url: str) -> RoutingPolicy:
    return RoutingPolicy.model_validate(
        {
            "apiVersion": "tiergate.io/v1alpha1",
            "kind": "RoutingPolicy",
            "metadata": {"name": "keys", "namespace": "team-a", "uid": "0b7c3f4e-1d2a-4c5b-9e8f-112233445566"},
            "spec": {
                "tiers": [
                    {
                        "name": "local",
                        "model": "local-model",
                        "servedModelName": "local-model",
                        "endpoint": {"url": local_url},
                        "price": {"inputPerMillion": 0, "outputPerMillion": 0},
                    },
                    {
                        "name": "hosted-big",
                        "model": "hosted-model",
                        "servedModelName": "hosted-model",
                        "endpoint": {"url": hosted_url, "apiKeySecretRef": {"name": "hosted-api", "key": "token"}},
                        "price": {"inputPerMillion": 3, "outputPerMillion": 15},
                    },
                ],
                "router": {"thresholdBasisPoints": 5000},
            },
        }
    )


def router_env(p: RoutingPolicy) -> list[dict[str, Any]]:
    dep = build_router_deployment(p)
    env: list[dict[str, Any]] = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    return env


def test_operator_wires_the_secret_into_the_router_env_the_router_reads() -> None:
    p = policy("https://api.example.com/v1", "http://127.0.0.1:1/v1")
    keyed = [e for e in router_env(p) if e["name"].startswith("TIERGATE_API_KEY_")]
    # one variable, for the tier that names a Secret, filled from that Secret (never a literal value)
    assert keyed == [
        {"name": "TIERGATE_API_KEY_HOSTED_BIG", "valueFrom": {"secretKeyRef": {"name": "hosted-api", "key": "token"}}}
    ]
    assert keyed[0]["name"] == naming.api_key_env("hosted-big")
    # the router, reading the policy document the operator mounts, finds the key under that name
    doc = RoutingPolicy.model_validate_json(_json(router_policy_document(p)))
    cfg = from_policy(doc, environ={keyed[0]["name"]: KEY})
    assert cfg.tier("hosted-big").api_key == KEY
    assert cfg.tier("local").api_key is None
    assert KEY not in repr(cfg)


def _json(yaml_text: str) -> str:
    import json

    import yaml

    return json.dumps(yaml.safe_load(yaml_text))


def test_a_policy_without_keys_adds_no_env() -> None:
    p = policy("https://api.example.com/v1", "http://127.0.0.1:1/v1")
    doc = p.to_manifest()
    del doc["spec"]["tiers"][1]["endpoint"]["apiKeySecretRef"]
    assert not [e for e in router_env(RoutingPolicy.model_validate(doc)) if e["name"].startswith("TIERGATE_API")]


def test_missing_key_is_a_clear_error() -> None:
    p = policy("https://api.example.com/v1", "http://127.0.0.1:1/v1")
    with pytest.raises(ConfigError, match=r"spec.tiers\[1\].endpoint.apiKeySecretRef: .*TIERGATE_API_KEY_HOSTED_BIG"):
        from_policy(p, environ={})


@pytest.fixture(scope="module")
def tiers() -> Iterator[dict[str, FakeProcess]]:
    procs = {
        # like `vllm serve --api-key`: 401 without the right bearer token
        "hosted": FakeProcess("hosted-model", name="hosted", extra=["--api-key", KEY]),
        # a tier that must not receive the key: it refuses any request that carries this key
        "local": FakeProcess("local-model", name="local", extra=["--api-key", "other-key"]),
    }
    yield from fake_tiers(procs)


def write_policy(tmp_path: Path, tiers: dict[str, FakeProcess]) -> Path:
    import yaml

    path = tmp_path / "policy.yaml"
    doc = policy(tiers["hosted"].base_url, tiers["local"].base_url).to_manifest()
    # The local tier's own key, from a second Secret, so the test can tell which key reached which tier.
    doc["spec"]["tiers"][0]["endpoint"]["apiKeySecretRef"] = {"name": "local-api", "key": "token"}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_serve_sends_each_tier_its_own_key(tiers: dict[str, FakeProcess], tmp_path: Path) -> None:
    pol = write_policy(tmp_path, tiers)
    env = {naming.api_key_env("hosted-big"): KEY, naming.api_key_env("local"): "other-key"}
    s = Serve("-f", str(pol), env=env)
    try:
        # The client's own Authorization header (the openai client always sends one) is not forwarded.
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="client-key", max_retries=0)
        for model, tier in (("hosted-big", "hosted-big"), ("local", "local")):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert raw.status_code == 200
            assert raw.headers["x-tiergate-tier"] == tier
    finally:
        out = s.stop()
    assert KEY not in out


def test_serve_with_a_wrong_key_passes_the_tiers_401_through(tiers: dict[str, FakeProcess], tmp_path: Path) -> None:
    pol = write_policy(tmp_path, tiers)
    env = {naming.api_key_env("hosted-big"): "sk-wrong", naming.api_key_env("local"): "other-key"}
    s = Serve("-f", str(pol), env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="client-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(
                model="hosted-big", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
    finally:
        s.stop()


def test_serve_without_the_key_fails_at_start_naming_the_variable(
    tiers: dict[str, FakeProcess], tmp_path: Path
) -> None:
    pol = write_policy(tmp_path, tiers)
    r = subprocess.run(
        [sys.executable, "-m", "tiergate.cli", "serve", "-f", str(pol)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_API_KEY_")},
    )
    assert r.returncode == 2, r.stderr
    assert "apiKeySecretRef" in r.stderr
    assert "TIERGATE_API_KEY_LOCAL" in r.stderr
    assert "Traceback" not in r.stderr
