"""Where a test finds the public routing data's files (the `routing_data` fixture, tests/conftest.py, uses it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def require_routing_files(folder: Path, wanted: tuple[str, ...]) -> Path:
    """`folder`, or skip (fail under TIERGATE_REQUIRE_ROUTING_DATA=1) naming the files it lacks."""
    missing = [name for name in wanted if not (folder / name).is_file()]
    if missing:
        msg = (
            f"routing data not found: {', '.join(missing)} missing in {folder}. Set TIERGATE_ROUTING_DATA to the "
            "folder holding the converted RouteLLM, LLMRouter and AlpacaEval outcome files (README.md, 'Routing "
            "data')."
        )
        if os.environ.get("TIERGATE_REQUIRE_ROUTING_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return folder
