"""Router memory under distinct large prompts: peak RSS of a real `tiergate serve` while it routes N prompts of
100 KB-1 MB, every one different in the part the encoder reads (so every one misses the classifier's cache and
is added to it).

    nice .venv/bin/python bench/router_memory.py [--count 20000] [--concurrency 8] [--oversize-every 1000]

Servers: two fake vLLM tiers (tests/support/fake_vllm.py, told not to keep request bodies) and the router started
as users start it, with a real two-tier artifact whose head ignores the prompt (tests/support/artifacts.py), so
the real encoder still runs on every prompt and the cache fills. Every `--oversize-every`-th request is larger
than the router's body limit and must get 413; every other request must get 200. Printed: progress every
`--report-every` requests, then the router's RSS after start-up and warm-up, its peak RSS (the kernel's VmHWM,
which no sampling can miss), the classifier cache's bounds and the request outcomes. Exit status 1 when a request
failed for any other reason than its size, or when the peak exceeds `--max-rss-mib` (when given).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

# Run by path, this script has only bench/ on sys.path; the checkout's root makes `tests.support` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.router_bench import free_port, wait_http
from tests.support.artifacts import constant_artifact
from tests.support.procs import FakeProcess

MIN_PROMPT = 100_000
# 1 MB, decimal: the fake tiers read bodies with aiohttp's default 1 MiB limit, which a 1,000,000-character prompt
# plus its JSON envelope stays under.
MAX_PROMPT = 1_000_000
# The router's default request body limit (RouterConfig.max_body_bytes); oversize requests exceed it.
BODY_LIMIT = 4 * 1024 * 1024
WORDS = (
    "route", "model", "prompt", "tier", "quality", "cost", "token", "batch", "encoder", "cache",
    "memory", "bound", "request", "answer", "question", "budget", "latency", "server", "client", "policy",
)  # fmt: skip


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: its resident set now and at its peak so far."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def text_pool(size: int, seed: int) -> bytes:
    """`size` bytes of ASCII words: the bodies of the prompts are slices of it (JSON-safe as they are)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += " ".join(rng.choice(WORDS) for _ in range(1000)).encode() + b" "
    return bytes(out[:size])


def body(i: int, size: int, pool: bytes, offset: int) -> bytes:
    """A chat request whose prompt is `size` bytes, distinct from every other in its first characters."""
    head = f"request {i} ".encode()
    content = head + pool[offset : offset + size - len(head)]
    return b'{"model":"tiergate","max_tokens":1,"messages":[{"role":"user","content":"' + content + b'"}]}'


