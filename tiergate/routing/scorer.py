"""Applying a router artifact: numpy only on the hot path (torch is needed only inside the encoder).

Contract (the router service calls this):

- `Scorer(artifact, encoder)` refuses an encoder whose `encoder_id` or `dim` differ from the artifact's.
- Two tiers (`kind == "two_tier"`, tiers `[weak, strong]`):
  `score(prompts) -> float64 [n]` in [0, 1], RouteLLM's convention: higher means the strong tier is needed.
  `route_strong(prompts, threshold_bp)` -> bool [n]: strong when `score >= threshold_bp / 10000`. The
  RoutingPolicy holds thresholds as integer basis points 0..10000 (no floats in a CRD spec): 0 sends everything
  to the strong tier, 10000 only prompts scoring exactly 1.
  `threshold_for_share(share)` -> basis points that give about that share of strong calls, read from the
  artifact's calibration table (measured on held-out training prompts).
- N tiers (`kind == "multi_tier"`): `quality(prompts) -> float64 [n, N]` predicted quality per tier;
  `choose(prompts, cost_weight_bp=None) -> int64 [n]` picks argmax(quality - lambda * price) with
  lambda = cost_weight_bp / 10000 (quality units per $/Mtok; default: the artifact's `default_cost_weight_bp`).
  `cost_weight_for_budget(budget)` -> basis points whose calibrated mean price is within the budget.
- The `*_embeddings` variants take precomputed encoder output `[n, dim]` (for batching, caching and tests),
  plus the prompt texts when the artifact lists prompt `features` (features.py; e.g. `log_chars`).

Ties in `choose` go to the cheaper tier (then the lower index), so an uninformative head never costs more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tiergate.routing.artifact import RouterArtifact
from tiergate.routing.errors import RoutingError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from tiergate.routing.encoder import Encoder

BP = 10000


def head_input(
    art: RouterArtifact, emb: npt.NDArray[np.floating], texts: Sequence[str] | None
) -> npt.NDArray[np.float32]:
    """Embeddings, followed by the artifact's standardised prompt features (which need the texts)."""
    import numpy as np

    from tiergate.routing.features import head_inputs

    x = np.asarray(emb, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != art.encoder.dim:
        raise RoutingError(f"embeddings of shape {x.shape} do not match encoder dim {art.encoder.dim}")
    if not art.features:
        return x
    if texts is None or len(texts) != len(x):
        raise RoutingError("this router uses prompt features: pass the prompt texts along with their embeddings")
    return head_inputs(art.features, x, texts)


def head_forward(
    art: RouterArtifact, emb: npt.NDArray[np.floating], texts: Sequence[str] | None = None
) -> npt.NDArray[np.float64]:
    """The head's raw output `[n, out_dim]`: weighted mean over members, each an MLP with its output map."""
    import numpy as np

    x = head_input(art, emb, texts)
    total = np.zeros((x.shape[0], art.out_dim), dtype=np.float64)
    wsum = 0.0
    for m in art.members:
        h = x
        for layer in m.layers:
            h = h @ layer.weight + layer.bias
            if layer.activation == "relu":
                h = np.maximum(h, 0.0)
        out = h.astype(np.float64)
        if m.output == "sigmoid":
            out = 1.0 / (1.0 + np.exp(-np.clip(out, -60.0, 60.0)))
        elif m.output == "softmax":
            e = np.exp(out - out.max(axis=1, keepdims=True))
            out = e / e.sum(axis=1, keepdims=True)
        if m.table is not None:
            out = out @ m.table.astype(np.float64)
        total += m.weight * out
        wsum += m.weight
    result: npt.NDArray[np.float64] = total / wsum
    return result


def scores_from_output(art: RouterArtifact, out: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Two-tier router score in [0, 1] from the head output (already in target space, see labels.py)."""
    import numpy as np

    res: npt.NDArray[np.float64] = np.clip(out[:, 0], 0.0, 1.0)
    return res


class Scorer:
    def __init__(self, artifact: RouterArtifact, encoder: Encoder | None) -> None:
        if encoder is not None and (encoder.encoder_id != artifact.encoder.id or encoder.dim != artifact.encoder.dim):
            raise RoutingError(
                f"artifact was trained on {artifact.encoder.id} (dim {artifact.encoder.dim}), encoder is "
                f"{encoder.encoder_id} (dim {encoder.dim})"
            )
        self.artifact = artifact
        self._encoder = encoder

    def _embed(self, prompts: Sequence[str]) -> npt.NDArray[np.float32]:
        if self._encoder is None:
            raise RoutingError("this scorer has no encoder: pass embeddings to the *_embeddings methods")
        return self._encoder.encode(list(prompts))

    def _need(self, kind: str) -> None:
        if self.artifact.kind != kind:
            raise RoutingError(f"this is a {self.artifact.kind} router; the call needs a {kind} one")

    # Two tiers -------------------------------------------------------------------------------------------------
    def score_embeddings(
        self, emb: npt.NDArray[np.floating], texts: Sequence[str] | None = None
    ) -> npt.NDArray[np.float64]:
        self._need("two_tier")
        return scores_from_output(self.artifact, head_forward(self.artifact, emb, texts))

    def score(self, prompts: Sequence[str]) -> npt.NDArray[np.float64]:
        return self.score_embeddings(self._embed(prompts), prompts)

    def route_strong(self, prompts: Sequence[str], threshold_bp: int | None = None) -> npt.NDArray[np.bool_]:
        bp = self.artifact.default_threshold_bp if threshold_bp is None else check_bp(threshold_bp)
        res: npt.NDArray[np.bool_] = self.score(prompts) >= bp / BP
        return res

    def threshold_for_share(self, share: float) -> int:
        """Basis points giving at most about `share` of strong calls on the calibration data."""
        self._need("two_tier")
        if not 0.0 <= share <= 1.0:
            raise RoutingError(f"target share {share} outside [0, 1]")
        rows = self.artifact.calibration
        if not rows:
            raise RoutingError("artifact has no calibration table")
        ok = [r for r in rows if float(r["strong_share"]) <= share + 1e-9]
        if not ok:
            return BP
        # Thresholds descend as share grows: the last row within the target is the lowest threshold within it.
        return int(min(ok, key=lambda r: int(r["threshold_bp"]))["threshold_bp"])

    # N tiers ---------------------------------------------------------------------------------------------------
    def quality_embeddings(
        self, emb: npt.NDArray[np.floating], texts: Sequence[str] | None = None
    ) -> npt.NDArray[np.float64]:
        self._need("multi_tier")
        return head_forward(self.artifact, emb, texts)

    def quality(self, prompts: Sequence[str]) -> npt.NDArray[np.float64]:
        return self.quality_embeddings(self._embed(prompts), prompts)

    def choose_embeddings(
        self, emb: npt.NDArray[np.floating], cost_weight_bp: int | None = None, texts: Sequence[str] | None = None
    ) -> npt.NDArray[np.int64]:
        return choose_from_quality(self.artifact, self.quality_embeddings(emb, texts), cost_weight_bp)

    def choose(self, prompts: Sequence[str], cost_weight_bp: int | None = None) -> npt.NDArray[np.int64]:
        return self.choose_embeddings(self._embed(prompts), cost_weight_bp, prompts)

    def cost_weight_for_budget(self, budget: float) -> int:
        """Smallest cost weight (bp) whose calibrated mean price is at most `budget` $/Mtok."""
        self._need("multi_tier")
        ok = [r for r in self.artifact.calibration if float(r["cost"]) <= budget + 1e-12]
        if not ok:
            raise RoutingError(f"no calibrated operating point costs at most {budget} $/Mtok")
        return int(min(ok, key=lambda r: int(r["cost_weight_bp"]))["cost_weight_bp"])


def check_bp(bp: int) -> int:
    if isinstance(bp, bool) or not isinstance(bp, int) or not 0 <= bp <= BP:
        raise RoutingError(f"threshold {bp!r} must be an integer number of basis points in 0..{BP}")
    return bp


def choose_from_quality(
    art: RouterArtifact, quality: npt.NDArray[np.float64], cost_weight_bp: int | None = None
) -> npt.NDArray[np.int64]:
    """argmax over tiers of quality - lambda * price; ties to the cheaper tier."""
    import numpy as np

    bp = art.default_cost_weight_bp if cost_weight_bp is None else cost_weight_bp
    if isinstance(bp, bool) or not isinstance(bp, int) or bp < 0:
        raise RoutingError(f"cost weight {bp!r} must be a non-negative integer number of basis points")
    prices = np.array([t.price for t in art.tiers], dtype=np.float64)
    util = quality - (bp / BP) * prices[None, :]
    # Cheapest first, so argmax's first-maximum rule sends ties to the cheaper tier.
    order = np.argsort(prices, kind="stable")
    pick = np.argmax(util[:, order], axis=1)
    res: npt.NDArray[np.int64] = order[pick].astype(np.int64)
    return res
