"""The one cache root every part of tiergate writes under: `$TIERGATE_CACHE`, else the XDG cache folder.

Below it, each user keeps its own folder: `bin/` (devcluster binaries), `embeddings/` (training's embedding
cache), `onnx/` (the router's exported encoder graphs), `models/` (the demo's model). One variable moves them
all, so an image or a CI machine sets it once. Outside any repository on purpose: a fresh clone (CI) reuses
what an earlier run on the machine built.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TIERGATE_CACHE"


def cache_root() -> Path:
    """`$TIERGATE_CACHE`, else `$XDG_CACHE_HOME/tiergate`, else `~/.cache/tiergate` (read on every call, so a
    test or a command that sets the variable is honoured without a restart)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiergate"
