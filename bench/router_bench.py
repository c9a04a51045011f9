"""Router benchmark: classification latency, router overhead, saturation throughput, and peer routers.

    nice .venv/bin/python bench/router_bench.py [--requests N] [--seconds S] [--peers vllm-router,litellm]

Everything runs on this machine, each server in its own process: a zero-latency fake vLLM backend
(tests/support/fake_vllm.py), the router started as users start it (`tiergate serve --tier ...`), and the
load generator (aiohttp) here. Printed figures:
- classification latency of one 64-token prompt, batch 1 (p50, p99), and batched throughput (prompts/s);
- router overhead over calling the backend directly, without classification (model = a tier name) and with it
  (model = "tiergate"), at concurrency 1 (p50, p99 of the per-request difference in the percentile);
- routed requests per second at saturation (concurrency 64), with and without classification;
- the same latency and saturation load through peer routers installed from PyPI in venvs of their own
  (`--peer-bin NAME=PATH`), and the ratios.
The load generator shares the two cores with the servers, so absolute figures are lower than on a dedicated
client machine; all variants pay the same client cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp

# The fake vLLM backend is a test double: it lives with the tests (tests/support), outside the installed package.
# Run by path, this script has only bench/ on sys.path; the checkout's root makes `tests.support` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.procs import FakeProcess

# Words that MiniLM's WordPiece vocabulary holds whole, so a prompt of n - 3 of them plus a number is n tokens.
WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog",
    "while", "people", "measure", "time", "of", "every", "single", "request", "sent",
)  # fmt: skip


def prompt_of_tokens(n: int, salt: int = 0) -> str:
    """n word pieces for MiniLM's tokenizer: [CLS], a small number (one piece), n - 3 words, [SEP]."""
    words = [WORDS[(i * 7 + salt) % len(WORDS)] for i in range(n - 3)]
    return f"{salt % 1000} " + " ".join(words)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def wait_http(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


# -- classification -------------------------------------------------------------------------------------------


def bench_classification(artifact: Path | None, n: int, encoder: str) -> dict[str, float]:
    """Artifact scoring (encoder + head) of one 64-token prompt at a time, then batches of 32."""
    from tokenizers import Tokenizer

    from tiergate_router.artifact_classifier import load_classifier
    from tiergate_router.onnx_encoder import model_dir

    scorer = load_classifier(artifact, encoder=encoder).scorer
    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()  # the file pads to 128; count the prompt's own pieces
    ntok = len(tok.encode(prompt_of_tokens(64)).ids)
    for i in range(5):
        scorer.score([prompt_of_tokens(64, i)])
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        scorer.score([prompt_of_tokens(64, 1000 + i)])
        lat.append(time.perf_counter() - t0)
    reps, size = 4, 32
    t0 = time.perf_counter()
    for r in range(reps):
        scorer.score([prompt_of_tokens(64, 5000 + r * size + i) for i in range(size)])
    thr = reps * size / (time.perf_counter() - t0)
    return {"tokens": ntok, "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99), "batched_per_s": thr}


# -- HTTP load ------------------------------------------------------------------------------------------------


async def latencies(url: str, model: str, n: int, unique: bool) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as s:
        for i in range(n + 20):
            body = {
                "model": model,
                "max_tokens": 8,
                "messages": [{"role": "user", "content": prompt_of_tokens(64, i if unique else 0)}],
            }
            t0 = time.perf_counter()
            async with s.post(f"{url}/chat/completions", json=body) as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"{url}: HTTP {r.status}")
            if i >= 20:  # warm-up excluded
                out.append(time.perf_counter() - t0)
    return out


async def saturation(url: str, model: str, seconds: float, concurrency: int) -> tuple[float, int]:
    done = 0
    errors = 0
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**9))
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def worker() -> None:
            nonlocal done, errors
            while time.perf_counter() < stop_at:
                body = {
                    "model": model,
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": prompt_of_tokens(64, next(counter))}],
                }
                try:
                    async with s.post(f"{url}/chat/completions", json=body) as r:
                        await r.read()
                        if r.status == 200:
                            done += 1
                        else:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0), errors


# -- servers ---------------------------------------------------------------------------------------------------


def start_router(backend: str, artifact: Path | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tiergate.cli",
        "serve",
        "--tier",
        f"small={backend}",
        "--tier",
        f"large={backend}",
        "--port",
        str(port),
        "--grpc-port",
        "-1",
        "--log-level",
        "WARNING",
    ]
    if artifact is not None:
        cmd += ["--router", str(artifact)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
    )
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc, f"http://127.0.0.1:{port}/v1"


