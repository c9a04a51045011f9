"""The train/eval/calibrate subcommands end to end, as subprocesses, with the real MiniLM encoder.

Data is synthetic (two kinds of prompt, the strong model wins only on one kind) so the test is hermetic; the
embedding cache goes to a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiergate.api.policy import RoutingPolicy

WEAK, STRONG = "mixtral-8x7b-instruct", "gpt-4-1106-preview"
TIERS = ["tiny", "mid", "big"]


def _rows(n: int = 40) -> list[dict[str, object]]:
    rows = []
    for i in range(n):
        hard = i % 2 == 0
        prompt = (
            f"Prove that the integral of x^{i} sin(x) over [0, pi] satisfies the bound in problem {i}."
            if hard
            else f"What is the capital city of country number {i} in the atlas?"
        )
        strong_wins = hard and i % 6 != 0
        rows.append(
            {
                "id": f"q{i}",
                "prompt": prompt,
                "task": "math" if hard else "geo",
                "split": "test" if i % 5 == 0 else "train",
                "scores": {
                    WEAK: 0.0 if strong_wins else 1.0,
                    STRONG: 1.0,
                    "tiny": 0.0 if hard else 1.0,
                    "mid": 0.5 if hard else 1.0,
                    "big": 1.0,
                },
            }
        )
    return rows


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.update(TIERGATE_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return e


@pytest.fixture
def data(tmp_path: Path) -> Path:
    p = tmp_path / "outcomes.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    return p


@pytest.fixture
def prices(tmp_path: Path) -> Path:
    p = tmp_path / "prices.json"
    p.write_text(json.dumps({"tiny": 0.2, "mid": {"input_usd_per_mtok": 0.3, "output_usd_per_mtok": 0.3}, "big": 1.8}))
    return p


def _tiergate(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiergate.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


FAST = ["--epochs", "3", "--ensemble", "1", "--folds", "2", "--neighbours", "5", "--created", "2026-01-01T00:00:00"]


def test_eval_exact_form_with_the_default_router(data: Path, env: dict[str, str]) -> None:
    r = _tiergate(["eval", "--data", str(data), "--weak", WEAK, "--strong", STRONG, "--json"], env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # exactly one JSON document on stdout
    for key in ("apgr", "cpt50", "cpt80", "n", "curve"):
        assert key in doc
    assert doc["n"] == 40
    assert doc["router"].endswith("default/two-tier.json")
    assert len(doc["curve"]) == 101
    assert doc["curve"][0]["strong_share"] == 0
    assert doc["curve"][-1]["strong_share"] == 1
    assert doc["curve"][-1]["pgr"] == pytest.approx(1.0)
    assert 0.0 <= doc["cpt50"] <= doc["cpt80"] <= 1.0
    assert doc["baselines"]["random"]["apgr"] == 0.5


def test_train_eval_calibrate_two_tier(tmp_path: Path, data: Path, env: dict[str, str]) -> None:
    out = tmp_path / "r" / "router.json"
    r = _tiergate(["train", "--data", str(data), "--weak", WEAK, "--strong", STRONG, "--out", str(out), *FAST], env)
    assert r.returncode == 0, r.stderr
    assert "training" in r.stderr
    assert r.stdout == ""
    art = json.loads(out.read_text())
    assert art["provenance"]["split"] == "train"
    assert art["provenance"]["rows"] == 32
    assert art["tiers"][0]["name"] == WEAK
    # Same seed, same data, same flags: the same bytes.
    out2 = tmp_path / "r" / "again.json"
    assert (
        _tiergate(
            ["train", "--data", str(data), "--weak", WEAK, "--strong", STRONG, "--out", str(out2), *FAST], env
        ).returncode
        == 0
    )
    a2 = json.loads(out2.read_text())
    assert a2["head"] == art["head"]
    assert a2["calibration"] == art["calibration"]

    png = tmp_path / "curve.png"
    r = _tiergate(
        [
            "eval",
            "--data",
            str(data),
            "--weak",
            WEAK,
            "--strong",
            STRONG,
            "--router",
            str(out),
            "--split",
            "test",
            "--json",
            "--plot",
            str(png),
        ],
        env,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["n"] == 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The easy/hard split is visible in the embeddings: the router beats random on held-out rows.
    assert doc["apgr"] > 0.5

    r = _tiergate(["calibrate", "--router", str(out), "--share", "0.5"], env)
    assert r.returncode == 0, r.stderr
    assert "kind: RoutingPolicy" in r.stdout
    assert "thresholdBasisPoints:" in r.stdout
    written = tmp_path / "calibrated.json"
    r = _tiergate(["calibrate", "--router", str(out), "--pgr", "0.5", "--write", str(written), "--json"], env)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert json.loads(written.read_text())["default_threshold_bp"] == res["threshold_bp"]


def test_train_and_eval_multi_tier(tmp_path: Path, data: Path, prices: Path, env: dict[str, str]) -> None:
    out = tmp_path / "multi.json"
    tiers = ",".join(TIERS)
    r = _tiergate(
        ["train", "--data", str(data), "--tiers", tiers, "--prices", str(prices), "--out", str(out), *FAST], env
    )
    assert r.returncode == 0, r.stderr
    r = _tiergate(
        [
            "eval",
            "--data",
            str(data),
            "--tiers",
            tiers,
            "--prices",
            str(prices),
            "--router",
            str(out),
            "--json",
            "--budget",
            "0.5",
        ],
        env,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc["single"]) == set(TIERS)
    assert doc["single"]["big"]["quality"] == pytest.approx(1.0)
    assert doc["single"]["big"]["cost"] == pytest.approx(1.8)
    assert doc["single"]["mid"]["cost"] == pytest.approx(0.6)
    assert doc["oracle"]["quality"] == pytest.approx(1.0)
    assert doc["oracle"]["cost"] < 1.8
    assert {"quality", "cost", "curve", "at_budget"} <= set(doc)
    r = _tiergate(["calibrate", "--router", str(out), "--budget", "1.0", "--json"], env)
    assert r.returncode == 0, r.stderr
    cal = json.loads(r.stdout)
    assert cal["expected"]["cost"] <= 1.0
    # The human form prints the policy snippet with the same weight, which the router reads from the policy.
    r = _tiergate(["calibrate", "--router", str(out), "--budget", "1.0"], env)
    assert r.returncode == 0, r.stderr
    snippet = yaml.safe_load(r.stdout)
    assert snippet["spec"]["router"] == {"costWeightBasisPoints": cal["cost_weight_bp"]}
    price = {"inputPerMillion": 1, "outputPerMillion": 1}
    tier = {"name": "a", "model": "m", "endpoint": {"url": "http://a/v1"}, "price": price}
    RoutingPolicy.model_validate({**snippet, "spec": {**snippet["spec"], "tiers": [tier]}})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"id": "x", "prompt": "p", "scores": {WEAK: 1.0}}, f"no score for model '{STRONG}'"),
        ({"id": "x", "prompt": "p", "scores": {WEAK: 1.0, STRONG: 7}}, "must be a number in [0, 1]"),
        ({"id": "x", "scores": {WEAK: 1.0, STRONG: 1.0}}, "missing field 'prompt'"),
    ],
)
def test_bad_input_names_the_line_and_writes_nothing(
    tmp_path: Path, env: dict[str, str], line: dict[str, object], message: str
) -> None:
    p = tmp_path / "bad.jsonl"
    rows = [json.dumps(r) for r in _rows(6)]
    rows.insert(3, json.dumps(line))
    p.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out.json"
    r = _tiergate(["train", "--data", str(p), "--weak", WEAK, "--strong", STRONG, "--out", str(out), *FAST], env)
    assert r.returncode == 2
    assert f"{p}:4: " in r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert list(tmp_path.glob("*.tmp")) == []


def test_single_class_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    p = tmp_path / "flat.jsonl"
    rows = [{**r, "scores": {WEAK: 1.0, STRONG: 1.0}} for r in _rows(10)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.json"
    r = _tiergate(
        ["train", "--data", str(p), "--weak", WEAK, "--strong", STRONG, "--out", str(out), "--split", "all", *FAST], env
    )
    assert r.returncode == 2
    assert "single class" in r.stderr
    assert f"{p}:1 .. {p}:10" in r.stderr
    assert not out.exists()


def test_router_for_other_tiers_is_refused(data: Path, env: dict[str, str]) -> None:
    r = _tiergate(["eval", "--data", str(data), "--weak", "tiny", "--strong", "big", "--json"], env)
    assert r.returncode == 2
    assert "routes between" in r.stderr
    assert r.stdout == ""


LLMROUTER = [
    "qwen2.5-7b-instruct",
    "codegemma-7b",
    "gemma-2-9b-it",
    "llama-3.1-8b-instruct",
    "llama3-chatqa-1.5-8b",
    "mistral-7b-instruct-v0.3",
    "llama-3.3-nemotron-super-49b-v1",
    "llama-3.1-nemotron-51b-instruct",
    "llama3-chatqa-1.5-70b",
]


def test_eval_exact_form_n_tiers_with_the_default_router(tmp_path: Path, env: dict[str, str]) -> None:
    rows = []
    for i in range(20):
        scores = {m: float((i + j) % 3 == 0) for j, m in enumerate(LLMROUTER)}
        rows.append({"id": f"p{i}", "prompt": f"Question {i}: what is {i} times {i + 3}?", "scores": scores})
    data = tmp_path / "n.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps(
            {m: {"input_usd_per_mtok": 0.1 * (j + 1), "output_usd_per_mtok": 0.1} for j, m in enumerate(LLMROUTER)}
        )
    )
    r = _tiergate(
        ["eval", "--data", str(data), "--tiers", ",".join(reversed(LLMROUTER)), "--prices", str(prices), "--json"], env
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["router"].endswith("default/multi-tier.json")
    assert doc["n"] == 20
    for key in ("quality", "cost", "curve", "single", "oracle"):
        assert key in doc
    # Prices come from --prices (not the artifact's list prices): tier j costs 0.1 (j + 1) + 0.1.
    assert doc["single"][LLMROUTER[0]]["cost"] == pytest.approx(0.2)
    assert doc["single"][LLMROUTER[8]]["cost"] == pytest.approx(1.0)
    expected_q = sum((i + 0) % 3 == 0 for i in range(20)) / 20
    assert doc["single"][LLMROUTER[0]]["quality"] == pytest.approx(expected_q)
    assert doc["oracle"]["quality"] == pytest.approx(1.0)
