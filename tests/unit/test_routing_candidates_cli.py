"""The exact forms of issue 12 for candidate (`MODEL@N`) data, as subprocesses with the real MiniLM encoder:
`tiergate train ... --reference C`, `tiergate calibrate --router A --usd-per-1k-prompts B --write OUT`, and
`tiergate eval ... --json` with `usd_per_1k_prompts`; and bad input refused with a clear error, writing nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.routing import CANDIDATE_PRICES, candidate_rows

TIERS = "small@1,small@4,big@1"
FAST = ["--epochs", "30", "--ensemble", "1", "--folds", "3", "--neighbours", "5", "--created", "2026-01-01T00:00:00"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.update(TIERGATE_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return e


def _write(tmp_path: Path, rows: list[dict[str, object]], prices: object = CANDIDATE_PRICES) -> tuple[Path, Path]:
    data, pr = tmp_path / "cands.jsonl", tmp_path / "prices.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pr.write_text(json.dumps(prices))
    return data, pr


def _tiergate(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiergate.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def _cost_per_1k(row: dict[str, object], name: str) -> float:
    model, n = name.split("@")
    tokens = row["tokens"]
    assert isinstance(tokens, dict)
    price = CANDIDATE_PRICES[model]
    out1 = tokens[f"{model}@1"]["output"]
    return (
        1000
        * (tokens[name]["input"] * price["input_usd_per_mtok"] + int(n) * out1 * price["output_usd_per_mtok"])
        / 1e6
    )


def test_train_calibrate_eval_exact_forms(tmp_path: Path, env: dict[str, str]) -> None:
    rows = candidate_rows(60)
    data, prices = _write(tmp_path, rows)
    art, cal = tmp_path / "cands.json", tmp_path / "cands-1.json"
    r = _tiergate(
        ["train", "--data", str(data), "--tiers", TIERS, "--prices", str(prices), "--reference", "big@1",
         "--out", str(art), *FAST],
        env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(art.read_text())
    assert doc["kind"] == "candidates"
    assert doc["reference"] == "big@1"
    assert [(t["name"], t["model"], t["n"]) for t in doc["tiers"]] == [
        ("small@1", "small", 1),
        ("small@4", "small", 4),
        ("big@1", "big", 1),
    ]
    # Mean one-sample output tokens of the base model; small@4 takes small@1's, not its own (longer) column.
    small_out = sum(300 + i % 7 for i in range(60)) / 60
    assert doc["tiers"][1]["output_tokens"] == pytest.approx(small_out)
    assert doc["tiers"][2]["output_tokens"] == 500

    r = _tiergate(
        ["calibrate", "--router", str(art), "--usd-per-1k-prompts", "2.5", "--write", str(cal), "--json"], env
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["expected"]["usd_per_1k_prompts"] <= 2.5
    written = json.loads(cal.read_text())
    assert written["default_cost_weight_bp"] == out["cost_weight_bp"]
    # The chosen point is the table's best quality within the budget (measured out-of-fold on the training rows).
    fitting = [p for p in written["calibration"] if p["cost"] <= 2.5]
    assert out["expected"]["quality"] == max(p["quality"] for p in fitting)

    # --data recomputes the table on outcome data (here the training rows again, in-sample) before choosing.
    r = _tiergate(
        ["calibrate", "--router", str(art), "--usd-per-1k-prompts", "2.5", "--data", str(data), "--json"], env
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["expected"]["usd_per_1k_prompts"] <= 2.5

    png = tmp_path / "curve.png"
    r = _tiergate(
        ["eval", "--data", str(data), "--tiers", TIERS, "--prices", str(prices), "--router", str(cal), "--json",
         "--plot", str(png)],
        env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = json.loads(r.stdout)
    assert ev["kind"] == "candidates"
    assert ev["cost_weight_bp"] == out["cost_weight_bp"]
    assert ev["usd_per_1k_prompts"] == ev["cost"]
    for name in TIERS.split(","):
        want = sum(_cost_per_1k(row, name) for row in rows) / len(rows)
        assert ev["single"][name]["usd_per_1k_prompts"] == pytest.approx(want)
    assert ev["single"]["small@4"]["quality"] == pytest.approx(0.9)
    # N-tier fields beside the new one.
    assert {"curve", "oracle", "best_single", "shares", "router_cheapest_matching_best_single"} <= set(ev)
    assert ev["oracle"]["quality"] == 1.0


def _refused(tmp_path: Path, env: dict[str, str], args: list[str], message: str) -> None:
    out = tmp_path / "never.json"
    r = _tiergate([*args, "--out", str(out), *FAST] if args[0] == "train" else args, env)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_bad_candidate_input_is_refused_with_a_clear_error(tmp_path: Path, env: dict[str, str]) -> None:
    rows = candidate_rows(20)
    data, prices = _write(tmp_path, rows)
    train = ["train", "--data", str(data), "--tiers", TIERS, "--prices", str(prices)]
    _refused(tmp_path, env, [*train, "--reference", "huge@1"], "--reference 'huge@1' is not one of --tiers")
    _refused(tmp_path, env, [*train, "--reference", "small@4"], "must be a one-sample candidate")
    _refused(tmp_path, env, train, "need --reference C")
    _refused(
        tmp_path,
        env,
        ["train", "--data", str(data), "--tiers", "small@1,small@x,big@1", "--prices", str(prices), "--reference",
         "big@1"],
        "expected MODEL@N",
    )  # fmt: skip
    # A price file without the big model: the error names the file and the candidate.
    _, small_only = _write(tmp_path, rows, {"small": CANDIDATE_PRICES["small"]})
    _refused(
        tmp_path,
        env,
        ["train", "--data", str(data), "--tiers", TIERS, "--prices", str(small_only), "--reference", "big@1"],
        f"{small_only}: no price for candidate 'big@1'",
    )
    # An @N column whose @1 base has no tokens on a row: the file and line are named.
    del rows[6]["tokens"]["small@1"]  # type: ignore[attr-defined]
    bad, prices = _write(tmp_path, rows)
    _refused(
        tmp_path,
        env,
        [*train[:2], str(bad), *train[3:], "--reference", "big@1"],
        f"{bad}:7: tokens for 'small@4' but none for its one-sample base 'small@1'",
    )
    # eval of candidates needs a candidates router (none ships).
    _refused(
        tmp_path,
        env,
        ["eval", "--data", str(data), "--tiers", TIERS, "--prices", str(prices), "--json"],
        "need --router ARTIFACT",
    )


def test_calibrate_targets_match_the_kind(tmp_path: Path, env: dict[str, str]) -> None:
    from tests.support.routing import tiny_candidates_artifact
    from tiergate.routing.artifact import DEFAULT_MULTI_TIER, save_artifact

    art = tmp_path / "c.json"
    save_artifact(tiny_candidates_artifact(), art)
    _refused(tmp_path, env, ["calibrate", "--router", str(art), "--budget", "1"], "--usd-per-1k-prompts B")
    _refused(
        tmp_path,
        env,
        ["calibrate", "--router", str(DEFAULT_MULTI_TIER), "--usd-per-1k-prompts", "1"],
        "takes --budget",
    )
    r = _tiergate(["calibrate", "--router", str(art), "--usd-per-1k-prompts", "0.5", "--json"], env)
    assert r.returncode == 0, r.stderr
    # tiny_candidates_artifact's table: (0 bp, 0.6, 0.7) and (1000 bp, 0.3, 0.6): only the second fits 0.5.
    out = json.loads(r.stdout)
    assert out["cost_weight_bp"] == 1000
    assert out["expected"]["usd_per_1k_prompts"] == 0.3
