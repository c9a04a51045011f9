"""Scorer contract: basis-point thresholds, N-tier choice with cost weights (rules from operating_points, which
test_routing_operating_points.py covers), the embedding cache and prompt features."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.routing import FakeEncoder, tiny_artifact
from tiergate.routing.errors import RoutingError
from tiergate.routing.operating_points import choose_tiers
from tiergate.routing.scorer import Scorer


def test_threshold_basis_points_semantics() -> None:
    sc = Scorer(tiny_artifact(), FakeEncoder())
    prompts = [f"p{i}" for i in range(50)]
    s = sc.score(prompts)
    assert s.shape == (50,)
    bp = int(np.median(s) * 10000)
    np.testing.assert_array_equal(sc.route_strong(prompts, bp), s >= bp / 10000)
    assert sc.route_strong(prompts, 0).all()
    with pytest.raises(RoutingError, match="basis points"):
        sc.route_strong(prompts, 10001)
    with pytest.raises(RoutingError, match="basis points"):
        sc.route_strong(prompts, 0.5)  # type: ignore[arg-type]


def test_scorer_without_encoder_takes_embeddings() -> None:
    sc = Scorer(tiny_artifact(), None)
    emb = FakeEncoder().encode(["a", "b"])
    assert sc.score_embeddings(emb).shape == (2,)
    with pytest.raises(RoutingError, match="no encoder"):
        sc.score(["a"])
    with pytest.raises(RoutingError, match="do not match encoder dim"):
        sc.score_embeddings(np.zeros((2, 3)))


def test_choose_trades_quality_for_price_and_ties_go_cheap() -> None:
    art = tiny_artifact("multi_tier", tiers=3)  # prices 0.2, 0.4, 0.6
    q = np.array([[0.5, 0.6, 0.9], [0.7, 0.7, 0.7], [0.1, 0.2, 0.25]])
    prices = [t.price for t in art.tiers]
    np.testing.assert_array_equal(choose_tiers(q, prices, 0), [2, 0, 2])
    # lambda 0.5: utilities row0 0.4,0.4,0.6 -> 2; row2 0.0,0.0,-0.05 -> cheapest of the tie, 0.
    np.testing.assert_array_equal(choose_tiers(q, prices, 5000), [2, 0, 0])
    np.testing.assert_array_equal(choose_tiers(q, prices, 100000), [0, 0, 0])
    sc = Scorer(art, FakeEncoder())
    assert sc.quality(["x", "y"]).shape == (2, 3)
    emb = FakeEncoder().encode(["x", "y"])
    # The scorer's choice is choose_tiers on its own prediction, at the artifact's default weight or the one given.
    np.testing.assert_array_equal(sc.choose(["x", "y"]), choose_tiers(sc.quality(["x", "y"]), prices, 0))
    np.testing.assert_array_equal(
        sc.choose_embeddings(emb, 5000, ["x", "y"]), choose_tiers(sc.quality_embeddings(emb), prices, 5000)
    )
    with pytest.raises(RoutingError, match="two_tier"):
        sc.score(["x"])


def test_cached_encoder_embeds_each_text_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tiergate.training.embeddings import CachedEncoder

    inner = FakeEncoder()
    enc = CachedEncoder(lambda: inner, encoder_id=inner.encoder_id, dim=inner.dim, cache_dir=tmp_path)
    a = enc.encode(["x", "y", "x"])
    assert inner.texts == 2
    # A fresh cache object reads the shard from disk and never builds the inner encoder.
    enc2 = CachedEncoder(
        lambda: pytest.fail("inner encoder built on a full cache"),
        encoder_id=inner.encoder_id,
        dim=inner.dim,
        cache_dir=tmp_path,
    )
    np.testing.assert_array_equal(enc2.encode(["y", "x"]), a[[1, 0]])
    assert not list(enc2.directory.glob(".shard-*"))


def test_prompt_features_are_standardised_and_need_the_texts() -> None:
    from tiergate.routing.artifact import Feature, Layer, Member
    from tiergate.routing.features import raw_features

    base = tiny_artifact()
    # One linear member reading only the feature column (weight 1 on row 8): score = sigmoid(z(log_chars)).
    w = np.zeros((9, 1), dtype=np.float32)
    w[8, 0] = 1.0
    member = Member(layers=[Layer(w, np.zeros(1, dtype=np.float32), "identity")], output="sigmoid")
    art = base.with_updates(members=[member], features=[Feature("log_chars", mean=2.0, std=0.5)])
    sc = Scorer(art, FakeEncoder())
    texts = ["short", "a much longer prompt than the other one"]
    z = (raw_features(["log_chars"], texts)[:, 0] - 2.0) / 0.5
    np.testing.assert_allclose(sc.score(texts), 1 / (1 + np.exp(-z)), rtol=1e-6)
    assert sc.score(texts)[1] > sc.score(texts)[0]
    with pytest.raises(RoutingError, match="pass the prompt texts"):
        sc.score_embeddings(FakeEncoder().encode(texts))
    with pytest.raises(RoutingError, match="unknown prompt feature"):
        raw_features(["bogus"], texts)
