"""The decision log's writer: one JSON object per line, to a file (rotated by size) or to stdout.

Records of several kinds share one log and join on `request_id`: `"kind": "decision"` (one per request),
`"feedback"` (POST /v1/feedback and implicit signals), `"shadow"` (a baseline answer judged against the routed one).
A request never waits for the disk: `write` puts the record on a bounded queue and returns; a writer thread encodes
and writes. When the queue is full the record is dropped and counted (`dropped`, and the `on_drop` callback that
feeds a metric), because a slow disk or a stalled log collector must not add latency to, or fail, client requests.

Stdout (`-`) is the Kubernetes way: the container runtime captures it and the cluster's log collector ships it; no
rotation then (the kubelet rotates container logs). A file rotates at `max_bytes` to FILE.1 … FILE.`backups`, as
Python's RotatingFileHandler and logrotate name them, so existing tooling picks the files up.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

STDOUT = "-"


@dataclass(frozen=True)
class DecisionLogConfig:
    # A file path, or "-" for stdout.
    target: str
    # Rotate a file when it would grow past this many bytes (0: never).
    max_bytes: int = 100 * 1024 * 1024
    # Rotated files kept (FILE.1 is the newest).
    backups: int = 5
    # Records waiting for the writer thread; beyond this they are dropped (and counted), never waited for.
    queue_records: int = 10_000


_STOP = object()


class DecisionLog:
    """Non-blocking JSON-lines writer. `write` is safe from any thread and the event loop; `close` drains the queue."""

    def __init__(self, config: DecisionLogConfig, *, on_drop: Callable[[], None] | None = None) -> None:
        if config.queue_records < 1:
            raise ValueError("decision log queue_records must be at least 1")
        if config.max_bytes < 0 or config.backups < 0:
            raise ValueError("decision log max_bytes and backups must not be negative")
        self.config = config
        self.on_drop = on_drop
        self.dropped = 0
        self.written = 0
        self._queue: queue.Queue[object] = queue.Queue(maxsize=config.queue_records)
        self._out: IO[str] | None = None
        self._size = 0
        # Open before the thread starts, so that a bad path fails `tiergate serve` at start, naming the path.
        self._open()
        self._thread = threading.Thread(target=self._run, name="tiergate-decision-log", daemon=True)
        self._thread.start()

    @property
    def _path(self) -> Path | None:
        return None if self.config.target == STDOUT else Path(self.config.target)

    def _open(self) -> None:
        path = self._path
        if path is None:
            self._out = sys.stdout
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._out = path.open("a", encoding="utf-8")
        except OSError as e:
            raise OSError(f"cannot open the decision log {path}: {e.strerror or e}") from e
        self._size = self._out.tell()

    def write(self, record: Mapping[str, Any]) -> None:
        """Queue one record; never blocks and never raises for a full queue (the record is dropped and counted)."""
        try:
            self._queue.put_nowait(dict(record))
        except queue.Full:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the writer. The stop marker waits for room: records queued before it are
        written, not dropped."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            log.warning("decision log: the writer did not drain within %.1f s; stopping without the rest", timeout_s)
            return
        self._thread.join(timeout_s)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every record queued so far is written (tests, shutdown). False if it did not happen in time."""
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            if isinstance(item, threading.Event):
                self._flush_out()
                item.set()
                continue
            assert isinstance(item, dict)
            self._write_line(item)
            # Flush when the queue is empty: a burst is written in one go, a lone record is not held back.
            if self._queue.empty():
                self._flush_out()
        self._flush_out()
        if self._path is not None and self._out is not None:
            self._out.close()

    def _flush_out(self) -> None:
        if self._out is None:
            return
        try:
            self._out.flush()
        except (OSError, ValueError) as e:
            log.warning("decision log: flush failed: %s", e)

    def _write_line(self, record: dict[str, Any]) -> None:
        try:
            line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str) + "\n"
        except (TypeError, ValueError) as e:
            # A record that cannot be encoded is a bug in the caller; losing it must not stop the writer.
            log.error("decision log: record not written (%s): %r", e, record.get("request_id"))
            self.dropped += 1
            return
        size = len(line.encode("utf-8"))
        if (
            self._path is not None
            and self.config.max_bytes
            and self._size
            and self._size + size > self.config.max_bytes
        ):
            self._rotate()
        if self._out is None:
            return
        try:
            self._out.write(line)
        except (OSError, ValueError) as e:
            log.warning("decision log: write failed: %s", e)
            self.dropped += 1
            return
        self._size += size
        self.written += 1

    def _rotate(self) -> None:
        path = self._path
        assert path is not None
        assert self._out is not None
        self._out.close()
        self._out = None
        try:
            if self.config.backups == 0:
                path.unlink(missing_ok=True)
            else:
                for i in range(self.config.backups - 1, 0, -1):
                    src = path.with_name(f"{path.name}.{i}")
                    if src.exists():
                        os.replace(src, path.with_name(f"{path.name}.{i + 1}"))
                os.replace(path, path.with_name(f"{path.name}.1"))
            self._out = path.open("a", encoding="utf-8")
        except OSError as e:
            log.warning("decision log: rotation of %s failed: %s", path, e)
            if self._out is None:
                try:
                    self._out = path.open("a", encoding="utf-8")
                except OSError:
                    return
        self._size = 0
