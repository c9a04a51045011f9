"""Real router artifacts with predictable decisions, for tests and the demo's smoke run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def constant_artifact(path: Path, bias: float, *, default_threshold_bp: int = 5000) -> Path:
    """A real two-tier artifact (MiniLM encoder id, numpy head) whose head ignores the prompt: every score is
    sigmoid(bias). Exercises the real loader, encoder and scorer while keeping the routing decision known."""
    import numpy as np

    from tiergate.routing.artifact import EncoderSpec, Layer, Member, RouterArtifact, Tier, save_artifact
    from tiergate.routing.encoder import MINILM_DIM, MINILM_ID
    from tiergate.routing.operating_points import CalibrationTable, ThresholdPoint

    layer = Layer(np.zeros((MINILM_DIM, 1), np.float32), np.array([bias], np.float32), "identity")
    art = RouterArtifact(
        encoder=EncoderSpec(id=MINILM_ID, dim=MINILM_DIM),
        kind="two_tier",
        label_mode="deterministic",
        tiers=[Tier("small", 0.1), Tier("large", 1.0)],
        members=[Member(layers=[layer], output="sigmoid")],
        calibration=CalibrationTable(thresholds=(ThresholdPoint(default_threshold_bp, 0.3, 0.5, 0.0),)),
        provenance={"purpose": "tests: constant score"},
        default_threshold_bp=default_threshold_bp,
    )
    save_artifact(art, path)
    return path


def constant_multi_tier_artifact(
    path: Path, tiers: list[tuple[str, float]], quality: list[float], *, default_cost_weight_bp: int = 0
) -> Path:
    """A real N-tier artifact whose head ignores the prompt: every prompt's predicted quality per tier is
    `quality`, so the choice argmax(quality - lambda * price) is known for every cost weight."""
    import numpy as np

    from tiergate.routing.artifact import EncoderSpec, Layer, Member, RouterArtifact, Tier, save_artifact
    from tiergate.routing.encoder import MINILM_DIM, MINILM_ID
    from tiergate.routing.operating_points import CalibrationTable, CostWeightPoint

    n = len(tiers)
    layer = Layer(np.zeros((MINILM_DIM, n), np.float32), np.array(quality, np.float32), "identity")
    art = RouterArtifact(
        encoder=EncoderSpec(id=MINILM_ID, dim=MINILM_DIM),
        kind="multi_tier",
        label_mode="deterministic",
        tiers=[Tier(name, price) for name, price in tiers],
        members=[Member(layers=[layer], output="identity")],
        calibration=CalibrationTable(cost_weights=(CostWeightPoint(default_cost_weight_bp, 0.0, 0.0, (0.0,) * n),)),
        provenance={"purpose": "tests: constant quality"},
        default_cost_weight_bp=default_cost_weight_bp,
    )
    save_artifact(art, path)
    return path


# The sample policy's tiers as the shipped N-tier artifact's: served model names and half of its prices (input and
# output each, so that input + output is the artifact's price).
SAMPLE_AS_SHIPPED_N_TIER = {
    "small": ("gemma-2-9b-it", "0.1"),
    "mid": ("llama-3.1-8b-instruct", "0.2"),
    "large": ("llama-3.1-nemotron-51b-instruct", "0.9"),
}


def fit_to_shipped_n_tier(doc: dict[str, Any]) -> None:
    """The sample policy (a raw document, changed in place) made servable by the shipped N-tier artifact: tiers it
    knows (`small`, `mid`, `large`), at its prices, without the sample's two-tier knob."""
    doc["spec"]["router"].pop("targetStrongShareBasisPoints", None)
    for t in doc["spec"]["tiers"]:
        model, half = SAMPLE_AS_SHIPPED_N_TIER[t["name"]]
        t.update(servedModelName=model, price={"inputPerMillion": half, "outputPerMillion": half})
