"""Run-time routing: what a router loads and applies (Hybrid LLM style), numpy only at import.

Modules and their contracts (the router service depends on these; keep them stable):

- `artifact`: the versioned router artifact (`RouterArtifact`, `load_artifact`, `save_artifact`,
  `ArtifactSlot` keeping the last good one) and the shipped defaults (`DEFAULT_TWO_TIER`, `DEFAULT_MULTI_TIER`).
- `operating_points`: the typed calibration table and the one function per target (share, PGR, budget,
  quality, score -> tier, predicted quality -> tier) that training, evaluation, calibration and the router call.
- `encoder`: the encoder identity (`MINILM_ID`, `MINILM_DIM`, `MAX_TOKENS`), the `Encoder` protocol and the
  reference MiniLM implementation (torch, imported only when one is built).
- `scorer`: `Scorer` applies an artifact's head with numpy only: `score()` for two tiers, `quality()` and
  `choose()` for N tiers; thresholds in basis points.
- `features`: prompt features computed from the text (`log_chars`), appended to the embedding.
- `tiers`: how a policy's tiers meet an N-tier artifact's (which artifact tier each serves, whether the prices are
  the artifact's up to one factor); standard library only, shared by the router and the operator.
- `errors`: one exception type per boundary, all `RoutingError`.

The offline toolchain (labels, data, fitting, evaluation, plots, the embedding cache, the `train`/`eval`/
`calibrate` commands) is `tiergate.training`, which builds on this package; never the other way round.
Importing this package imports nothing heavy (no numpy, no torch). docs/routing.md has the figures.
"""
