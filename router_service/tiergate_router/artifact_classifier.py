"""The production classifier: a router artifact from `tiergate train` (MiniLM encoder + trained head).

torch is imported only when the encoder is built (inside `load_classifier`), never on import of this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiergate.routing.artifact import DEFAULT_TWO_TIER, RouterArtifact, load_artifact
from tiergate.routing.errors import NoOperatingPoint, RoutingError
from tiergate.routing.operating_points import BP, cost_weight_for_budget, threshold_for_share
from tiergate.routing.scorer import Scorer
from tiergate_router.classifier import MicroBatcher, prompt_chars
from tiergate_router.errors import ClassifierError, ConfigError


def default_artifact_path() -> Path:
    """The two-tier router shipped with the package (`tiergate/routing/default/`, trained on the public data's
    train split; its recipe is in docs/routing.md). Without an artifact named, the router scores one number per
    prompt against a threshold: the two-tier default."""
    path = DEFAULT_TWO_TIER
    if not path.is_file():
        raise ClassifierError(f"the shipped default router {path} is missing; pass an artifact explicitly")
    return path


@dataclass
class LoadedClassifier:
    """A loaded artifact. Two-tier: the classifier yields one score per prompt. N-tier (`multi_tier`): it yields the
    predicted quality of every artifact tier, and the router chooses with `tiergate.routing.operating_points`' rule.
    Targets (a budget, a share) become knobs through `operating_points` on the artifact's calibration table, the
    functions `tiergate calibrate` prints from."""

    classifier: MicroBatcher[Any]
    source: Path
    artifact: RouterArtifact
    scorer: Scorer

    @property
    def kind(self) -> str:
        return self.artifact.kind

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.artifact.tiers)

    @property
    def default_cost_weight_bp(self) -> int:
        return int(self.artifact.default_cost_weight_bp)

    def cost_weight_for_budget_bp(self, budget: float) -> int:
        """`budgetPerMillion` -> cost weight: `operating_points.cost_weight_for_budget`, as `tiergate calibrate
        --budget` chooses (best calibrated quality whose mean price fits)."""
        try:
            return cost_weight_for_budget(self.artifact.calibration.cost_weights, budget).cost_weight_bp
        except NoOperatingPoint as e:
            # A policy that asks for the impossible: a config error, so a reload keeps the last good policy.
            raise ConfigError(f"budgetPerMillion {budget}: {self.source}: {e}") from e

    @property
    def default_threshold_bp(self) -> int:
        return int(self.artifact.default_threshold_bp)

    def threshold_for_share_bp(self, share_bp: int) -> int:
        """`targetStrongShareBasisPoints` -> threshold: `operating_points.threshold_for_share`, as `tiergate
        calibrate --share` chooses. A share no threshold keeps to is refused like an unaffordable budget (it used to
        route nothing, silently)."""
        try:
            return threshold_for_share(self.artifact.calibration.thresholds, share_bp / BP).threshold_bp
        except NoOperatingPoint as e:
            raise ConfigError(f"targetStrongShareBasisPoints {share_bp}: {self.source}: {e}") from e
        except RoutingError as e:
            raise ClassifierError(
                f"{self.source}: cannot turn a target share of {share_bp} bp into a threshold: {e}"
            ) from e


ENCODERS = ("auto", "torch", "onnx", "onnx-int8")


def load_classifier(
    path: Path | None = None,
    *,
    encoder: str = "auto",
    encoder_factory: Callable[[RouterArtifact], Any] | None = None,
    max_batch: int = 32,
    max_wait_s: float = 0.0,
) -> LoadedClassifier:
    """Load an artifact and its encoder; ClassifierError (naming the file) for a corrupt or unusable one."""
    src = Path(path) if path is not None else default_artifact_path()
    try:
        art = load_artifact(src)
    except (RoutingError, OSError, ValueError) as e:
        raise ClassifierError(f"cannot load router artifact {src}: {e}") from e
    if art.kind not in ("two_tier", "multi_tier", "candidates"):
        raise ClassifierError(
            f"{src}: a {art.kind} artifact; the router serves two_tier, multi_tier and candidates artifacts"
        )
    try:
        enc = encoder_factory(art) if encoder_factory is not None else _encoder(art, encoder)
        scorer = Scorer(art, enc)
    except (RoutingError, OSError, ValueError) as e:
        raise ClassifierError(f"{src}: {e}") from e

    def score(prompts: Sequence[str]) -> list[float]:
        return [min(max(float(x), 0.0), 1.0) for x in scorer.score(list(prompts))]

    def quality(prompts: Sequence[str]) -> list[tuple[float, ...]]:
        return [tuple(float(v) for v in row) for row in scorer.quality(list(prompts))]

    # Prompts are cut to what the encoder's token window can use before they are hashed or tokenized.
    cut = prompt_chars(int(art.encoder.max_tokens))
    batcher: MicroBatcher[Any] = (
        MicroBatcher(quality, max_batch=max_batch, max_wait_s=max_wait_s, max_chars=cut)
        if art.kind in ("multi_tier", "candidates")  # one predicted quality per tier / candidate
        else MicroBatcher(score, max_batch=max_batch, max_wait_s=max_wait_s, max_chars=cut)
    )
    return LoadedClassifier(batcher, src, art, scorer)


def _encoder(art: RouterArtifact, choice: str) -> Any:
    """The artifact's encoder: ONNX Runtime int8 when onnxruntime is installed ("auto"), torch otherwise, or the
    variant asked for. int8 because it won here on both latency and batched throughput while the shipped router's
    APGR stayed within the 0.01 bar (bench/router_encoder_quality.py; figures in docs/router.md). Any encoder id in
    `onnx_encoder.ENCODER_DIRS` runs on ONNX Runtime; torch serves MiniLM only (`tiergate.routing.encoder`)."""
    from tiergate_router import onnx_encoder

    enc_id = art.encoder.id
    if enc_id not in onnx_encoder.ENCODER_DIRS:
        raise ClassifierError(
            f"artifact needs encoder {enc_id}; this router serves {', '.join(onnx_encoder.ENCODER_DIRS)}"
        )
    if choice not in ENCODERS:
        raise ClassifierError(f"unknown encoder {choice!r} (known: {', '.join(ENCODERS)})")
    if choice == "auto":
        import importlib.util

        choice = "onnx-int8" if importlib.util.find_spec("onnxruntime") is not None else "torch"
    if choice == "torch":
        from tiergate.routing.encoder import MINILM_ID, MiniLMEncoder

        if enc_id != MINILM_ID:
            raise ClassifierError(f"the torch encoder serves {MINILM_ID} only; use --encoder onnx for {enc_id}")
        return MiniLMEncoder(max_tokens=art.encoder.max_tokens)
    path = onnx_encoder.ensure_onnx(choice, encoder_id=enc_id)
    return onnx_encoder.OnnxEncoder(path, max_tokens=art.encoder.max_tokens, encoder_id=enc_id)
