"""Shadow routing (spec.shadow) over requests with attachments (spec.router.attachments): which tier answers, and
when a request is judged. Tiers: small (text), vision (text, image), large (text), cheapest first; the fakes refuse a
part they do not take, as vLLM does, and "read" one they take as `image:<digest>` (tests.support.fake_vllm)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.support.fake_vllm import attachment_digest
from tests.support.harness import Harness
from tests.support.reward import FakeRewardServer
from tests.support.waiting import wait_for
from tests.unit.test_router_multimodal import IMAGE_URL, VISION, ask, clear, image_part, part_types, user_content
from tiergate_router.config import ShadowConfig
from tiergate_router.modality import DECOMPOSE, AttachmentPolicy
from tiergate_router.shadow import PRIMARY

PAIRS = ("routed_vs_baseline", "baseline_vs_cheapest")


@pytest.fixture(scope="module")
def h() -> Iterator[Harness]:
    harness = Harness((("small", 1), ("vision", 1), ("large", 1)), grpc=False, modalities={"vision": VISION}).start()
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def reward(h: Harness) -> Iterator[FakeRewardServer]:
    r = FakeRewardServer(score=lambda text: float(len(text)))
    h.call(r.start())
    yield r
    h.call(r.stop())


def _apply(h: Harness, reward: FakeRewardServer, mode: str, baseline: str, **attachments: Any) -> None:
    server = h.server
    assert server is not None
    shadow = ShadowConfig(mode=mode, baseline_tier=baseline, sample_rate_bp=10000, reward_url=reward.url)
    policy = dataclasses.replace(AttachmentPolicy(), **attachments)
    cfg = dataclasses.replace(server.router.config, shadow=shadow, attachments=policy)

    async def apply() -> None:
        server.router.apply_config(cfg)

    h.call(apply())
    clear(h)


def _judged(h: Harness) -> float:
    return sum(h.metric("tiergate_router_shadow_judged_total", {"artifact": PRIMARY, "pair": p}) for p in PAIRS)


def _dropped(h: Harness) -> float:
    return h.metric("tiergate_router_shadow_dropped_total", {"reason": "attachments"})


def _ask(h: Harness, messages: list[Any]) -> tuple[str, str, str]:
    """(answering tier, contributing tiers, decision) of one routed chat request."""
    client = openai.OpenAI(base_url=f"{h.url}/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="tiergate", messages=messages)
    raw.parse()
    return raw.headers["x-tiergate-tier"], raw.headers["x-tiergate-tiers"], raw.headers["x-tiergate-decision"]


def test_mirror_does_not_judge_an_image_against_a_tier_that_cannot_take_it(
    h: Harness, reward: FakeRewardServer
) -> None:
    _apply(h, reward, "Mirror", "large")
    judged, dropped = _judged(h), _dropped(h)
    # The easy text chooses small; the image narrows the choice to vision, which answers as without shadowing.
    assert _ask(h, ask(image_part())) == ("vision", "vision", "small")
    # Its pair's other side, large, takes text only: no background call, counted.
    assert _dropped(h) == dropped + 1
    assert not h.fakes["large"][0].stats.requests
    # The same request without the image is judged against large as usual.
    assert _ask(h, [{"role": "user", "content": "easy question"}]) == ("small", "small", "small")
    wait_for("the text request judged", lambda: _judged(h) == judged + 1)
    assert _dropped(h) == dropped + 1


def test_decomposed_requests_are_judged_on_the_specialists_text(h: Harness, reward: FakeRewardServer) -> None:
    _apply(h, reward, "Mirror", "large", mixed_requests=DECOMPOSE)
    judged, dropped = _judged(h), _dropped(h)
    assert _ask(h, ask(image_part())) == ("small", "small,vision", "small")
    wait_for("the decomposed request judged", lambda: _judged(h) == judged + 1)
    assert _dropped(h) == dropped
    # The background call to the baseline carried the rewritten body: the image as the vision tier's description.
    [mirrored] = h.fakes["large"][0].stats.requests
    assert part_types(mirrored) == ["text", "text"]
    assert f"image:{attachment_digest(IMAGE_URL)}" in user_content(mirrored)[1]["text"]


def test_baseline_mode_with_attachments(h: Harness, reward: FakeRewardServer) -> None:
    # Decompose: the baseline answers from the specialist's text, and the router's own choice (small) is judged
    # against it on that text.
    _apply(h, reward, "Baseline", "large", mixed_requests=DECOMPOSE)
    judged = _judged(h)
    assert _ask(h, ask(image_part())) == ("large", "large,vision", "small")
    wait_for("the baseline's answer judged", lambda: _judged(h) == judged + 1)
    [to_small] = h.fakes["small"][0].stats.requests
    assert part_types(to_small) == ["text", "text"]
    # RouteToCapableTier: a baseline that cannot take the image gives way to the first tier of its fallback chain
    # that can; the pair (small, large) cannot be judged on an image either.
    _apply(h, reward, "Baseline", "large")
    dropped = _dropped(h)
    assert _ask(h, ask(image_part())) == ("vision", "vision", "small")
    assert _dropped(h) == dropped + 1
    assert not h.fakes["large"][0].stats.requests
