"""Multimodal requests: the cost of attachment detection on requests without attachments, and a decomposed
request's latency against the sum of the calls it is made of.

    nice .venv/bin/python bench/multimodal_bench.py [--iterations N] [--rounds R]

Detection: `modality.find_attachments` is the only step a request without attachments pays for (the rest of the
multimodal path runs only when it finds a part), so it is timed alone, per call, over typical bodies: one short user
message, a system + user pair, a 20-turn conversation, and content given as text parts. For scale, the same is shown
for bodies with an image and with audio (detection, then the policy's limits).

Decomposition: a router (in this process, on loopback) in front of fake vLLM tiers (tests/support) whose latencies
stand in for models: a text tier, a vision tier and a speech tier. One request with an image and audio is decomposed
(the policy's Decompose mode): the two specialist calls in parallel, then the text tier. Against it, the same three
calls made one after the other straight to the fakes (what a client would do by hand), and the lower bound the
router can reach (the slower specialist, then the text tier). Rounds alternate the two, so a drift of the machine
touches both alike.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.harness import Harness
from tiergate_router.decompose import specialist_body
from tiergate_router.modality import DECOMPOSE, AttachmentPolicy, check_attachments, find_attachments

IMAGE = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(30_000)).decode()
AUDIO = base64.b64encode(b"RIFF" + bytes(60_000)).decode()
# Stand-ins for model latencies (seconds): a captioning call, a transcription, a short text answer.
VISION_S, SPEECH_S, TEXT_S = 0.20, 0.30, 0.10


def bodies() -> dict[str, list[Any]]:
    turns: list[Any] = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(10):
        turns += [
            {"role": "user", "content": f"Question {i}: what about this part of the plan?"},
            {"role": "assistant", "content": f"Answer {i}: it depends on the budget and the deadline."},
        ]
    return {
        "one user message": [{"role": "user", "content": "What is the capital of France?"}],
        "system + user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain DNS."}],
        "20-turn conversation": turns,
        "text parts": [
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}
        ],
    }


def per_call_us(fn: Any, iterations: int) -> tuple[float, float]:
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


def detection(iterations: int) -> None:
    print("attachment detection per request (modality.find_attachments), microseconds")
    print(f"  {'body':<28} {'p50':>8} {'p99':>8}")
    for name, messages in bodies().items():
        p50, p99 = per_call_us(lambda m=messages: find_attachments(m), iterations)
        print(f"  {name:<28} {p50:8.2f} {p99:8.2f}")
    policy = AttachmentPolicy()
    for name, part in (
        ("with an image (+ limits)", {"type": "image_url", "image_url": {"url": IMAGE}}),
        ("with audio (+ limits)", {"type": "input_audio", "input_audio": {"data": AUDIO, "format": "wav"}}),
    ):
        messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
        p50, p99 = per_call_us(lambda m=messages: check_attachments(find_attachments(m), policy), iterations)
        print(f"  {name:<28} {p50:8.2f} {p99:8.2f}")


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url, json=body) as resp:
        out: dict[str, Any] = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {out}")
        return out


async def decomposition(h: Harness, rounds: int) -> None:
    request = {
        "model": "tiergate",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Does the speaker describe this picture?"},
                    {"type": "image_url", "image_url": {"url": IMAGE}},
                    {"type": "input_audio", "input_audio": {"data": AUDIO, "format": "wav"}},
                ],
            }
        ],
        "max_tokens": 8,
    }
    found = find_attachments(request["messages"])
    fakes = {name: h.fakes[name][0] for name in ("small", "vision", "speech")}
    text_only = dict(request, messages=[{"role": "user", "content": "Does the speaker describe this picture? ..."}])
    routed, by_hand = [], []
    async with aiohttp.ClientSession() as s:
        for r in range(rounds + 1):
            t0 = time.perf_counter()
            async with s.post(f"{h.url}/v1/chat/completions", json=request) as resp:
                await resp.read()
                assert resp.headers["x-tiergate-tiers"] == "small,vision,speech", resp.headers["x-tiergate-tiers"]
            t1 = time.perf_counter()
            await post(
                s,
                f"{fakes['vision'].base_url}/chat/completions",
                dict(specialist_body(request, found[0]), model="vision-model"),
            )
            await post(
                s,
                f"{fakes['speech'].base_url}/chat/completions",
                dict(specialist_body(request, found[1]), model="speech-model"),
            )
            await post(s, f"{fakes['small'].base_url}/chat/completions", dict(text_only, model="small-model"))
            t2 = time.perf_counter()
            if r:  # the first round warms connections and the classifier
                routed.append(t1 - t0)
                by_hand.append(t2 - t1)
    lower = max(VISION_S, SPEECH_S) + TEXT_S
    print(f"\ndecomposed request (image + audio), {rounds} rounds, milliseconds")
    print(f"  model latencies: vision {VISION_S * 1000:.0f}, speech {SPEECH_S * 1000:.0f}, text {TEXT_S * 1000:.0f}")
    print(f"  through the router (parallel specialists), p50   {statistics.median(routed) * 1000:8.1f}")
    print(f"  sum of the three calls one after another, p50     {statistics.median(by_hand) * 1000:8.1f}")
    print(f"  lower bound (slower specialist + text tier)       {lower * 1000:8.1f}")
    print(f"  router's overhead over the lower bound, p50       {(statistics.median(routed) - lower) * 1000:8.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    detection(args.iterations)
    h = Harness(
        (("small", 1), ("vision", 1), ("speech", 1)),
        grpc=False,
        modalities={"vision": frozenset({"text", "image"}), "speech": frozenset({"text", "audio"})},
    ).start()
    try:
        assert h.server is not None
        router = h.server.router
        cfg = dataclasses.replace(router.config, attachments=AttachmentPolicy(mixed_requests=DECOMPOSE))
        h.call(_apply(router, cfg))
        for name, latency in (("small", TEXT_S), ("vision", VISION_S), ("speech", SPEECH_S)):
            h.fakes[name][0].behaviour.latency_s = latency
            h.fakes[name][0].behaviour.record = False
        h.call(decomposition(h, args.rounds), timeout=600)
    finally:
        h.stop()
    return 0


async def _apply(router: Any, cfg: Any) -> None:
    router.apply_config(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
