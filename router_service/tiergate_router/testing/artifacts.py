"""Real router artifacts with predictable decisions, for tests and the demo's smoke run."""

from __future__ import annotations

from pathlib import Path


def constant_artifact(path: Path, bias: float, *, default_threshold_bp: int = 5000) -> Path:
    """A real two-tier artifact (MiniLM encoder id, numpy head) whose head ignores the prompt: every score is
    sigmoid(bias). Exercises the real loader, encoder and scorer while keeping the routing decision known."""
    import numpy as np

    from tiergate.routing.artifact import EncoderSpec, Layer, Member, RouterArtifact, Tier, save_artifact
    from tiergate.routing.encoder import MINILM_DIM, MINILM_ID

    layer = Layer(np.zeros((MINILM_DIM, 1), np.float32), np.array([bias], np.float32), "identity")
    art = RouterArtifact(
        encoder=EncoderSpec(id=MINILM_ID, dim=MINILM_DIM),
        kind="two_tier",
        label_mode="deterministic",
        tiers=[Tier("small", 0.1), Tier("large", 1.0)],
        members=[Member(layers=[layer], output="sigmoid")],
        calibration=[{"threshold_bp": default_threshold_bp, "strong_share": 0.3, "quality": 0.5}],
        provenance={"purpose": "tests: constant score"},
        default_threshold_bp=default_threshold_bp,
    )
    save_artifact(art, path)
    return path
