"""Routing quality of the shipped two-tier router with each encoder runtime: APGR on the test splits.

    nice .venv/bin/python bench/router_encoder_quality.py [DATA_DIR]

The same artifact scores the test prompts of RouteLLM's MMLU and GSM8K files (rows with split == "test") with
embeddings from torch (the reference the head was trained on), ONNX Runtime fp32 and ONNX Runtime int8; prints
APGR per encoder and the difference from torch (the issue's bar: within 0.01). Embeddings are cached under
~/.cache/tiergate/embeddings (one folder per ONNX graph file, so a changed recipe is re-embedded), so a second
run only scores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _data import routing_data_dir

from tiergate.routing.artifact import load_artifact
from tiergate.routing.encoder import MINILM_DIM, MINILM_ID
from tiergate.routing.scorer import Scorer
from tiergate.training.data import load_outcomes
from tiergate.training.embeddings import CachedEncoder, cached_minilm, default_cache_dir
from tiergate.training.metrics import apgr
from tiergate_router.artifact_classifier import default_artifact_path
from tiergate_router.onnx_encoder import OnnxEncoder, ensure_onnx

DATA = Path(sys.argv[1]) if len(sys.argv) > 1 else routing_data_dir()


def encoders() -> dict[str, object]:
    out: dict[str, object] = {"torch": cached_minilm(progress=None)}
    for variant in ("onnx", "onnx-int8"):
        graph = ensure_onnx(variant)
        out[variant] = CachedEncoder(
            lambda g=graph: OnnxEncoder(g),
            encoder_id=MINILM_ID,
            dim=MINILM_DIM,
            cache_dir=default_cache_dir() / f"router-{graph.stem}",
        )
    return out


def main() -> int:
    art = load_artifact(default_artifact_path())
    weak, strong = (t.name for t in art.tiers)
    encs = encoders()
    for name in ("routellm-mmlu.jsonl", "routellm-gsm8k.jsonl"):
        data = load_outcomes([DATA / name], [weak, strong], split="test")
        ref = None
        for label, enc in encs.items():
            t0 = time.perf_counter()
            scores = Scorer(art, enc).score(data.prompts)  # type: ignore[arg-type]
            dt = time.perf_counter() - t0
            a = apgr(scores, data.scores[:, 0], data.scores[:, 1])
            ref = a if ref is None else ref
            print(
                f"{name} test ({len(data)} prompts), {label}: APGR {a:.4f} (torch {a - ref:+.4f}); "
                f"embedding+scoring {dt:.1f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
