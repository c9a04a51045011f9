"""The dispatch limits as configuration: the policy's spec.router.{timeouts,retries,circuitBreaker,saturation}
(validated like the API server does), the `tiergate serve` flags, and the backoff rule. Behaviour under hanging
tiers is in test_router_deadline.py."""

from __future__ import annotations

import argparse
import random
from typing import Any

import pytest

from tiergate.api.errors import PolicyValidationError
from tiergate.api.policy import RoutingPolicy, parse_policy
from tiergate_router import cmd_serve
from tiergate_router.config import DISPATCH_FLAGS, ConfigError, RouterConfig, from_policy, serve_config
from tiergate_router.dispatch import TryLimit, backoff_s, try_limit


def _policy(router: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "tiergate.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "p"},
        "spec": {
            "tiers": [
                {
                    "name": "small",
                    "model": "org/small",
                    "endpoint": {"url": "http://small.example/v1"},
                    "price": {"inputPerMillion": 1, "outputPerMillion": 1},
                }
            ],
            "router": router,
        },
    }


LIMITS = {
    "timeouts": {"connectSeconds": 3, "requestSeconds": 40, "perTrySeconds": 15},
    "retries": {
        "attemptsPerTier": 4,
        "budgetPercent": 35,
        "minRetryConcurrency": 7,
        "backoffBaseMilliseconds": 50,
        "backoffMaxMilliseconds": 800,
    },
    "circuitBreaker": {"consecutiveFailures": 6, "openSeconds": 11},
    "saturation": {"maxInFlightPerEndpoint": 64, "queuedRequests": 9},
}


def test_every_policy_limit_reaches_the_router_config() -> None:
    cfg = from_policy(RoutingPolicy.model_validate(_policy(LIMITS)))
    assert (cfg.connect_timeout_s, cfg.request_timeout_s, cfg.per_try_timeout_s) == (3.0, 40.0, 15.0)
    assert (cfg.max_attempts_per_tier, cfg.retry_budget_percent, cfg.min_retry_concurrency) == (4, 35, 7)
    assert (cfg.backoff_base_s, cfg.backoff_max_s) == (0.05, 0.8)
    assert (cfg.breaker_failures, cfg.breaker_open_s) == (6, 11.0)
    assert (cfg.max_outstanding_per_endpoint, cfg.saturation_waiting) == (64, 9)


def test_policy_defaults_are_envoys_and_leave_the_per_try_timeout_unset() -> None:
    cfg = from_policy(RoutingPolicy.model_validate(_policy({})))
    assert (cfg.request_timeout_s, cfg.per_try_timeout_s) == (120.0, None)
    assert (cfg.retry_budget_percent, cfg.min_retry_concurrency, cfg.backoff_base_s) == (20, 3, 0.025)


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        ("timeouts", {"requestSeconds": 10, "perTrySeconds": 11}, "spec.router.timeouts.perTrySeconds"),
        ("retries", {"backoffBaseMilliseconds": 500, "backoffMaxMilliseconds": 100}, "retries.backoffMaxMilliseconds"),
        ("retries", {"budgetPercent": 101}, "spec.router.retries.budgetPercent"),
        ("retries", {"attemptsPerTier": 0}, "spec.router.retries.attemptsPerTier"),
        ("timeouts", {"perTrySeconds": 1.5}, "spec.router.timeouts.perTrySeconds"),
        ("circuitBreaker", {"openSeconds": "5"}, "spec.router.circuitBreaker.openSeconds"),
        ("saturation", {"queuedRequests": -1}, "spec.router.saturation.queuedRequests"),
    ],
)
def test_bad_limits_are_refused_naming_the_field(section: str, values: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyValidationError) as e:
        parse_policy(_policy({section: values}))
    assert field in str(e.value)


def test_the_crd_refuses_what_the_model_refuses() -> None:
    from tiergate.api.crd import build_crd

    router = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "router"
    ]["properties"]
    rules = [r["rule"] for r in router["timeouts"]["x-kubernetes-validations"]]
    assert any("self.perTrySeconds <= self.requestSeconds" in r for r in rules)
    rules = [r["rule"] for r in router["retries"]["x-kubernetes-validations"]]
    assert any("self.backoffBaseMilliseconds <= self.backoffMaxMilliseconds" in r for r in rules)
    budget = router["retries"]["properties"]["budgetPercent"]
    assert (budget["type"], budget["minimum"], budget["maximum"]) == ("integer", 0, 100)


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cmd_serve.configure(parser)
    return parser.parse_args(list(argv))


