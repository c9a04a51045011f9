"""Fake vLLM servers in their own processes, so that a test can kill one like a crashed pod (SIGKILL)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

# The checkout's root: `python -m tests.support.fake_vllm` finds the `tests` package from there, whatever the
# caller's working directory (a benchmark script, a test run from another folder).
ROOT = Path(__file__).resolve().parents[2]


class FakeProcess:
    def __init__(
        self,
        model: str,
        *,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        extra: Sequence[str] = (),
        prefix: Sequence[str] = (),
    ) -> None:
        argv = [
            *prefix,
            sys.executable,
            "-m",
            "tests.support.fake_vllm",
            "--host",
            host,
            "--port",
            str(port),
            "--model",
            model,
            "--name",
            name,
            "--latency",
            str(latency_s),
            *extra,
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"fake vLLM did not start: {line!r} {err[-2000:]}")
        self.base_url = line.split()[1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()


def fake_tiers(procs: dict[str, FakeProcess]) -> Iterator[dict[str, FakeProcess]]:
    """Body of a fixture over fake tier processes: yields them, then kills every one (`yield from fake_tiers(...)`)."""
    try:
        yield procs
    finally:
        for p in procs.values():
            p.kill()


def small_and_large() -> dict[str, FakeProcess]:
    """The usual two tiers: `small` serving `small-model`, `large` serving `large-model`."""
    return {"small": FakeProcess("small-model", name="small"), "large": FakeProcess("large-model", name="large")}
