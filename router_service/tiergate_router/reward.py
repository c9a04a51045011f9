"""STAND-IN for helper "reward"'s module (wip/reward): the reward client, to the interface of
docs in bestroute-design.md section 2, just enough for the best-of-N request path and its tests. The lead takes
wip/reward's file at merge.

The client scores all answers to one prompt with ONE batched call to vLLM's pooling API (`POST {url}/pooling`
with `{"model": M, "input": [text, ...]}`); each (prompt, answer) pair is rendered as plain text.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import aiohttp

REWARD_ERROR_REASONS = ("timeout", "unavailable", "bad_response")


class RewardError(Exception):
    """The reward model gave no usable scores; `reason` is one of REWARD_ERROR_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def render_pair(prompt: str, answer: str) -> str:
    return f"User: {prompt}\n\nAssistant: {answer}"


class RewardClient:
    def __init__(self, url: str, model: str | None, *, session: aiohttp.ClientSession | None = None) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self._session = session
        self._own = session is None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def score(self, prompt: str, answers: Sequence[str], *, timeout_s: float) -> list[float]:
        try:
            async with asyncio.timeout(timeout_s):
                return await self._score(prompt, answers)
        except TimeoutError as e:
            raise RewardError("timeout", f"no scores within {timeout_s:.3g} s") from e
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise RewardError("unavailable", f"reward server unreachable: {e!r}") from e
        except (aiohttp.ClientError, ValueError) as e:
            raise RewardError("bad_response", f"reward server answered badly: {e!r}") from e

    async def _score(self, prompt: str, answers: Sequence[str]) -> list[float]:
        session = self._get_session()
        model = self.model
        if model is None:
            async with session.get(f"{self.url}/v1/models") as r:
                data: Any = await r.json(content_type=None)
            model = self.model = str(data["data"][0]["id"])
        body = {"model": model, "input": [render_pair(prompt, a) for a in answers]}
        async with session.post(f"{self.url}/pooling", json=body) as r:
            if r.status != 200:
                raise RewardError("bad_response", f"reward server answered HTTP {r.status}")
            out: Any = await r.json(content_type=None)
        try:
            rows = sorted(out["data"], key=lambda d: int(d["index"]))
            scores = [float(d["data"][0] if isinstance(d["data"], list) else d["data"]) for d in rows]
        except (KeyError, TypeError, IndexError) as e:
            raise RewardError("bad_response", f"unreadable pooling response: {e!r}") from e
        if len(scores) != len(answers) or not all(math.isfinite(x) for x in scores):
            raise RewardError("bad_response", "wrong number of scores, or a score that is not a finite number")
        return scores

    async def aclose(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()
        self._session = None
