"""Small builders shared by the routing unit tests (tiny synthetic artifacts, a deterministic fake encoder)."""

from __future__ import annotations

import hashlib

import numpy as np

from tiergate.routing.artifact import EncoderSpec, Layer, Member, RouterArtifact, Tier
from tiergate.routing.operating_points import CalibrationTable, CostWeightPoint, ThresholdPoint

DIM = 8


def tiny_artifact(kind: str = "two_tier", seed: int = 0, tiers: int = 2) -> RouterArtifact:
    rng = np.random.default_rng(seed)
    out = 1 if kind == "two_tier" else tiers
    members = [
        Member(
            layers=[
                Layer(rng.normal(size=(DIM, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32), "relu"),
                Layer(
                    rng.normal(size=(4, out)).astype(np.float32), rng.normal(size=out).astype(np.float32), "identity"
                ),
            ],
            output="sigmoid",
            weight=1.0,
        )
        for _ in range(2)
    ]
    n = 2 if kind == "two_tier" else tiers
    return RouterArtifact(
        encoder=EncoderSpec(id="test/fake-encoder", dim=DIM),
        kind=kind,
        label_mode="difference" if kind == "two_tier" else "quality",
        tiers=[Tier(name=f"m{i}", price=0.2 * (i + 1)) for i in range(n)],
        members=members,
        calibration=CalibrationTable(
            thresholds=(
                ThresholdPoint(threshold_bp=6000, strong_share=0.2, quality=0.7, pgr=0.5),
                ThresholdPoint(threshold_bp=4000, strong_share=0.5, quality=0.75, pgr=0.8),
                ThresholdPoint(threshold_bp=0, strong_share=1.0, quality=0.8, pgr=1.0),
            )
        )
        if kind == "two_tier"
        else CalibrationTable(
            cost_weights=(
                CostWeightPoint(cost_weight_bp=0, cost=0.6, quality=0.7, shares=(0.0,) * n),
                CostWeightPoint(cost_weight_bp=1000, cost=0.3, quality=0.6, shares=(0.0,) * n),
            )
        ),
        provenance={"files": [], "split": "train", "rows": 0, "seed": seed},
    )


class FakeEncoder:
    """Deterministic unit vectors from a hash of the text; counts calls so cache tests can see hits."""

    encoder_id = "test/fake-encoder"
    dim = DIM

    def __init__(self) -> None:
        self.calls = 0
        self.texts = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).normal(size=DIM)
            out[i] = v / np.linalg.norm(v)
        return out


# (name, model, n, input $/Mtok, output $/Mtok, mean one-sample output tokens) of `tiny_candidates_artifact`.
TINY_CANDIDATES = (
    ("small@1", "small", 1, 0.2, 0.2, 300.0),
    ("small@4", "small", 4, 0.2, 0.2, 300.0),
    ("big@1", "big", 1, 10.0, 30.0, 500.0),
)


def tiny_candidates_artifact(seed: int = 0, reference: str = "big@1") -> RouterArtifact:
    """A small `candidates` artifact (BEST-Route) over `TINY_CANDIDATES`, random head, for run-time tests."""
    from dataclasses import replace

    base = tiny_artifact("multi_tier", seed=seed, tiers=len(TINY_CANDIDATES))
    tiers = [
        Tier(
            name=name,
            price=pin + pout,
            model=model,
            n=n,
            input_usd_per_mtok=pin,
            output_usd_per_mtok=pout,
            output_tokens=tok,
        )
        for name, model, n, pin, pout, tok in TINY_CANDIDATES
    ]
    return replace(base, kind="candidates", tiers=tiers, reference=reference)
