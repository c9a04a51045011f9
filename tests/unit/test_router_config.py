"""The router's config builders without a server: RoutingPolicy (typed) -> RouterConfig for each decision knob,
N-tier mappings (built once, over the tiers `--tier` leaves), the local overrides and where to listen."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import tiergate.routing
from tiergate.api.policy import RoutingPolicy
from tiergate.routing.artifact import RouterArtifact, load_artifact
from tiergate_router.config import (
    ConfigError,
    LocalOverrides,
    RouterConfig,
    ServiceRef,
    from_policy,
    listen,
    local_config,
    serve_config,
    tier_at,
    with_multi_tier,
)

SHIPPED_MULTI = Path(tiergate.routing.__file__).parent / "default" / "multi-tier.json"


class TwoTier:
    """A loaded two-tier artifact's calibration, recording what it was asked."""

    kind = "two_tier"
    default_threshold_bp = 4200

    def __init__(self) -> None:
        self.shares: list[int] = []

    def threshold_for_share_bp(self, share_bp: int) -> int:
        self.shares.append(share_bp)
        return 10000 - share_bp

    # What only an N-tier artifact answers: never asked of a two-tier one.
    source = Path("two-tier.json")

    @property
    def artifact(self) -> RouterArtifact:
        # Read only for the predicted mix (config.predicted): no calibration table, so no prediction.
        from types import SimpleNamespace

        from tiergate.routing.operating_points import CalibrationTable

        art: RouterArtifact = SimpleNamespace(kind="two_tier", calibration=CalibrationTable())  # type: ignore[assignment]
        return art

    @property
    def tier_names(self) -> tuple[str, ...]:
        raise AssertionError("a two-tier artifact is not mapped")

    @property
    def default_cost_weight_bp(self) -> int:
        raise AssertionError("a two-tier artifact has no cost weight")

    def cost_weight_for_budget_bp(self, budget: float) -> int:
        raise AssertionError("a two-tier artifact has no cost weight")


class NTier:
    """A loaded N-tier artifact (the shipped one) whose reads are counted: the mapping reads `tier_names` once."""

    kind = "multi_tier"
    default_threshold_bp = 5000
    source = SHIPPED_MULTI

    def __init__(self, artifact: RouterArtifact) -> None:
        self.artifact = artifact
        self.default_cost_weight_bp = 650
        self.name_reads = 0
        self.budgets: list[float] = []

    @property
    def tier_names(self) -> tuple[str, ...]:
        self.name_reads += 1
        return tuple(t.name for t in self.artifact.tiers)

    def cost_weight_for_budget_bp(self, budget: float) -> int:
        self.budgets.append(budget)
        return 4321

    def threshold_for_share_bp(self, share_bp: int) -> int:
        raise AssertionError("an N-tier artifact has no threshold")


@pytest.fixture(scope="module")
def multi_artifact() -> RouterArtifact:
    return load_artifact(SHIPPED_MULTI)


def policy(
    router: dict[str, Any] | None = None, tiers: list[dict[str, Any]] | None = None, namespace: str | None = None
) -> RoutingPolicy:
    meta: dict[str, Any] = {"name": "p"}
    if namespace is not None:
        meta["namespace"] = namespace
    return RoutingPolicy.model_validate(
        {
            "apiVersion": "tiergate.io/v1alpha1",
            "kind": "RoutingPolicy",
            "metadata": meta,
            "spec": {
                "tiers": tiers
                or [
                    {"name": "small", "model": "org/small", "price": {"inputPerMillion": "0.1", "outputPerMillion": 1}},
                    {"name": "large", "model": "org/large", "price": {"inputPerMillion": 3, "outputPerMillion": 4}},
                ],
                "router": router or {},
            },
        }
    )


# The shipped N-tier artifact's prices ($/Mtok, input + output), which its calibration was measured at.
SHIPPED_PRICES = {t["name"]: t["price"] for t in json.loads(SHIPPED_MULTI.read_text())["tiers"]}


