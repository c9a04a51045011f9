"""Embed every prompt of the shared routing data once, into the embedding cache (~/.cache/tiergate/embeddings).

Run with `nice` (CPU is shared): `nice -n 10 .venv/bin/python bench/embed_routing_data.py [DATA_DIR]`.
Prints prompts per second per file. Training, evaluation and the slow tests then read vectors from the cache.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from _data import routing_data_dir

from tiergate.training.embeddings import cached_minilm

DATA = Path(sys.argv[1]) if len(sys.argv) > 1 else routing_data_dir()


def main() -> None:
    enc = cached_minilm()
    for name in ("routellm-gsm8k.jsonl", "routellm-mmlu.jsonl", "llmrouter-train.jsonl"):
        prompts = [json.loads(line)["prompt"] for line in (DATA / name).read_text().split("\n") if line.strip()]
        t0 = time.perf_counter()
        vecs = enc.encode(prompts)
        dt = time.perf_counter() - t0
        print(f"{name}: {len(prompts)} prompts, {vecs.shape}, {dt:.1f} s ({len(prompts) / max(dt, 1e-9):.1f}/s)")


if __name__ == "__main__":
    main()
