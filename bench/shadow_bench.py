"""Shadow routing benchmark: what Mirror mode costs the client, at the router.

    nice .venv/bin/python bench/shadow_bench.py [--requests N] [--sample-bp BP] [--max-concurrent N]
                                                [--interval-ms MS] [--judge fake|tiny]

Two routers started as users start them (`tiergate serve`), side by side over the same fake vLLM tiers (each in its
own process, tests/support/fake_vllm.py) and the same classifier artifact (a constant one: every prompt goes to
`small`): one plain, one with `--shadow Mirror=large --shadow-sample-bp BP`, judged by `--judge`: `tiny`, a real
`tiergate reward-server` running the tiny reward model (tests/support/reward.py; a transformer on this machine's
CPU), or `fake`, the scripted pooling server (FakeRewardServer, in its own process: scores by length, costs next to
nothing). In a cluster the judge runs in its own pod (on a GPU); on a 2-core machine its CPU time is taken from the
routers and the load generator, which `fake` leaves out. The load generator sends one request at a time,
alternating between the two routers (so drifting machine load hits both alike), `--interval-ms` apart (0: back to
back, the background calls then always overlap the next request), and times each client request from send to the
last byte. Printed: p50 and p99 of each, their differences (the issue's bound: under 1 ms), the median of the
paired differences, and the mirrored calls the shadow router made, judged and dropped (its /metrics).

Mirrored calls run after the client's answer is complete and are never awaited by it; on a machine with few cores
they still share the CPU with the next request (the baseline tier's fake, the reward model and the router's own
background task), which is what this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

# Run by path, this script has only bench/ on sys.path; the checkout's root makes `tests.support` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.artifacts import constant_artifact
from tests.support.procs import FakeProcess
from tests.support.reward import reward_server, tiny_reward_model

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.2)


def start_router(
    tiers: dict[str, FakeProcess], artifact: Path, extra: list[str]
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "tiergate.cli", "serve", "--port", str(port), "--grpc-port", "-1"]
    argv += ["--router", str(artifact), *extra]
    for name, t in tiers.items():
        argv += ["--tier", f"{name}={t.base_url}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # Open for the router's whole life (it writes there while it serves), so not a `with` block.
    log = tempfile.TemporaryFile()  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc)
    except RuntimeError:
        proc.kill()
        log.seek(0)
        raise RuntimeError(f"{' '.join(argv)}: {log.read().decode(errors='replace')[-3000:]}") from None
    return proc, url


FAKE_JUDGE = """
import asyncio, signal
from tests.support.reward import FakeRewardServer

async def main():
    judge = FakeRewardServer()
    await judge.start()
    print("READY", judge.url, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await judge.stop()

asyncio.run(main())
"""


@contextmanager
def judge(kind: str, tmp: Path) -> Iterator[str]:
    """The reward server's root URL: the tiny reward model (`tiergate reward-server`) or the scripted fake."""
    if kind == "tiny":
        model = tiny_reward_model(tmp)
        with reward_server("--model", str(model), "--served-model-name", "tiny-rm") as rm:
            yield rm.url
        return
    proc = subprocess.Popen([sys.executable, "-c", FAKE_JUDGE], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"fake judge did not start: {line!r}")
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(10)


async def alternate(urls: list[str], n: int, warmup: int, interval_s: float) -> list[list[float]]:
    """Client latency (seconds) per router, one request at a time, alternating routers."""
    out: list[list[float]] = [[] for _ in urls]
    async with aiohttp.ClientSession() as session:
        for i in range(warmup + n):
            for url in urls if i % 2 == 0 else list(reversed(urls)):
                idx = urls.index(url)
                body = {"model": "tiergate", "messages": [{"role": "user", "content": f"question number {i}"}]}
                t0 = time.perf_counter()
                async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                    await r.read()
                    assert r.status == 200, r.status
                if i >= warmup:
                    out[idx].append(time.perf_counter() - t0)
                await asyncio.sleep(interval_s)
    return out


def metric_lines(url: str, prefix: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/metrics") as r:
        text = r.read().decode()
    return [line for line in text.splitlines() if line.startswith(prefix)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="timed requests per router")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--sample-bp", type=int, default=10000, help="Mirror's sample rate (10000: every request)")
    ap.add_argument("--max-concurrent", type=int, default=16)
    ap.add_argument("--interval-ms", type=float, default=50.0, help="pause after each request (0: back to back)")
    ap.add_argument("--judge", choices=("fake", "tiny"), default="fake", help="the reward server (see above)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()}")
    procs: list[subprocess.Popen[bytes]] = []
    tiers = {"small": FakeProcess("small-model", name="small"), "large": FakeProcess("large-model", name="large")}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            artifact = constant_artifact(Path(tmp) / "router.json", bias=-3.0)  # every prompt to `small`
            with judge(args.judge, Path(tmp)) as judge_url:
                off, off_url = start_router(tiers, artifact, [])
                procs.append(off)
                mirror = [
                    *("--shadow", "Mirror=large", "--shadow-sample-bp", str(args.sample_bp)),
                    *("--shadow-max-concurrent", str(args.max_concurrent), "--shadow-reward-url", judge_url),
                ]
                on, on_url = start_router(tiers, artifact, mirror)
                procs.append(on)
                lat_off, lat_on = asyncio.run(
                    alternate([off_url, on_url], args.requests, args.warmup, args.interval_ms / 1000)
                )
                time.sleep(2)  # let the last mirrored calls finish before reading the counters
                p50 = (pct(lat_off, 0.5) * 1e3, pct(lat_on, 0.5) * 1e3)
                p99 = (pct(lat_off, 0.99) * 1e3, pct(lat_on, 0.99) * 1e3)
                print(
                    f"requests per router: {args.requests} (after {args.warmup} warm-up), one at a time, "
                    f"{args.interval_ms:g} ms apart; judge: {args.judge}"
                )
                print(f"mirroring off: p50 {p50[0]:.3f} ms  p99 {p99[0]:.3f} ms")
                print(f"mirroring on:  p50 {p50[1]:.3f} ms  p99 {p99[1]:.3f} ms  (sample {args.sample_bp} bp)")
                print(f"difference:    p50 {p50[1] - p50[0]:+.3f} ms  p99 {p99[1] - p99[0]:+.3f} ms  (bound: < 1 ms)")
                # Request i of both routers ran back to back under the same machine load: the median of their
                # differences is less sensitive to that load's drift than the difference of the two medians.
                paired = [(b - a) * 1e3 for a, b in zip(lat_off, lat_on, strict=True)]
                print(f"paired (on - off, same i): median {pct(paired, 0.5):+.3f} ms")
                for line in metric_lines(on_url, "tiergate_router_shadow_"):
                    if "_bucket" not in line and not line.startswith("#"):
                        print(f"  {line}")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        for t in tiers.values():
            t.terminate()
    print(f"load at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
