"""Applying a router artifact: numpy only on the hot path (torch is needed only inside the encoder).

Contract (the router service calls this):

- `Scorer(artifact, encoder)` refuses an encoder whose `encoder_id` or `dim` differ from the artifact's.
- Two tiers (`kind == "two_tier"`, tiers `[weak, strong]`):
  `score(prompts) -> float64 [n]` in [0, 1], RouteLLM's convention: higher means the strong tier is needed.
  `route_strong(prompts, threshold_bp)` -> bool [n]: strong when `score >= threshold_bp / 10000`. The
  RoutingPolicy holds thresholds as integer basis points 0..10000 (no floats in a CRD spec): 0 sends everything
  to the strong tier, 10000 only prompts scoring exactly 1.
  Targets (a share, a PGR) become thresholds through `operating_points` on the artifact's calibration table.
- N tiers (`kind == "multi_tier"`): `quality(prompts) -> float64 [n, N]` predicted quality per tier;
  `choose(prompts, cost_weight_bp=None) -> int64 [n]` picks argmax(quality - lambda * price) with
  lambda = cost_weight_bp / 10000 (quality units per $/Mtok; default: the artifact's `default_cost_weight_bp`),
  by `operating_points.choose_tiers`; a budget becomes a cost weight through `operating_points` too.
- Candidates (`kind == "candidates"`, BEST-Route): `quality(prompts)` as for N tiers, one column per candidate;
  `choose` applies `candidates.choose_rows` (cost per prompt from the prompt's length, lambda per USD per 1k
  prompts) over every candidate; a router that serves only some passes `allowed` to `candidates.choose_candidate`.
- The `*_embeddings` variants take precomputed encoder output `[n, dim]` (for batching, caching and tests),
  plus the prompt texts when the artifact lists prompt `features` (features.py; e.g. `log_chars`).

Ties in `choose` go to the cheaper tier (then the lower index), so an uninformative head never costs more.
Every decision rule is `operating_points`'; this module only computes the head's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tiergate.routing.artifact import Member, RouterArtifact
from tiergate.routing.errors import RoutingError
from tiergate.routing.operating_points import check_bp, choose_tiers, reaches

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from tiergate.routing.encoder import Encoder


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


def members_forward(members: Sequence[Member], x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """The head's raw output `[n, out_dim]` on head inputs `x`: the weighted mean over members, each an MLP with
    its output map (and task table). Takes the members alone, so training applies fold heads without an artifact."""
    import numpy as np

    total: npt.NDArray[np.float64] | None = None
    wsum = 0.0
    for m in members:
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
        total = m.weight * out if total is None else total + m.weight * out
        wsum += m.weight
    if total is None:
        raise RoutingError("the head has no members")
    result: npt.NDArray[np.float64] = total / wsum
    return result


def head_forward(
    art: RouterArtifact, emb: npt.NDArray[np.floating], texts: Sequence[str] | None = None
) -> npt.NDArray[np.float64]:
    """The artifact head's raw output `[n, out_dim]` for embeddings (and texts, for prompt features)."""
    return members_forward(art.members, head_input(art, emb, texts))


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

    def _need(self, *kinds: str) -> None:
        if self.artifact.kind not in kinds:
            raise RoutingError(f"this is a {self.artifact.kind} router; the call needs a {' or '.join(kinds)} one")

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
        return reaches(self.score(prompts), bp)

    # N tiers ---------------------------------------------------------------------------------------------------
    def quality_embeddings(
        self, emb: npt.NDArray[np.floating], texts: Sequence[str] | None = None
    ) -> npt.NDArray[np.float64]:
        self._need("multi_tier", "candidates")
        return head_forward(self.artifact, emb, texts)

    def quality(self, prompts: Sequence[str]) -> npt.NDArray[np.float64]:
        return self.quality_embeddings(self._embed(prompts), prompts)

    def choose_embeddings(
        self, emb: npt.NDArray[np.floating], cost_weight_bp: int | None = None, texts: Sequence[str] | None = None
    ) -> npt.NDArray[np.int64]:
        bp = self.artifact.default_cost_weight_bp if cost_weight_bp is None else cost_weight_bp
        if self.artifact.kind == "candidates":
            return self._choose_candidates(self.quality_embeddings(emb, texts), texts, bp)
        return choose_tiers(self.quality_embeddings(emb, texts), [t.price for t in self.artifact.tiers], bp)

    def _choose_candidates(
        self, quality: npt.NDArray[np.float64], texts: Sequence[str] | None, bp: int
    ) -> npt.NDArray[np.int64]:
        import numpy as np

        from tiergate.routing.candidates import candidate_costs, candidates_of, choose_rows, input_tokens

        if texts is None or len(texts) != len(quality):
            raise RoutingError("a candidates router prices each prompt by its length: pass the prompt texts")
        cands = candidates_of(self.artifact)
        costs = np.stack([candidate_costs(cands, input_tokens(t)) for t in texts])
        return choose_rows(quality, costs, bp)

    def choose(self, prompts: Sequence[str], cost_weight_bp: int | None = None) -> npt.NDArray[np.int64]:
        return self.choose_embeddings(self._embed(prompts), cost_weight_bp, prompts)
