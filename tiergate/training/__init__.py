"""The offline routing toolchain: labels, outcome data, fitting, evaluation, plots, the embedding cache, and the
`tiergate train|eval|calibrate` commands.

Modules:

- `data`: reading per-prompt outcome files (JSONL) with errors naming the line.
- `labels`: Hybrid LLM label modes with one sample per model; `train`: fitting head members (torch).
- `calibration`: measuring an artifact's calibration table (`tiergate.routing.operating_points`) on data.
- `metrics`: APGR, CPT, cost-quality points; `evaluate`: eval reports and PNG plots.
- `embeddings`: the on-disk embedding cache around the MiniLM encoder (`cached_minilm`).
- `candidate_data`: best-of-N candidate (`MODEL@N`) prices, one-sample output tokens and per-prompt costs;
  `candidate_eval`: their eval report and k-fold cross-validation at a budget (USD per 1k prompts).
- `common`, `cmd_train`, `cmd_eval`, `cmd_calibrate`: the subcommands.

Layering: this package reads `tiergate.routing` (the run-time package: artifact, heads, operating points,
encoder identity); nothing in `tiergate.routing` or the router imports this package. torch, matplotlib and tqdm
are imported inside the functions that need them, so importing a module here stays light.
"""
