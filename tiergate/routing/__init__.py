"""Router training, evaluation, calibration and inference (Hybrid LLM style).

Modules and their contracts (the router service depends on these; keep them stable):

- `artifact`: the versioned router artifact (`RouterArtifact`, `load_artifact`, `save_artifact`,
  `ArtifactSlot` keeping the last good one).
- `encoder`: the `Encoder` protocol and the MiniLM (torch) implementation; `CachedEncoder` for training runs.
- `scorer`: `Scorer` applies an artifact's head with numpy only: `score()` for two tiers, `quality()` and
  `choose()` for N tiers; thresholds in basis points.
- `features`: prompt features computed from the text (`log_chars`), appended to the embedding.
- `data`: reading per-prompt outcome files (JSONL) with errors naming the line.
- `metrics`: APGR, CPT, cost-quality curves; `evaluate`: eval reports and PNG plots.
- `labels`: Hybrid LLM label modes with one sample per model; `train`: fitting head members (torch).
- `cmd_train`, `cmd_eval`, `cmd_calibrate`: the `tiergate train|eval|calibrate` subcommands.

Importing this package imports nothing heavy (no numpy, no torch). docs/routing.md has the figures.
"""