def served(*names: str, prices: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Tiers with external endpoints serving `names`, priced as in `prices`, else as the shipped artifact prices
    them (split evenly into input and output), else at 1 + 1 $/Mtok."""
    """Policy tiers at external URLs serving the shipped N-tier artifact's tiers of these names."""
    return [
        {
            "name": f"t{i}",
            "model": name,
            "endpoint": {"url": f"http://t{i}.example/v1/"},
            "price": _price((prices or {}).get(name, SHIPPED_PRICES.get(name, 2.0))),
        }
        for i, name in enumerate(names)
    ]


def _price(total: float) -> dict[str, str]:
    half = f"{total / 2:.9f}"
    return {"inputPerMillion": half, "outputPerMillion": half}


# -- two-tier knobs ------------------------------------------------------------------------------------------------


def test_threshold_knob_is_taken_as_given() -> None:
    src = TwoTier()
    cfg = from_policy(policy({"thresholdBasisPoints": 1234}), thresholds=src)
    assert cfg.thresholds_bp == (1234,)
    assert src.shares == []  # the calibration is not consulted
    # ... and needs no artifact at all
    assert from_policy(policy({"thresholdBasisPoints": 1234})).thresholds_bp == (1234,)


def test_share_knob_goes_through_the_artifacts_calibration() -> None:
    src = TwoTier()
    cfg = from_policy(policy({"targetStrongShareBasisPoints": 3000}), thresholds=src)
    assert src.shares == [3000]
    assert cfg.thresholds_bp == (7000,)


def test_no_knob_takes_the_artifacts_default_threshold_or_is_refused_without_one() -> None:
    assert from_policy(policy(), thresholds=TwoTier()).thresholds_bp == (4200,)
    with pytest.raises(ConfigError, match="calibration is needed"):
        from_policy(policy())
    # One tier: nothing to decide, so `tiergate serve` loads no artifact and none is needed.
    one = policy(None, served("x"))
    assert serve_config(one, LocalOverrides(), None).thresholds_bp == ()
    with pytest.raises(ConfigError, match="calibration is needed"):
        serve_config(one, LocalOverrides(tiers=(("y", "http://y/v1"),)), None)


@pytest.mark.parametrize("knob", [{"costWeightBasisPoints": 10}, {"budgetPerMillion": "0.5"}])
def test_n_tier_knobs_are_refused_for_a_two_tier_artifact(knob: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=rf"policy p: spec.router.{next(iter(knob))} is an N-tier knob"):
        from_policy(policy(knob), thresholds=TwoTier())


# -- N-tier knobs --------------------------------------------------------------------------------------------------


def test_cost_weight_knob_is_taken_as_given(multi_artifact: RouterArtifact) -> None:
    src = NTier(multi_artifact)
    cfg = from_policy(policy({"costWeightBasisPoints": 77}, served("gemma-2-9b-it", "codegemma-7b")), multi=src)
    assert cfg.multi_tier is not None
    assert cfg.multi_tier.cost_weight_bp == 77
    assert src.budgets == []


def test_budget_knob_asks_the_artifacts_calibration_with_the_policys_value(multi_artifact: RouterArtifact) -> None:
    src = NTier(multi_artifact)
    cfg = from_policy(policy({"budgetPerMillion": "0.75"}, served("gemma-2-9b-it", "codegemma-7b")), multi=src)
    assert src.budgets == [0.75]
    assert cfg.multi_tier is not None
    assert cfg.multi_tier.cost_weight_bp == 4321


def test_no_knob_takes_the_artifacts_default_cost_weight(multi_artifact: RouterArtifact) -> None:
    cfg = from_policy(policy(None, served("gemma-2-9b-it", "codegemma-7b")), multi=NTier(multi_artifact))
    assert cfg.multi_tier is not None
    assert cfg.multi_tier.cost_weight_bp == 650


def test_bad_mapping_is_refused_naming_the_tier(multi_artifact: RouterArtifact) -> None:
    with pytest.raises(ConfigError, match=r"policy p: tiers\[1\] \(t1\): matches no tier .*'gpt-unknown'"):
        from_policy(policy(None, served("gemma-2-9b-it", "gpt-unknown")), multi=NTier(multi_artifact))
    # A tier added by --tier is mapped too, and named when it does not map.
    with pytest.raises(ConfigError, match=r"tiers\[2\] \(extra\): matches no tier"):
        from_policy(
            policy(None, served("gemma-2-9b-it", "codegemma-7b")),
            multi=NTier(multi_artifact),
            tier_flags=[("extra", "http://x/v1")],
        )


# -- serve: policy + flags + classifier, mapping once ----------------------------------------------------------------


def test_serve_maps_the_merged_tiers_once_and_keeps_the_mapping_under_overrides(multi_artifact: RouterArtifact) -> None:
    src = NTier(multi_artifact)
    pol = policy({"budgetPerMillion": "0.5"}, served("gemma-2-9b-it", "codegemma-7b"))
    local = LocalOverrides(tiers=(("t1", "http://override/v1"), ("llama-3.1-8b-instruct", "http://new/v1")))
    cfg = serve_config(pol, local, src)
    assert src.name_reads == 1  # mapped once, over the tiers after --tier
    assert cfg.tier_names == ("t0", "t1", "llama-3.1-8b-instruct")
    assert cfg.tiers[1].base_urls == ("http://override/v1",)
    names = [t.name for t in multi_artifact.tiers]
    assert cfg.multi_tier is not None
    assert [names[c] for c in cfg.multi_tier.columns] == ["gemma-2-9b-it", "codegemma-7b", "llama-3.1-8b-instruct"]
    assert cfg.multi_tier.cost_weight_bp == 4321
    # --cost-weight-bp wins over the policy's budget; the mapping is carried, not rebuilt.
    over = serve_config(pol, dataclasses.replace(local, cost_weight_bp=99), src)
    assert src.name_reads == 2  # one more serve_config, one more mapping: none for the override
    assert over.multi_tier is not None
    assert over.multi_tier.cost_weight_bp == 99
    assert over.multi_tier.columns == cfg.multi_tier.columns


def test_serve_without_a_policy(multi_artifact: RouterArtifact) -> None:
    flags = (("a", "http://a/v1"), ("b", "http://b/v1"))
    assert serve_config(None, LocalOverrides(tiers=flags), TwoTier()).thresholds_bp == (4200,)
    assert serve_config(None, LocalOverrides(tiers=flags, threshold_bp=900), TwoTier()).thresholds_bp == (900,)
    assert serve_config(None, LocalOverrides(tiers=flags[:1]), None).thresholds_bp == ()
    src = NTier(multi_artifact)
    cfg = serve_config(None, LocalOverrides(tiers=(("gemma-2-9b-it", "http://a/v1"),), cost_weight_bp=5), src)
    assert cfg.multi_tier is not None
    gemma = [t.name for t in multi_artifact.tiers].index("gemma-2-9b-it")
    assert (cfg.multi_tier.columns, cfg.multi_tier.cost_weight_bp) == ((gemma,), 5)
    with pytest.raises(ConfigError, match="nothing to route to"):
        serve_config(None, LocalOverrides(), None)


def test_serve_refuses_knob_flags_of_the_other_artifact_kind(multi_artifact: RouterArtifact) -> None:
    flags = (("gemma-2-9b-it", "http://a/v1"), ("codegemma-7b", "http://b/v1"))
    with pytest.raises(ConfigError, match="--cost-weight-bp: applies to N-tier"):
        serve_config(None, LocalOverrides(tiers=flags, cost_weight_bp=1), TwoTier())
    with pytest.raises(ConfigError, match="--threshold-bp: an N-tier artifact"):
        serve_config(None, LocalOverrides(tiers=flags, threshold_bp=1), NTier(multi_artifact))


def test_a_two_tier_artifact_over_three_tiers_is_refused_naming_the_tiers_between() -> None:
    """Its one score separates the cheapest tier from the strongest: a tier between would never be chosen, so the
    policy (or the flags) are refused rather than served other than written."""
    two = policy({"thresholdBasisPoints": 4000}, served("a", "b"))
    assert serve_config(two, LocalOverrides(), TwoTier()).thresholds_bp == (4000,)
    with pytest.raises(ConfigError, match=r"policy p: spec.tiers with --tier: 3 tiers, .*so t1 would never be chosen"):
        serve_config(two, LocalOverrides(tiers=(("c", "http://c/v1"),)), TwoTier())
    three = policy({"thresholdBasisPoints": 4000}, served("a", "b", "c", "d"))
    with pytest.raises(ConfigError, match=r"policy p: spec.tiers: 4 tiers, but a two-tier .* so t1, t2 would never"):
        from_policy(three, thresholds=TwoTier())
    flags = (("s", "http://s/v1"), ("m", "http://m/v1"), ("l", "http://l/v1"))
    with pytest.raises(ConfigError, match=r"--tier: 3 tiers, but a two-tier .* so m would never be chosen"):
        serve_config(None, LocalOverrides(tiers=flags), TwoTier())


# -- tiers, secrets, listeners ---------------------------------------------------------------------------------------


def test_policy_tiers_are_urls_services_or_external_endpoints() -> None:
    tiers = [*served("x"), *policy().model_dump(by_alias=True)["spec"]["tiers"][:1]]
    pol = policy({"thresholdBasisPoints": 1}, tiers, namespace="team")
    plain, disc = from_policy(pol), from_policy(pol, discovery=True)
    assert (
        plain.tiers[0]
        == disc.tiers[0]
        == tier_at("t0", "http://t0.example/v1", served_model="t0", model="x", price_per_mtok=(1, 1))
    )
    assert plain.tiers[1].base_urls == ("http://p-tier-small.team.svc:8000/v1",)
    assert disc.tiers[1].service == ServiceRef(namespace="team", name="p-tier-small", port=8000)
    assert disc.tiers[1].base_urls == ()
    assert (disc.tiers[1].input_price_per_mtok, disc.tiers[1].output_price_per_mtok) == (0.1, 1.0)


def test_a_flag_replacing_a_keyed_tier_drops_its_key() -> None:
    tiers = served("x", "y")
    tiers[0]["endpoint"]["apiKeySecretRef"] = {"name": "s", "key": "k"}
    pol = policy({"thresholdBasisPoints": 1}, tiers)
    env = {"TIERGATE_API_KEY_T0": "sk-1"}
    assert from_policy(pol, environ=env).tiers[0].api_key == "sk-1"
    cfg = from_policy(pol, environ=env, tier_flags=[("t0", "http://local/v1")])
    assert (cfg.tiers[0].base_urls, cfg.tiers[0].api_key) == (("http://local/v1",), None)
    with pytest.raises(ConfigError, match=r"spec.tiers\[0\].endpoint.apiKeySecretRef: .*TIERGATE_API_KEY_T0"):
        from_policy(pol, environ={})


def test_listen_flags_else_policy_else_defaults() -> None:
    pol = policy({"httpPort": 9000, "grpcPort": 9001})
    assert listen(None, LocalOverrides()) == listen(policy(), LocalOverrides())
    assert (listen(None, LocalOverrides()).port, listen(None, LocalOverrides()).grpc_port) == (8080, 50051)
    assert (listen(pol, LocalOverrides()).port, listen(pol, LocalOverrides()).grpc_port) == (9000, 9001)
    where = listen(pol, LocalOverrides(host="0.0.0.0", port=1, grpc_port=-1))
    assert (where.host, where.port, where.grpc_port) == ("0.0.0.0", 1, None)


def test_local_config_is_a_valid_router_config() -> None:
    cfg = local_config([("a", "http://a/v1"), ("b", "http://b/v1")], threshold_bp=100)
    assert isinstance(cfg, RouterConfig)
    assert cfg.thresholds_bp == (100,)
    assert cfg.tiers[0] == tier_at("a", "http://a/v1")


def test_with_multi_tier_maps_a_finished_configs_tiers_to_another_artifact(multi_artifact: RouterArtifact) -> None:
    two = from_policy(policy({"thresholdBasisPoints": 1}, served("codegemma-7b", "gemma-2-9b-it")))
    assert two.multi_tier is None
    cfg = with_multi_tier(two, NTier(multi_artifact))
    names = [t.name for t in multi_artifact.tiers]
    assert cfg.multi_tier is not None
    assert [names[c] for c in cfg.multi_tier.columns] == ["codegemma-7b", "gemma-2-9b-it"]
    assert cfg.multi_tier.cost_weight_bp == 650
    assert with_multi_tier(two, NTier(multi_artifact), 3).multi_tier == dataclasses.replace(
        cfg.multi_tier, cost_weight_bp=3
    )
