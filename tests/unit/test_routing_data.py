"""Outcome and price files: every kind of bad input gets an error naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiergate.routing.errors import DataError
from tiergate.training.data import load_outcomes, load_prices

MODELS = ["small", "large"]


def _row(i: int, **over: object) -> str:
    row: dict[str, object] = {
        "id": f"r{i}",
        "prompt": f"prompt {i}",
        "task": "t",
        "split": "train" if i % 4 else "test",
        "scores": {"small": 1.0, "large": 0.0},
    }
    row.update(over)
    return json.dumps(row)


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_reads_rows_splits_and_provenance(tmp_path: Path) -> None:
    p = _write(tmp_path, [_row(i) for i in range(8)] + [""])
    data = load_outcomes([p], MODELS, split="train")
    assert len(data) == 6
    assert data.models == ("small", "large")
    assert data.scores.shape == (6, 2)
    assert data.provenance[0].rows_total == 8
    assert data.provenance[0].rows_used == 6
    assert data.origins[0] == (str(p), 2)
    assert len(load_outcomes([p], MODELS)) == 8


def test_prompt_with_line_separator_characters_stays_one_row(tmp_path: Path) -> None:
    # json.dumps escapes U+2028 by default; real files carry it raw, which str.splitlines() would split on.
    line = json.dumps({"id": "a", "prompt": "x\u2028y\x1cz", "scores": {"small": 1, "large": 0}}, ensure_ascii=False)
    p = _write(tmp_path, [line, _row(1)])
    data = load_outcomes([p], MODELS)
    assert data.prompts[0] == "x\u2028y\x1cz"
    assert len(data) == 2


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"prompt": "p", "scores": {"small": 1, "large": 0}}), "missing field 'id'"),
        (json.dumps({"id": "x", "scores": {"small": 1, "large": 0}}), "missing field 'prompt'"),
        (json.dumps({"id": "x", "prompt": "p"}), "missing field 'scores'"),
        (json.dumps({"id": 3, "prompt": "p", "scores": {}}), "field 'id' must be a string"),
        (_row(9, scores={"small": 1.0, "medium": 0.0}), "no score for model 'large'"),
        (_row(9, scores={"small": 1.0, "large": 1.5}), r"score of 'large' must be a number in \[0, 1\], got 1.5"),
        (_row(9, scores={"small": -0.1, "large": 1}), "score of 'small' must be a number"),
        (_row(9, scores={"small": "1", "large": 1}), "score of 'small' must be a number"),
        (_row(9, scores={"small": True, "large": 1}), "score of 'small' must be a number"),
        (_row(1), "duplicate id 'r1'"),
    ],
)
def test_bad_rows_name_the_line(tmp_path: Path, bad: str, message: str) -> None:
    p = _write(tmp_path, [_row(0), _row(1), "", bad, _row(5)])
    with pytest.raises(DataError, match=message) as ei:
        load_outcomes([p], MODELS)
    assert str(ei.value).startswith(f"{p}:4: ")
    assert ei.value.line == 4


def test_missing_file_and_empty_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        load_outcomes([tmp_path / "nope.jsonl"], MODELS)
    p = _write(tmp_path, [_row(0)])
    with pytest.raises(DataError, match="no rows with split == 'train'"):
        load_outcomes([p], MODELS, split="train")


def test_prices(tmp_path: Path) -> None:
    p = tmp_path / "prices.json"
    p.write_text(json.dumps({"small": {"input_usd_per_mtok": 0.1, "output_usd_per_mtok": 0.2}, "large": 1.8}))
    assert load_prices(p, MODELS) == pytest.approx([0.3, 1.8])
    with pytest.raises(DataError, match="no price for model 'huge'"):
        load_prices(p, ["huge"])
    p.write_text(json.dumps({"small": -1, "large": 1}))
    with pytest.raises(DataError, match="must be finite and >= 0"):
        load_prices(p, MODELS)
