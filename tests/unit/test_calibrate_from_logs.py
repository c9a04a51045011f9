"""`tiergate calibrate --data LOG`: decision logs joined by request id (rotated sets, any order), the operating point
recomputed on the logged scores, quality where shadow judgements exist, and a log a real router wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.artifacts import constant_artifact
from tests.support.harness import Harness
from tiergate.routing.artifact import load_artifact
from tiergate.routing.errors import DataError
from tiergate.training.decision_logs import (
    has_quality,
    join_logs,
    log_threshold_table,
    rotated_set,
    two_tier_outcomes,
)
from tiergate_router.classifier import MicroBatcher


def decision(rid: str, score: float | None, tier: str = "small", artifact: str = "A", **kw: Any) -> dict[str, Any]:
    chosen = tier if score is None else ("large" if score >= 0.5 else "small")
    return {
        "kind": "decision",
        "ts": "2026-12-01T00:00:00.000Z",
        "request_id": rid,
        "prompt_sha256": "0" * 64,
        "score": score,
        "decision": chosen if score is not None else "forced",
        "tier": tier,
        "samples": 1,
        "fallbacks": [],
        "artifact": artifact,
        "outcome": "success",
        "latency_ms": 3.0,
        "tokens": {"prompt": 5, "completion": 7},
        "cost_usd": 0.0001,
        **kw,
    }


def shadow(rid: str, routed: str, r_routed: float, baseline: str, r_baseline: float) -> dict[str, Any]:
    return {
        "kind": "shadow",
        "ts": "2026-12-01T00:00:01.000Z",
        "request_id": rid,
        "routed_tier": routed,
        "reward_routed": r_routed,
        "baseline_tier": baseline,
        "reward_baseline": r_baseline,
    }


def feedback(rid: str, rating: float, source: str = "explicit") -> dict[str, Any]:
    return {"kind": "feedback", "ts": "2026-12-01T00:00:02.000Z", "request_id": rid, "rating": rating, "source": source}


def write(path: Path, records: list[dict[str, Any]], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def test_join_reads_a_rotated_set_in_any_order(tmp_path: Path) -> None:
    log = tmp_path / "d.jsonl"
    # FILE.2 is the oldest; r1's first feedback comes before its decision (a merged or reordered log).
    write(tmp_path / "d.jsonl.2", [feedback("r1", 0.5), decision("r0", 0.2)])
    write(tmp_path / "d.jsonl.1", [decision("r1", 0.7, tier="large"), feedback("r1", -1, "requery")])
    write(log, [decision("r2", None, tier="large"), feedback("r1", 1.0), shadow("r0", "small", 0.4, "large", 0.9)])
    (tmp_path / "d.jsonl.x").write_text("not a log\n")
    assert [p.name for p in rotated_set(log)] == ["d.jsonl.2", "d.jsonl.1", "d.jsonl"]
    joined = join_logs([log])
    assert set(joined) == {"r0", "r1", "r2"}
    assert joined["r1"].score == 0.7
    assert joined["r1"].tier == "large"
    assert joined["r1"].feedback == {"explicit": 0.5, "requery": -1.0}  # the first explicit rating counts
    assert joined["r0"].judged == {"small": 0.4, "large": 0.9}
    assert joined["r2"].score is None


def test_a_line_cut_mid_write_is_skipped_but_a_bad_line_is_named(tmp_path: Path) -> None:
    ok = write(tmp_path / "a.jsonl", [decision("r0", 0.1)], tail='{"kind":"decision","request_id":"r1","sco')
    assert set(join_logs([ok])) == {"r0"}
    bad = write(tmp_path / "b.jsonl", [decision("r0", 0.1)], tail="{oops\n")
    with pytest.raises(DataError, match=r"b\.jsonl.*2"):
        join_logs([bad])
    with pytest.raises(DataError, match="no such decision log"):
        join_logs([tmp_path / "missing.jsonl"])


def test_shares_from_every_scored_decision_and_quality_from_judged_pairs(tmp_path: Path) -> None:
    recs: list[dict[str, Any]] = [decision(f"r{i}", i / 100) for i in range(100)]
    recs.append(decision("forced", None, tier="large"))  # no score: not in the shares
    # Judged pairs: the weak tier is as good as the strong one below 0.6, worse above.
    for i in range(0, 100, 5):
        weak = 1.0 if i < 60 else 0.0
        recs.append(shadow(f"r{i}", "small", weak, "large", 1.0))
    data = two_tier_outcomes(join_logs([write(tmp_path / "l.jsonl", recs)]), ("small", "large"), artifact="A")
    assert len(data.scores) == 100
    assert len(data.pair_scores) == 20
    table = log_threshold_table(data)
    assert has_quality(table)
    at = {p.threshold_bp: p for p in table.thresholds}
    assert at[7000].strong_share == pytest.approx(0.30)
    assert at[6000].strong_share == pytest.approx(0.40)
    assert at[6000].pgr == pytest.approx(1.0)  # every pair the weak tier fails goes to the strong one
    assert at[7000].pgr == pytest.approx(0.75)  # 0.60 and 0.65 stay on the weak tier
    assert at[10000].strong_share == 0.0


def test_artifacts_are_kept_apart(tmp_path: Path) -> None:
    log = write(tmp_path / "l.jsonl", [decision("a", 0.1, artifact="A"), decision("b", 0.9, artifact="B")])
    joined = join_logs([log])
    assert list(two_tier_outcomes(joined, ("small", "large"), artifact="B").scores) == [0.9]
    with pytest.raises(DataError, match="several artifacts"):
        two_tier_outcomes(joined, ("small", "large"))
    with pytest.raises(DataError, match="no decision of artifact C"):
        two_tier_outcomes(joined, ("small", "large"), artifact="C")


def test_tier_names_come_from_the_log_when_the_policy_renamed_them(tmp_path: Path) -> None:
    recs = [
        decision("a", 0.1, tier="cheap") | {"decision": "cheap"},
        decision("b", 0.9, tier="pricey") | {"decision": "pricey"},
        shadow("a", "cheap", 0.2, "pricey", 0.8),
    ]
    data = two_tier_outcomes(join_logs([write(tmp_path / "l.jsonl", recs)]), ("small", "large"), artifact="A")
    assert (data.weak_tier, data.strong_tier) == ("cheap", "pricey")
    assert list(data.weak) == [0.2]


def calibrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiergate.cli", "calibrate", *args], capture_output=True, text=True, timeout=120
    )


def test_calibrate_data_log_exact_form(tmp_path: Path) -> None:
    art = constant_artifact(tmp_path / "router.json", bias=0.0)
    sha = json.loads(art.read_text())["sha256"]
    recs: list[dict[str, Any]] = [decision(f"r{i}", i / 100, artifact=sha) for i in range(100)]
    recs += [feedback("r3", 1.0), feedback("r80", -0.5), feedback("r81", -1, "requery")]
    log = write(tmp_path / "decisions.jsonl", recs)

    r = calibrate("--router", str(art), "--data", str(log), "--share", "0.3")
    assert r.returncode == 0, r.stderr
    assert "thresholdBasisPoints: 7000" in r.stdout
    assert "from 100 logged decisions (0 judged on both tiers)" in r.stdout

    r = calibrate("--router", str(art), "--data", str(log), "--pgr", "0.9")
    assert r.returncode != 0
    assert "--pgr needs requests judged on both tiers" in r.stderr

    out = tmp_path / "recalibrated.json"
    r = calibrate("--router", str(art), "--data", str(log), "--share", "0.25", "--json", "--write", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["threshold_bp"] == 7500
    assert doc["expected"] == {"strong_share": pytest.approx(0.25), "quality": None, "pgr": None}
    assert doc["log"]["feedback"] == {
        "small": {"requests": 100, "rated": 2, "mean_rating": pytest.approx(0.25), "requeries": 1}
    }
    assert load_artifact(out).default_threshold_bp == 7500

    # With shadow judgements on both tiers, a PGR target works and the table is stored.
    recs += [shadow(f"r{i}", "small", 1.0 if i < 60 else 0.0, "large", 1.0) for i in range(0, 100, 5)]
    write(log, recs)
    r = calibrate("--router", str(art), "--data", str(log), "--pgr", "1.0", "--json", "--write", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["threshold_bp"] == 6000
    assert doc["expected"]["pgr"] == pytest.approx(1.0)
    assert load_artifact(out).calibration.thresholds[0].threshold_bp == 10000


def test_a_log_a_router_wrote_recalibrates(tmp_path: Path) -> None:
    """The loop closed: a router (scores spread over 0..1) logs its traffic, calibrate reads that log."""
    path = tmp_path / "prod.jsonl"

    def scorer(prompts: Sequence[str]) -> Sequence[float | tuple[float, ...]]:
        return [int(p.split()[-1]) / 100 for p in prompts]

    h = Harness(
        grpc=False, config_overrides={"decision_log": str(path)}, classifier_factory=lambda: MicroBatcher(scorer)
    )
    h.start()
    try:
        import openai

        c = openai.OpenAI(base_url=f"{h.url}/v1", api_key="unused", max_retries=0)
        for i in range(50):
            c.chat.completions.create(model="tiergate", messages=[{"role": "user", "content": f"question {i * 2}"}])
        assert h.server is not None
        log = h.server.router.decision_log
        assert log is not None
        assert log.flush()
    finally:
        h.stop()
    art = constant_artifact(tmp_path / "router.json", bias=0.0)
    r = calibrate("--router", str(art), "--data", str(path), "--share", "0.2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["log"]["decisions"] == 50
    assert doc["threshold_bp"] == 8000  # scores 0.00, 0.02, ..., 0.98: 0.80 and above are 10 of 50
    assert doc["expected"]["strong_share"] == pytest.approx(0.2)


# --- tiergate train from decision logs -------------------------------------------------------------------------


def judged_log(path: Path, n: int = 40, *, logits: bool = False) -> Path:
    """Requests logged with their prompts and judged on both tiers: the strong tier wins on the math prompts."""
    recs: list[dict[str, Any]] = []
    for i in range(n):
        hard = i % 2 == 0
        prompt = (
            f"Prove that the integral of x^{i} sin(x) over [0, pi] satisfies the bound in problem {i}."
            if hard
            else f"What is the capital city of country number {i} in the atlas?"
        )
        weak, strong = (0.0, 1.0) if hard else (1.0, 1.0)
        if logits:
            weak, strong = weak * 8 - 4, strong * 8 - 4
        recs += [decision(f"q{i}", 0.5, prompt=prompt), shadow(f"q{i}", "small", weak, "large", strong)]
    recs.append(decision("no-prompt", 0.5))  # digest only: not a training row
    recs.append(shadow("no-prompt", "small", 0.0, "large", 1.0))
    return write(path, recs)


def test_training_rows_come_from_prompts_judged_on_both_tiers(tmp_path: Path) -> None:
    from tiergate.training.decision_logs import outcomes_from_logs

    data = outcomes_from_logs([judged_log(tmp_path / "a.jsonl")], ["small", "large"])
    assert len(data) == 40
    assert "no-prompt" not in data.ids
    assert data.prompts[1].startswith("What is the capital")
    assert data.scores[0].tolist() == [0.0, 1.0]
    assert data.provenance[0].rows_used == 40
    assert data.origins[0] == (str(tmp_path / "a.jsonl"), 1)
    # Logits are mapped into 0..1 for the whole log, keeping which tier is better.
    logit = outcomes_from_logs([judged_log(tmp_path / "b.jsonl", logits=True)], ["small", "large"])
    assert logit.scores[0][0] == pytest.approx(1 / (1 + np.exp(4)))
    assert logit.scores[0][1] > logit.scores[0][0]
    assert logit.scores[1][0] == logit.scores[1][1]
    with pytest.raises(DataError, match="judged on both small and huge"):
        outcomes_from_logs([judged_log(tmp_path / "c.jsonl")], ["small", "huge"])


def test_train_data_log_writes_an_artifact(tmp_path: Path) -> None:
    import os

    log = judged_log(tmp_path / "decisions.jsonl")
    out = tmp_path / "router.json"
    env = dict(os.environ, TIERGATE_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    fast = ["--epochs", "3", "--ensemble", "1", "--folds", "2", "--neighbours", "5"]
    args = ["train", "--data", str(log), "--weak", "small", "--strong", "large", "--out", str(out), *fast]
    r = subprocess.run(
        [sys.executable, "-m", "tiergate.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr
    art = load_artifact(out)
    assert [t.name for t in art.tiers] == ["small", "large"]
    assert art.provenance["rows"] == 40


def test_a_log_taken_from_a_pods_output_keeps_only_its_records(tmp_path: Path) -> None:
    from tiergate.training.decision_logs import is_decision_log, log_set

    pod = tmp_path / "pod.log"
    banner = "tiergate router: OpenAI API on http://0.0.0.0:8080/v1 (model 'tiergate' routes; tiers: small, large)\n"
    lines = [banner, "2026-12-02 03:00:00,000 INFO tiergate_router.server: router serving\n"]
    lines += [json.dumps(decision(f"r{i}", i / 10)) + "\n" for i in range(10)]
    pod.write_text("".join(lines))
    assert is_decision_log(pod)
    assert len(join_logs([pod])) == 10
    outcomes = write(tmp_path / "outcomes.jsonl", [{"id": "q", "prompt": "p", "scores": {"a": 1.0}}])
    assert not is_decision_log(outcomes)
    assert log_set([outcomes]) == []
    with pytest.raises(DataError, match="not a decision log"):
        log_set([pod, outcomes])
