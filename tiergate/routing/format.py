"""The router artifact's file format, standard library only: the constants and the checksum that both the
run-time loader (`tiergate.routing.artifact`, which needs numpy to build arrays) and the operator (which checks an
artifact before it rolls the router, and whose image has no numpy) read. One definition, so the two can never
disagree on what a valid file is."""

from __future__ import annotations

import hashlib
import json
from typing import Any

FORMAT = "tiergate.router"
FORMAT_VERSION = 1
# A ConfigMap holds at most 1 MiB in total (keys, metadata and all); keep a margin for those.
MAX_BYTES = 900 * 1024
# "candidates": BEST-Route (model, n) candidates, per-candidate prices and output tokens (routing/candidates.py).
KINDS = ("two_tier", "multi_tier", "candidates")
LABEL_MODES = ("deterministic", "probabilistic", "transformed", "difference", "quality")
ACTIVATIONS = ("relu", "identity")
OUTPUTS = ("sigmoid", "identity", "softmax")


def digest(doc: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of every field but `sha256` (what the artifact's `sha256` field holds)."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()
