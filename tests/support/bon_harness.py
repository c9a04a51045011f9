"""A router harness with best-of-N on its `small` tier, a scripted reward server (tests/support/reward.py's
FakeRewardServer: it scores by a function of the text, or misbehaves on cue), and fake tiers whose samples are
known texts: what the best-of-N tests over HTTP and gRPC share."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable

from tests.support.harness import Harness
from tests.support.reward import FakeRewardServer, length_score
from tiergate_router.config import BestOfNConfig

# The samples the best-of-N tier (`small`) answers with, in the order it draws them. The scripted reward scores a
# text by its length (`length_score`), so the longest sample is the best; it is neither the first nor the last.
SAMPLES = ("small short", "small a much longer and better answer", "small mid answer", "small tiny")
BEST = SAMPLES[1]
N = 4


def words(texts: tuple[str, ...]) -> int:
    """Completion tokens the fake tier reports for these texts (one per word, summed over the samples)."""
    return sum(len(t.split()) for t in texts)


def closed_port_url() -> str:
    """A URL nothing listens on (bound, then released): a reward model that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class BestOfNHarness:
    """Tiers `small` (best-of-N, one fake endpoint) and `large` (the reference), a KeywordScorer classifier
    (`HARD` in a prompt -> large) and a FakeReward. `configure` sets the best-of-N config on the running router."""

    def __init__(self) -> None:
        self.h = Harness((("small", 1), ("large", 1))).start()
        self.reward = FakeRewardServer()
        self.h.call(self.reward.start())
        self.small = self.h.fakes["small"][0]
        self.large = self.h.fakes["large"][0]

    def configure(
        self,
        *,
        mode: str = "ok",
        score: Callable[[str], float] = length_score,
        reward_url: str | None = None,
        **changes: object,
    ) -> BestOfNConfig:
        """Best-of-N on `small` (N = 4) with the reward server at `reward_url` (default: the FakeRewardServer, in
        `mode`, scoring by `score`), `changes` replacing BestOfNConfig fields; the fake tiers back to their
        defaults, with `small` answering SAMPLES."""
        self.reward.mode = mode
        self.reward.score = score
        self.reward.requests.clear()
        self.small.behaviour = dataclasses.replace(
            self.small.behaviour, samples=SAMPLES, ignore_n=False, fail_status=None
        )
        self.small.stats.requests.clear()
        self.large.stats.requests.clear()
        b = BestOfNConfig(
            tier="small",
            max_samples=N,
            reward_url=reward_url or self.reward.url,
            reward_model=None,
            reference_tier="large",
        )
        b = dataclasses.replace(b, **changes)  # type: ignore[arg-type]
        server = self.h.server
        assert server is not None
        cfg = dataclasses.replace(server.router.config, best_of_n=b)

        async def apply() -> None:
            server.router.apply_config(cfg)

        self.h.call(apply())
        return b

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.h.metric(name, labels)

    def stop(self) -> None:
        self.h.call(self.reward.stop())
        self.h.stop()