def test_the_readme_form_of_serve_still_parses_and_sets_no_limit() -> None:
    args = _serve_args(
        "-f", "p.yaml", "--tier", "a=http://a/v1", "--tier", "b=http://b/v1", "--host", "h", "--port", "1"
    )
    local = cmd_serve.overrides(args)
    assert local.dispatch == ()
    assert [n for n, _ in local.tiers] == ["a", "b"]


def test_every_dispatch_flag_sets_its_config_field_and_beats_the_policy() -> None:
    values = {f.flag: 10 + i for i, f in enumerate(DISPATCH_FLAGS)}
    # Keep the cross-field rules: per-try within the deadline, backoff base within its cap.
    values["--request-timeout-seconds"] = 100
    values["--backoff-max-milliseconds"] = 900
    argv = [x for flag, v in values.items() for x in (flag, str(v))]
    local = cmd_serve.overrides(_serve_args("--tier", "small=http://local/v1", *argv))
    cfg = serve_config(RoutingPolicy.model_validate(_policy(LIMITS)), local, None)
    for f in DISPATCH_FLAGS:
        expected = values[f.flag] if f.scale is None else values[f.flag] * f.scale
        assert getattr(cfg, f.field) == pytest.approx(expected), f.flag
    assert {f.policy_field.split(".")[0] for f in DISPATCH_FLAGS} == set(LIMITS)


def test_flags_that_break_a_rule_are_refused() -> None:
    with pytest.raises(ConfigError, match="--retry-budget-percent"):
        cmd_serve.overrides(_serve_args("--tier", "a=http://a/v1", "--retry-budget-percent", "-1"))
    local = cmd_serve.overrides(_serve_args("--tier", "a=http://a/v1", "--per-try-timeout-seconds", "500"))
    with pytest.raises(ConfigError, match="command line: per_try_timeout_s"):
        serve_config(None, local, None)


def test_router_config_refuses_inconsistent_limits() -> None:
    from tiergate_router.config import tier_at

    tiers = (tier_at("a", "http://a/v1"),)
    with pytest.raises(ConfigError, match="per_try_timeout_s"):
        RouterConfig(tiers=tiers, thresholds_bp=(), request_timeout_s=5, per_try_timeout_s=6)
    with pytest.raises(ConfigError, match="backoff_base_s"):
        RouterConfig(tiers=tiers, thresholds_bp=(), backoff_base_s=1.0, backoff_max_s=0.5)
    with pytest.raises(ConfigError, match="retry_budget_percent"):
        RouterConfig(tiers=tiers, thresholds_bp=(), retry_budget_percent=120)


def test_backoff_grows_exponentially_up_to_its_cap_with_full_jitter() -> None:
    base, cap = 0.025, 0.25
    ceilings = [backoff_s(n, base, cap, 1.0) for n in range(1, 8)]
    assert ceilings[:4] == pytest.approx([0.025, 0.05, 0.1, 0.2])
    assert ceilings[4:] == pytest.approx([0.25] * 3)
    assert backoff_s(3, base, cap, 0.0) == 0.0
    rng = random.Random(7)
    draws = [backoff_s(3, base, cap, rng.random()) for _ in range(200)]
    # Full jitter: spread over the whole [0, ceiling) range, never above it.
    assert max(draws) <= 0.1
    assert min(draws) < 0.02 < 0.08 < max(draws)
    assert backoff_s(10_000, base, cap, 0.5) == pytest.approx(0.125)


def test_a_try_is_limited_by_whichever_ends_first_and_blamed_only_for_configured_limits() -> None:
    assert try_limit(10.0, 3.0, client_deadline=False) == TryLimit(3.0, "per_try", blame=True)
    assert try_limit(10.0, 3.0, client_deadline=True) == TryLimit(3.0, "per_try", blame=True)
    assert try_limit(2.0, 3.0, client_deadline=False) == TryLimit(2.0, "deadline", blame=True)
    assert try_limit(2.0, None, client_deadline=False) == TryLimit(2.0, "deadline", blame=True)
    # The client's own shorter deadline ran out: the endpoint is not at fault.
    assert try_limit(2.0, 3.0, client_deadline=True) == TryLimit(2.0, "deadline", blame=False)
