"""Where the benchmarks read the public routing data: the one setting the tests use too (tests/conftest.py),
TIERGATE_ROUTING_DATA, else `../shared/data/routing` beside the checkout. README.md, "Routing data", says where the
files come from and how to convert them."""

from __future__ import annotations

import os
from pathlib import Path


def routing_data_dir() -> Path:
    env = os.environ.get("TIERGATE_ROUTING_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "routing"
