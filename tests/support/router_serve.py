"""`tiergate serve` in a subprocess, as a user starts it, for the router's end-to-end tests; a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# `/metrics` lines after exactly one policy reload applied / refused: what a hot-reload test waits for, since the
# policy watcher reports every read of a changed file there.
RELOADED_ONCE = 'tiergate_router_policy_reloads_total{result="success"} 1.0'
REFUSED_ONCE = 'tiergate_router_policy_reloads_total{result="error"} 1.0'


def serve_refusal(*args: str, timeout: float = 60) -> str:
    """`tiergate serve ARGS` expected to refuse its arguments: asserts a usage error (exit 2) without a traceback and
    returns its stderr, for the caller to look for the words naming what is wrong."""
    r = subprocess.run(
        [sys.executable, "-m", "tiergate.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tiergate.cli", "serve", *args, "--port", str(self.port), "--grpc-port", "-1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1).read()
                break
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    out = self.proc.stdout.read() if self.proc.stdout else ""
                    raise AssertionError(f"tiergate serve did not come up: {out[-3000:]}") from None
                time.sleep(0.2)

    def chat(self, content: str, model: str = "tiergate") -> tuple[str, dict[str, object]]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/chat/completions",
            data=json.dumps({"model": model, "messages": [{"role": "user", "content": content}]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.headers["x-tiergate-tier"], json.loads(r.read())

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, out
        return out

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics") as r:
            text: str = r.read().decode()
            return text