def start_vllm_router(binary: str, backend: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    root = backend.removesuffix("/v1")
    proc = subprocess.Popen(
        [binary, "--worker-urls", root, "--policy", "round_robin", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{port}/health", 60)
    return proc, f"http://127.0.0.1:{port}/v1"


def start_litellm(binary: str, backend: str, model: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cfg = workdir / "litellm.yaml"
    cfg.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": model,
                        "litellm_params": {"model": f"openai/{model}", "api_base": backend, "api_key": "none"},
                    }
                ]
            }
        )
    )
    proc = subprocess.Popen(
        [binary, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", 120)
    return proc, f"http://127.0.0.1:{port}/v1"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400, help="sequential requests per latency run")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each saturation run")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--router", type=Path, default=None, help="classifier artifact (default: the shipped one)")
    ap.add_argument(
        "--peer-bin",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="peer router executable: vllm-router=PATH and/or litellm=PATH",
    )
    ap.add_argument("--skip-classification-bench", action="store_true")
    ap.add_argument("--encoders", default="torch,onnx,onnx-int8", help="encoders to time (comma-separated)")
    args = ap.parse_args()

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    if not args.skip_classification_bench:
        for encoder in args.encoders.split(","):
            c = bench_classification(args.router, args.requests, encoder)
            print(
                f"classification [{encoder}], {c['tokens']:.0f}-token prompt, batch 1: p50 {c['p50_ms']:.1f} ms, "
                f"p99 {c['p99_ms']:.1f} ms; batched (32): {c['batched_per_s']:.0f} prompts/s"
            )

    backend = FakeProcess("bench-model", name="b")
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="tiergate-bench-"))
    try:
        direct = asyncio.run(latencies(backend.base_url, "bench-model", args.requests, True))
        router, rurl = start_router(backend.base_url, args.router)
        procs.append(router)
        plain = asyncio.run(latencies(rurl, "small", args.requests, True))
        classified = asyncio.run(latencies(rurl, "tiergate", args.requests, True))
        print(f"direct to backend: p50 {1000 * pct(direct, 0.5):.2f} ms, p99 {1000 * pct(direct, 0.99):.2f} ms")
        for name, xs in (("router, no classification", plain), ("router, with classification", classified)):
            print(
                f"{name}: p50 {1000 * pct(xs, 0.5):.2f} ms (+{1000 * (pct(xs, 0.5) - pct(direct, 0.5)):.2f}), "
                f"p99 {1000 * pct(xs, 0.99):.2f} ms (+{1000 * (pct(xs, 0.99) - pct(direct, 0.99)):.2f})"
            )
        rps_direct, _ = asyncio.run(saturation(backend.base_url, "bench-model", args.seconds, args.concurrency))
        rps_plain, e1 = asyncio.run(saturation(rurl, "small", args.seconds, args.concurrency))
        rps_cls, e2 = asyncio.run(saturation(rurl, "tiergate", args.seconds, args.concurrency))
        print(
            f"saturation (concurrency {args.concurrency}): backend direct {rps_direct:.0f} req/s; router without "
            f"classification {rps_plain:.0f} req/s ({e1} errors); with classification {rps_cls:.0f} req/s "
            f"({e2} errors)"
        )
        router.terminate()
        router.wait(20)
        for spec in args.peer_bin:
            name, _, binary = spec.partition("=")
            if not shutil.which(binary) and not Path(binary).exists():
                print(f"{name}: {binary} not found, skipped")
                continue
            try:
                if name == "vllm-router":
                    proc, purl = start_vllm_router(binary, backend.base_url)
                elif name == "litellm":
                    proc, purl = start_litellm(binary, backend.base_url, "bench-model", tmp)
                else:
                    print(f"{name}: unknown peer, skipped")
                    continue
            except SystemExit as e:
                print(f"{name}: did not start ({e})")
                continue
            procs.append(proc)
            lat = asyncio.run(latencies(purl, "bench-model", args.requests, True))
            rps, err = asyncio.run(saturation(purl, "bench-model", args.seconds, args.concurrency))
            over = 1000 * (pct(lat, 0.5) - pct(direct, 0.5))
            ours = 1000 * (pct(plain, 0.5) - pct(direct, 0.5))
            print(
                f"{name}: p50 {1000 * pct(lat, 0.5):.2f} ms (+{over:.2f}), p99 {1000 * pct(lat, 0.99):.2f} ms; "
                f"saturation {rps:.0f} req/s ({err} errors). Ratios tiergate/{name}: overhead p50 "
                f"{ours / over if over > 0 else float('nan'):.2f}x, throughput {rps_plain / rps:.2f}x"
            )
            proc.terminate()
            proc.wait(20)
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        backend.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
