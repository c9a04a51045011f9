"""Best-of-n benchmark: the latency best-of-n adds for n = 1, 2, 4, 8, and the reward server's pairs per second.

    nice .venv/bin/python bench/best_of_n_bench.py [--requests N] [--seconds S] [--answer-words W] [--no-stand-in]

Everything runs on this machine, each server in its own process, started as users start them: a zero-latency fake
vLLM tier (tests/support/fake_vllm.py) and `tiergate reward-server --model TINY` (tests/support/reward.py's tiny
random reward model: Llama, 2 layers, hidden 128, so the figures are the serving path's cost, not a real reward
model's compute), and the stand-in (`tiergate reward-server` without --model: MiniLM-L6, 22 M parameters).
Printed:
1. for each n: p50/p95 of one chat completion from the tier (what a request pays without best-of-n), and of one
   `RewardClient.score` call over n answers (the router's reward call: the latency best-of-n adds on top of drawing
   n samples, which a zero-latency tier makes free);
2. pairs scored per second: `RewardClient.score` calls of 16 answers (best-of-N's largest batch) at concurrency 4
   for S seconds, per scorer;
3. the same added latency measured through the router (`router_added_latency`): `tiergate serve --best-of-n
   small=N --reward-url URL` in front of the fake tier, a routed request (n samples, reranked) against one that
   forces the tier (one sample), pair by pair.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

# The fake tier and the reward-model helpers are test doubles (tests/support), outside the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.procs import FakeProcess
from tests.support.reward import reward_server, tiny_reward_model
from tests.support.router_serve import Serve
from tiergate_router.reward import RewardClient

NS = (1, 2, 4, 8)
# The timeout of every reward call here: far above any figure, so a slow machine measures instead of failing.
TIMEOUT_S = 60.0
PROMPT = "Explain in a few sentences why the sky is blue, for a curious ten-year-old."
WORDS = (
    "light", "from", "the", "sun", "is", "scattered", "by", "the", "air", "and", "blue", "light", "is",
    "scattered", "more", "than", "red", "light",
)  # fmt: skip


def answer(i: int, words: int) -> str:
    """A plausible answer of `words` words, different for every i (nothing is cached anywhere, but texts that all
    tokenise alike would flatter padding)."""
    return " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(words + i % 7))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def timed(call: Callable[[], Awaitable[object]], requests: int) -> list[float]:
    """Seconds per call, one call at a time, after 3 warm-up calls."""
    for _ in range(3):
        await call()
    out: list[float] = []
    for _ in range(requests):
        t0 = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t0)
    return out


def ms(xs: list[float]) -> str:
    return f"p50 {pct(xs, 0.5) * 1e3:7.2f} ms  p95 {pct(xs, 0.95) * 1e3:7.2f} ms"


async def tier_latency(session: aiohttp.ClientSession, base_url: str, requests: int) -> list[float]:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64}

    async def call() -> None:
        async with session.post(f"{base_url}/chat/completions", json=body) as r:
            await r.read()
            r.raise_for_status()

    return await timed(call, requests)


async def reward_latency(client: RewardClient, n: int, words: int, requests: int) -> list[float]:
    answers = [answer(i, words) for i in range(n)]

    async def call() -> None:
        await client.score(PROMPT, answers, timeout_s=TIMEOUT_S)

    return await timed(call, requests)


async def pairs_per_second(client: RewardClient, words: int, seconds: float, concurrency: int = 4) -> float:
    answers = [answer(i, words) for i in range(16)]
    await client.score(PROMPT, answers, timeout_s=TIMEOUT_S)
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await client.score(PROMPT, answers, timeout_s=TIMEOUT_S)
            done += len(answers)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0)


def router_added_latency(tier_url: str, reward_url: str, n: int, requests: int) -> list[float] | None:
    """Best-of-N through the router: `tiergate serve --tier small=TIER_URL --best-of-n small=N --reward-url
    REWARD_URL` (one tier: every routed request is sampled N times), each routed request timed beside a request that
    forces the same tier (`model: small`, one sample, no reward call); returns the per-pair differences in seconds:
    what best-of-n adds end to end (the n-choice answer, the reward call, the reranking)."""
    s = Serve("--tier", f"small={tier_url}", "--best-of-n", f"small={n}", "--reward-url", reward_url)

    def once(model: str) -> float:
        t0 = time.perf_counter()
        s.chat(PROMPT, model=model)
        return time.perf_counter() - t0

    try:
        for _ in range(3):
            once("tiergate")
            once("small")
        return [once("tiergate") - once("small") for _ in range(requests)]
    finally:
        s.stop()


async def measure(args: argparse.Namespace, tier: FakeProcess, scorers: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        base = await tier_latency(session, tier.base_url, args.requests)
        print(f"tier call (n = 1, zero-latency fake vLLM):      {ms(base)}")
        for label, url in scorers.items():
            client = RewardClient(url, None, session=session)
            print(f"\n{label}: {url}")
            for n in NS:
                lat = await reward_latency(client, n, args.answer_words, args.requests)
                print(f"  n = {n}: reward call (the added latency)    {ms(lat)}")
                routed = router_added_latency(tier.base_url, url, n, args.requests)
                print(f"         through the router                 {ms(routed) if routed else 'not measured'}")
            rate = await pairs_per_second(client, args.answer_words, args.seconds)
            print(f"  pairs/s (16 per call, 4 calls in flight): {rate:8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="timed calls per figure")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput run")
    ap.add_argument("--answer-words", type=int, default=60, help="words per answer (~80 tokens of MiniLM)")
    ap.add_argument("--no-stand-in", action="store_true", help="skip the stand-in scorer (MiniLM)")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_reward_model(Path(tmp))
        tier = FakeProcess("fake-model", name="tier")
        try:
            with reward_server("--model", str(model), "--served-model-name", "tiny-rm") as tiny:
                if args.no_stand_in:
                    asyncio.run(measure(args, tier, {"tiny reward model": tiny.url}))
                else:
                    with reward_server() as stand_in:
                        scorers = {"tiny reward model": tiny.url, "stand-in (MiniLM)": stand_in.url}
                        asyncio.run(measure(args, tier, scorers))
        finally:
            tier.terminate()
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
