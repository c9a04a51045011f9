"""The decision log's writer: lines, rotation, bounded queue with counted drops, stdout."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tiergate_router.decision_log import DecisionLog, DecisionLogConfig


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_json_lines_in_order(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "decisions.jsonl"
    dl = DecisionLog(DecisionLogConfig(str(path)))
    for i in range(50):
        dl.write({"kind": "decision", "request_id": f"r{i}", "tier": "small", "score": 0.25, "prompt": "é"})
    assert dl.flush()
    dl.close()
    got = _lines(path)
    assert [r["request_id"] for r in got] == [f"r{i}" for i in range(50)]
    assert got[0]["prompt"] == "é"
    assert (dl.written, dl.dropped) == (50, 0)


def test_rotates_by_size_keeping_backups(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    dl = DecisionLog(DecisionLogConfig(str(path), max_bytes=400, backups=2))
    for i in range(40):
        dl.write({"request_id": f"r{i:02d}", "pad": "x" * 40})
    dl.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["d.jsonl", "d.jsonl.1", "d.jsonl.2"]
    assert all(p.stat().st_size <= 400 for p in tmp_path.iterdir())
    # The newest records are in the current file, the ones just before them in .1, and the oldest were let go.
    newest = _lines(path)[-1]["request_id"]
    assert newest == "r39"
    assert str(_lines(tmp_path / "d.jsonl.1")[-1]["request_id"]) < str(_lines(path)[0]["request_id"])


def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    drops: list[int] = []
    dl = DecisionLog(DecisionLogConfig(str(tmp_path / "d.jsonl"), queue_records=3), on_drop=lambda: drops.append(1))
    # Hold the writer thread inside a write so the queue cannot drain: the fourth record onwards must be dropped.
    entered, release = threading.Event(), threading.Event()
    original = dl._write_line

    def slow(record: dict[str, object]) -> None:
        entered.set()
        release.wait()
        original(record)

    dl._write_line = slow  # type: ignore[method-assign]
    dl.write({"request_id": "held"})
    assert entered.wait(5)
    for i in range(10):
        dl.write({"request_id": f"q{i}"})
    assert (dl.dropped, len(drops)) == (7, 7)
    release.set()
    dl.close()
    assert [r["request_id"] for r in _lines(tmp_path / "d.jsonl")] == ["held", "q0", "q1", "q2"]


def test_unwritable_path_fails_at_start_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=r"decision log .*file"):
        DecisionLog(DecisionLogConfig(str(blocker / "d.jsonl")))


def test_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    dl = DecisionLog(DecisionLogConfig("-"))
    dl.write({"request_id": "a", "tier": "t"})
    dl.close()
    assert json.loads(capsys.readouterr().out.strip()) == {"request_id": "a", "tier": "t"}
