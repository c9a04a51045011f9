"""Router overhead with tenants on (API key, request and token limits and a daily budget counted in a local
redis-server) against off, p50 and p99.

    nice .venv/bin/python bench/tenants_bench.py [--requests N] [--rounds R]

Everything runs here, each server in its own process: a zero-latency fake vLLM backend (tests/support), Debian's
`redis-server` on loopback, and three routers started as users start them (`tiergate serve -f POLICY.yaml`) with the
same one-tier policy: without tenants (off); with a tenant whose limits and budget are never reached, so every
request pays the full check, the Lua script before it and the charge after it (on); the same tenant without a limit
store, counted in the router as the fallback does (local). The "on" router also lets requests without a key in
(`unauthenticated: Allow`): "anon" is that same process without the tenant's work, a comparison free of the luck of
three processes sharing the CPUs. No classification (one tier), so the differences are the front door's alone.
Requests go one at a time (concurrency 1) in rounds alternating the variants, so a drift of the machine touches all
alike; overhead = router percentile minus the backend's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.router_bench import free_port, pct, wait_http
from tests.support.procs import FakeProcess

KEY = "sk-bench-tenant-0123456789abcdef"
QUIET = ("--grpc-port", "-1", "--log-level", "WARNING")
# name, with a tenant, with the limit store
VARIANTS = (("off", False, False), ("on", True, True), ("local", True, False))


def policy(backend: str, tenants: bool, redis: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "tiers": [
            {
                "name": "only",
                "model": "bench-model",
                "servedModelName": "bench-model",
                "endpoint": {"url": backend},
                "price": {"inputPerMillion": "0.15", "outputPerMillion": "0.6"},
            }
        ],
        "router": {"replicas": 2},
    }
    if tenants:
        spec["tenants"] = [
            {
                "name": "bench",
                "apiKeySecretRef": {"name": "bench-key", "key": "apiKey"},
                "limits": {"requestsPerMinute": 100_000_000, "tokensPerMinute": 10_000_000_000},
                "budget": {"dailyUsd": "1000000"},
            }
        ]
    if redis is not None:
        spec["limitStore"] = {"redisAddress": redis}
        # Requests without a key are let in unchecked: the same process without the tenant's work (see `anon`).
        spec["unauthenticated"] = "Allow"
    return {"apiVersion": "tiergate.io/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "bench"}, "spec": spec}


def start_router(policy_file: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiergate.cli", "serve", "-f", str(policy_file), "--port", str(port), *QUIET],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, TIERGATE_TENANT_KEY_BENCH=KEY),
    )
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc, f"http://127.0.0.1:{port}/v1"


async def timed(s: aiohttp.ClientSession, url: str, n: int, headers: dict[str, str]) -> list[float]:
    out = []
    body = {"model": "bench-model", "max_tokens": 8, "messages": [{"role": "user", "content": "a short prompt"}]}
    for _ in range(n):
        t0 = time.perf_counter()
        async with s.post(f"{url}/chat/completions", json=body, headers=headers) as r:
            await r.read()
            if r.status != 200:
                raise SystemExit(f"{url}: HTTP {r.status}")
        out.append(time.perf_counter() - t0)
    return out


async def measure(urls: dict[str, str], n: int, rounds: int) -> dict[str, list[float]]:
    lat: dict[str, list[float]] = {k: [] for k in urls}
    auth = {name: {"Authorization": f"Bearer {KEY}"} for name in ("on", "local")}
    async with aiohttp.ClientSession() as s:
        for name, url in urls.items():  # warm-up: connections, the script cache
            await timed(s, url, 50, auth.get(name, {}))
        for _ in range(rounds):
            for name, url in urls.items():
                lat[name] += await timed(s, url, n // rounds, auth.get(name, {}))
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="requests per variant")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        redis = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        backend = FakeProcess("bench-model", name="bench")
        procs: list[subprocess.Popen[bytes]] = []
        try:
            urls = {"backend": backend.base_url}
            for name, tenants, store in (
                ("off", False, None),
                ("on", True, f"127.0.0.1:{port}"),
                ("local", True, None),
            ):
                f = Path(tmp) / f"{name}.yaml"
                f.write_text(yaml.safe_dump(policy(backend.base_url, tenants, store)))
                proc, urls[name] = start_router(f)
                procs.append(proc)
            urls["anon"] = urls["on"]  # the "on" router, requests without a key
            lat = asyncio.run(measure(urls, args.requests, args.rounds))
        finally:
            for p in procs:
                p.terminate()
            backend.kill()
            redis.kill()
    base = {q: pct(lat["backend"], q) for q in (0.5, 0.99)}
    print(f"requests per variant: {len(lat['backend'])}, concurrency 1, rounds {args.rounds}")
    print(f"backend directly: p50 {1000 * base[0.5]:.3f} ms, p99 {1000 * base[0.99]:.3f} ms")
    for name in ("off", "on", "local"):
        p50, p99 = pct(lat[name], 0.5), pct(lat[name], 0.99)
        print(
            f"router, tenants {name:>5}: p50 {1000 * p50:.3f} ms (overhead +{1000 * (p50 - base[0.5]):.3f} ms), "
            f"p99 {1000 * p99:.3f} ms (overhead +{1000 * (p99 - base[0.99]):.3f} ms)"
        )
    for a, b, what in (
        ("on", "off", "tenants on (Redis) - off"),
        ("local", "off", "tenants on (no limit store, counted in the router) - off"),
        ("on", "anon", "same router process, tenant (Redis) - no key"),
    ):
        d50, d99 = (pct(lat[a], q) - pct(lat[b], q) for q in (0.5, 0.99))
        print(f"{what}: p50 {1000 * d50:+.3f} ms, p99 {1000 * d99:+.3f} ms")


if __name__ == "__main__":
    main()
