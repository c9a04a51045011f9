"""Deterministic scorers for tests and benchmarks (not routers anyone should deploy)."""

from __future__ import annotations

from collections.abc import Sequence


class KeywordScorer:
    """Score 1.0 for prompts containing `keyword`, else `default`: lets a test decide which tier a prompt needs."""

    def __init__(self, keyword: str = "HARD", default: float = 0.1) -> None:
        self.keyword = keyword
        self.default = default
        self.batches: list[int] = []

    def __call__(self, prompts: Sequence[str]) -> list[float]:
        self.batches.append(len(prompts))
        return [1.0 if self.keyword in p else self.default for p in prompts]
