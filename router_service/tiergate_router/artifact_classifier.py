"""The production classifier: a router artifact from `tiergate train` (MiniLM encoder + trained head).

torch is imported only when the encoder is built (inside `load_classifier`), never on import of this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiergate_router.classifier import MicroBatcher
from tiergate_router.errors import ClassifierError

BP = 10000


# The router service scores one number per prompt against a threshold, so it ships with the two-tier default.
DEFAULT_ARTIFACT = "two-tier.json"


def default_artifact_path() -> Path:
    """The two-tier router shipped with the package (`tiergate/routing/default/`, trained on the public data's
    train split; its rebuild recipe is in that package's docstring)."""
    import tiergate.routing

    path = Path(tiergate.routing.__file__).parent / "default" / DEFAULT_ARTIFACT
    if not path.is_file():
        raise ClassifierError(f"the shipped default router {path} is missing; pass an artifact explicitly")
    return path


@dataclass
class LoadedClassifier:
    classifier: MicroBatcher
    source: Path
    artifact: Any
    scorer: Any

    @property
    def default_threshold_bp(self) -> int:
        return int(self.artifact.default_threshold_bp)

    def threshold_for_share_bp(self, share_bp: int) -> int:
        try:
            return int(self.scorer.threshold_for_share(share_bp / BP))
        except Exception as e:
            raise ClassifierError(
                f"{self.source}: cannot turn a target share of {share_bp} bp into a threshold: {e}"
            ) from e


ENCODERS = ("auto", "torch", "onnx", "onnx-int8")


def load_classifier(
    path: Path | None = None,
    *,
    encoder: str = "auto",
    encoder_factory: Callable[[Any], Any] | None = None,
    max_batch: int = 32,
    max_wait_s: float = 0.002,
) -> LoadedClassifier:
    """Load an artifact and its encoder; ClassifierError (naming the file) for a corrupt or unusable one."""
    from tiergate.routing.artifact import load_artifact
    from tiergate.routing.errors import RoutingError
    from tiergate.routing.scorer import Scorer

    src = Path(path) if path is not None else default_artifact_path()
    try:
        art = load_artifact(src)
    except (RoutingError, OSError, ValueError) as e:
        raise ClassifierError(f"cannot load router artifact {src}: {e}") from e
    if art.kind != "two_tier":
        raise ClassifierError(
            f"{src}: a {art.kind} artifact; the router service routes with two_tier artifacts "
            "(one score, thresholds in the policy)"
        )
    try:
        enc = encoder_factory(art) if encoder_factory is not None else _minilm(art, encoder)
        scorer = Scorer(art, enc)
    except (RoutingError, OSError, ValueError) as e:
        raise ClassifierError(f"{src}: {e}") from e

    def score(prompts: Sequence[str]) -> list[float]:
        return [float(x) for x in scorer.score(list(prompts))]

    return LoadedClassifier(MicroBatcher(score, max_batch=max_batch, max_wait_s=max_wait_s), src, art, scorer)


def _minilm(art: Any, choice: str) -> Any:
    """The encoder: ONNX Runtime int8 when onnxruntime is installed ("auto"), torch otherwise, or the variant asked
    for. int8 because it won here on both latency and batched throughput, and routing quality did not move: the
    shipped router's APGR with int8 embeddings was 0.6700 vs 0.6699 (torch) on MMLU test and 0.6244 vs 0.6241 on
    GSM8K test (bench/router_encoder_quality.py)."""
    from tiergate_router import onnx_encoder

    if art.encoder.id != onnx_encoder.MINILM_ID:
        raise ClassifierError(f"artifact needs encoder {art.encoder.id}; this router ships {onnx_encoder.MINILM_ID}")
    if choice not in ENCODERS:
        raise ClassifierError(f"unknown encoder {choice!r} (known: {', '.join(ENCODERS)})")
    if choice == "auto":
        import importlib.util

        choice = "onnx-int8" if importlib.util.find_spec("onnxruntime") is not None else "torch"
    if choice == "torch":
        from tiergate.routing.encoder import MiniLMEncoder

        return MiniLMEncoder(max_tokens=art.encoder.max_tokens)
    path = onnx_encoder.ensure_onnx(choice)
    return onnx_encoder.OnnxMiniLMEncoder(path, max_tokens=art.encoder.max_tokens)
