"""Artifact round-trip, refusal of corrupt or incompatible files, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.routing import FakeEncoder, tiny_artifact
from tiergate.routing.artifact import MAX_BYTES, load_artifact, save_artifact, to_json_dict
from tiergate.routing.errors import ArtifactError
from tiergate.routing.scorer import Scorer


def test_round_trip_gives_the_same_scores(tmp_path: Path) -> None:
    art = tiny_artifact()
    p = tmp_path / "r.json"
    size = save_artifact(art, p)
    assert size == p.stat().st_size < MAX_BYTES
    back = load_artifact(p)
    assert back.tiers == art.tiers
    assert back.encoder == art.encoder
    assert back.calibration == art.calibration
    enc = FakeEncoder()
    prompts = ["a", "bb", "what is 2+2?"]
    a, b = Scorer(art, enc).score(prompts), Scorer(back, enc).score(prompts)
    # float16 storage: scores move by far less than one basis point.
    np.testing.assert_allclose(a, b, atol=2e-3)
    assert np.all((b >= 0) & (b <= 1))
    # Saving what was loaded is byte-stable (the format is canonical).
    p2 = tmp_path / "r2.json"
    save_artifact(back, p2)
    assert p2.read_bytes() == p.read_bytes()


def _rewrite(p: Path, edit) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(p.read_text())
    edit(doc)
    p.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version=2), "format version 2 is not supported"),
        (lambda d: d.update(format="something-else"), "not a router artifact"),
        (lambda d: d["tiers"].append({"name": "x", "price": 1}), "checksum mismatch"),
        (lambda d: d.pop("format_version"), "format_version missing"),
    ],
)
def test_incompatible_or_edited_is_refused(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "r.json"
    save_artifact(tiny_artifact(), p)
    _rewrite(p, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(p)


def test_corrupt_bytes_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    save_artifact(tiny_artifact(), p)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ArtifactError, match="invalid JSON"):
        load_artifact(p)
    # Flip one base64 character of a weight: valid JSON, wrong checksum.
    text = raw.decode()
    i = text.index('"data": "') + len('"data": "') + 3
    flipped = text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1 :]
    p.write_text(flipped)
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(p)
    with pytest.raises(ArtifactError, match="cannot read"):
        load_artifact(tmp_path / "missing.json")


def test_shape_mismatch_is_refused_even_with_a_valid_checksum(tmp_path: Path) -> None:
    from tiergate.routing.format import digest

    doc = to_json_dict(tiny_artifact())
    doc["encoder"]["dim"] = 16  # head expects 8
    doc["sha256"] = digest(doc)
    p = tmp_path / "r.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="does not follow width 16"):
        load_artifact(p)


def test_save_is_atomic_and_refuses_oversize(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    save_artifact(tiny_artifact(seed=1), p)
    before = p.read_bytes()
    art = tiny_artifact()
    big = art.with_updates(provenance={"blob": "x" * (MAX_BYTES + 10)})
    with pytest.raises(ArtifactError, match="ConfigMap budget"):
        save_artifact(big, p)
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


def test_encoder_mismatch_is_refused() -> None:
    from tiergate.routing.artifact import EncoderSpec
    from tiergate.routing.errors import RoutingError

    art = tiny_artifact().with_updates(encoder=EncoderSpec(id="other/encoder", dim=8))
    with pytest.raises(RoutingError, match="trained on other/encoder"):
        Scorer(art, FakeEncoder())


def test_router_service_refuses_an_artifact_of_another_encoder(tmp_path: Path) -> None:
    # A head trained on another encoder (e.g. all-mpnet-base-v2, docs/routing.md "encoders") must be refused by
    # the router with an error that names both encoders, before any model is loaded, not scored with MiniLM.
    from tiergate.routing.artifact import EncoderSpec
    from tiergate_router.artifact_classifier import load_classifier
    from tiergate_router.errors import ClassifierError

    other = "sentence-transformers/all-mpnet-base-v2"
    p = tmp_path / "mpnet-router.json"
    save_artifact(tiny_artifact().with_updates(encoder=EncoderSpec(id=other, dim=8)), p)
    with pytest.raises(ClassifierError, match=f"needs encoder {other}.*all-MiniLM-L6-v2"):
        load_classifier(p)


def test_task_head_member_round_trips_and_mixes_the_table(tmp_path: Path) -> None:
    from dataclasses import replace

    from tiergate.routing.artifact import Layer, Member
    from tiergate.routing.scorer import head_forward

    art = tiny_artifact("multi_tier", tiers=3)
    # A task head whose logits favour task 1 strongly: output is (almost) row 1 of the table.
    w = np.zeros((8, 2), dtype=np.float32)
    b = np.array([0.0, 20.0], dtype=np.float32)
    table = np.array([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]], dtype=np.float32)
    task = Member(layers=[Layer(w, b, "identity")], output="softmax", weight=1.0, table=table)
    art = art.with_updates(members=[task])
    out = head_forward(art, np.ones((2, 8), dtype=np.float32))
    np.testing.assert_allclose(out, [[0.9, 0.8, 0.7]] * 2, atol=1e-6)
    p = tmp_path / "t.json"
    save_artifact(art, p)
    back = load_artifact(p)
    np.testing.assert_allclose(head_forward(back, np.ones((1, 8), dtype=np.float32)), [[0.9, 0.8, 0.7]], atol=2e-3)
    bad = replace(task, table=np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ArtifactError, match="table shape"):
        art.with_updates(members=[bad])


def test_slot_keeps_the_last_good_artifact(tmp_path: Path) -> None:
    from tiergate.routing.artifact import ArtifactSlot

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    save_artifact(tiny_artifact(seed=3), good)
    bad.write_text('{"format": "tiergate.router", "format_version": 1}')
    slot = ArtifactSlot()
    assert slot.reload(good) is None
    kept = slot.current
    err = slot.reload(bad)
    assert isinstance(err, ArtifactError)
    assert "checksum" in str(err)
    assert slot.current is kept