async def drive(url: str, args: argparse.Namespace, pid: int, outcomes: Counter[str], stop: asyncio.Event) -> None:
    rng = random.Random(args.seed)
    pool = text_pool(MAX_PROMPT * 2, args.seed)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.count):
        queue.put_nowait(i)
    t0 = time.perf_counter()
    done = 0
    timeout = aiohttp.ClientTimeout(total=600)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while not stop.is_set():
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            oversize = args.oversize_every > 0 and i % args.oversize_every == args.oversize_every - 1
            size = BODY_LIMIT + 1024 if oversize else rng.randint(MIN_PROMPT, MAX_PROMPT)
            data = body(i, size, pool * 5 if oversize else pool, rng.randint(0, MAX_PROMPT - 1))
            try:
                async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError) as e:
                outcomes[f"{'oversize' if oversize else 'ok-size'} {type(e).__name__}"] += 1
            else:
                expected = 413 if oversize else 200
                outcomes["expected" if status == expected else f"{'oversize' if oversize else 'ok-size'} {status}"] += 1
            done += 1
            if done % args.report_every == 0:
                rss, peak = rss_kib(pid)
                print(
                    f"{done:6d} requests  {done / (time.perf_counter() - t0):6.1f}/s  router RSS {rss / 1024:7.1f} MiB"
                    f"  peak {peak / 1024:7.1f} MiB  unexpected {sum(outcomes.values()) - outcomes['expected']}",
                    flush=True,
                )

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=20_000, help="requests to send (default 20000)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    p.add_argument("--oversize-every", type=int, default=1000, help="every Nth request exceeds the body limit")
    p.add_argument("--report-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--encoder", default="auto", help="tiergate serve --encoder (default auto)")
    p.add_argument("--cache-entries", type=int, default=None, help="tiergate serve --classifier-cache-entries")
    p.add_argument("--cache-bytes", type=int, default=None, help="tiergate serve --classifier-cache-bytes")
    p.add_argument("--inflight-bytes", type=int, default=None, help="tiergate serve --max-inflight-body-bytes")
    p.add_argument("--max-rss-mib", type=float, default=None, help="fail when the router's peak RSS exceeds this")
    args = p.parse_args()

    procs: list[subprocess.Popen[bytes]] = []
    fakes = [FakeProcess(m, name=m, extra=["--no-record"]) for m in ("small-model", "large-model")]
    with tempfile.TemporaryDirectory() as tmp:
        art = constant_artifact(Path(tmp) / "router.json", bias=0.0)
        port = free_port()
        cmd = [
            sys.executable, "-m", "tiergate.cli", "serve",
            "--tier", f"small={fakes[0].base_url}", "--tier", f"large={fakes[1].base_url}",
            "--router", str(art), "--encoder", args.encoder,
            "--port", str(port), "--grpc-port", "-1", "--log-level", "WARNING",
        ]  # fmt: skip
        if args.cache_entries is not None:
            cmd += ["--classifier-cache-entries", str(args.cache_entries)]
        if args.cache_bytes is not None:
            cmd += ["--classifier-cache-bytes", str(args.cache_bytes)]
        if args.inflight_bytes is not None:
            cmd += ["--max-inflight-body-bytes", str(args.inflight_bytes)]
        router = subprocess.Popen(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
        procs.append(router)
        outcomes: Counter[str] = Counter()
        stop = asyncio.Event()
        try:
            wait_http(f"http://127.0.0.1:{port}/health")
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            # Warm-up: the encoder's first batches allocate its arenas; what follows is what traffic adds.
            warm = argparse.Namespace(**{**vars(args), "count": 16, "oversize_every": 0, "report_every": 10**9})
            asyncio.run(drive(url, warm, router.pid, Counter(), asyncio.Event()))
            rss0, _ = rss_kib(router.pid)
            print(f"router pid {router.pid}: RSS after start-up and warm-up {rss0 / 1024:.1f} MiB", flush=True)
            t0 = time.perf_counter()

            def interrupted(*_: object) -> None:
                stop.set()

            signal.signal(signal.SIGINT, interrupted)
            signal.signal(signal.SIGTERM, interrupted)
            asyncio.run(drive(url, args, router.pid, outcomes, stop))
            elapsed = time.perf_counter() - t0
            rss, peak = rss_kib(router.pid)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
            for f in fakes:
                f.kill()
    sent = sum(outcomes.values())
    unexpected = sent - outcomes["expected"]
    print(f"sent {sent} of {args.count} requests in {elapsed:.0f} s ({sent / elapsed:.1f}/s), c={args.concurrency}")
    print(f"router RSS (MiB): {rss0 / 1024:.1f} after warm-up, {rss / 1024:.1f} at the end, peak {peak / 1024:.1f}")
    print(f"classifier cache: entries {args.cache_entries or 'default'}, bytes {args.cache_bytes or 'default'}")
    print(f"outcomes: {dict(outcomes)} (expected: 200, or 413 for the oversize ones); unexpected: {unexpected}")
    if unexpected:
        return 1
    if args.max_rss_mib is not None and peak / 1024 > args.max_rss_mib:
        print(f"peak RSS {peak / 1024:.1f} MiB exceeds --max-rss-mib {args.max_rss_mib}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
