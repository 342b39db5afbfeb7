"""Pair calibration without Spark: neighbour levels, the model, the artifact, the curves."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.core import calibration as C


def _lists():
    # query, neighbour, rank, similarity (self first, as the search returns them)
    rows = [("a", "a", 0, 1.0), ("a", "b", 1, 0.95), ("a", "c", 2, 0.5), ("a", "d", 3, 0.4),
            ("b", "b", 0, 1.0), ("b", "a", 1, 0.95), ("b", "d", 2, 0.7),
            ("c", "c", 0, 1.0),
            ("d", "d", 0, 1.0), ("d", "b", 1, 0.7), ("d", "a", 2, 0.45)]
    return [np.array(col) for col in zip(*rows)]


def test_levels_are_the_kth_other_neighbour_or_the_last():
    q, n, r, s = _lists()
    assert C.neighbour_levels(q, n, r, s, 2) == {"a": 0.5, "b": 0.7, "c": -1.0, "d": 0.45}
    assert C.neighbour_levels(q, n, r, s, 1)["a"] == 0.95
    assert C.neighbour_levels(q, n, r, s, 10)["a"] == pytest.approx(0.4)  # fewer than 10: the last


def test_candidate_pairs_unordered_best_similarity_no_self():
    q, n, r, s = _lists()
    a, b, best = C.candidate_pairs(q, n, s)
    pairs = dict(zip(zip(a.tolist(), b.tolist()), best.tolist()))
    assert list(pairs) == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d")]  # sorted
    assert pairs[("a", "d")] == pytest.approx(0.45)  # the better of the two directions


def test_normalised_score_subtracts_the_higher_level():
    f = C.features([0.9, 0.9], [0.5, 0.8], [0.7, 0.2])
    assert f["normalised"] == pytest.approx([0.2, 0.1])


def _synthetic(n=400, seed=0):
    """Duplicates stand out from their neighbourhood; dense neighbourhoods lift unrelated pairs."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(0.3, 0.85, n)
    dup = rng.random(n) < 0.3
    cos = np.where(dup, np.minimum(1.0, level + rng.uniform(0.05, 0.3, n)), level + rng.normal(0.0, 0.03, n))
    return cos, level, level - rng.uniform(0, 0.05, n), dup


def test_fit_orders_pairs_by_how_far_they_stand_out(tmp_path):
    cos, la, lb, y = _synthetic()
    cal = C.fit(cos, la, lb, y, rank=10, space="raw", params={"fitted_on": ["synthetic"]})
    p = cal.probability(cos, la, lb)
    assert ((p >= 0) & (p <= 1)).all()
    # Same cosine, crowded neighbourhood -> lower probability.
    assert cal.probability([0.85], [0.8], [0.8])[0] < cal.probability([0.85], [0.4], [0.4])[0]
    kept = p >= 0.9
    assert kept.sum() > 0 and y[kept].mean() >= 0.9
    # The artifact round-trips and is refused when edited.
    path = tmp_path / C.artifact_name(cal)
    cal.save(path)
    back = C.Calibration.load(path)
    assert back == cal and back.version == cal.version and len(cal.version) == 12
    np.testing.assert_allclose(back.probability(cos, la, lb), p)
    import json
    meta = json.loads(str(np.load(path)["metadata"]))
    meta["intercept"] += 1.0
    np.savez(path, metadata=np.array(json.dumps(meta)))
    with pytest.raises(ValueError, match="content hash"):
        C.Calibration.load(path)


def test_fit_needs_both_labels():
    with pytest.raises(ValueError, match="both"):
        C.fit([0.9, 0.8], [0.5, 0.5], [0.5, 0.5], [1, 1], rank=10, space="raw")


@pytest.mark.parametrize("space", C.SPACES)
def test_shipped_artifacts_load(space):
    cal = C.Calibration.load(C.shipped(space))
    assert cal.space == space and cal.rank >= 1 and set(cal.params["fitted_on"]) == {"ukbench-dev", "holidays-dev"}
    # A higher cosine at the same levels, or a calmer neighbourhood, is never less likely a duplicate.
    p = cal.probability([0.80, 0.90, 0.90], [0.6, 0.6, 0.3], [0.6, 0.6, 0.3])
    assert p[0] < p[1] < p[2]
    # Near-identical copies in a large group (a burst: its 10th neighbour is a copy too) stay
    # duplicates: levels above the cap count as the cap.
    assert cal.level_cap is not None and cal.probability([0.995], [0.97], [0.98])[0] >= 0.9


FITTED_BACKBONES = sorted(d for d in os.listdir(C.PACKAGE_DIR) if os.path.isdir(os.path.join(C.PACKAGE_DIR, d)))


@pytest.mark.parametrize("space", C.SPACES)
def test_each_backbone_gets_the_calibration_fitted_for_it_or_the_default_ones(space):
    default = C.shipped(space)
    assert C.Calibration.load(default).params["backbone"] == C.DEFAULT_BACKBONE
    assert FITTED_BACKBONES, "the fast profile's backbone ships its own calibration"
    for backbone in FITTED_BACKBONES:
        own = C.shipped(space, backbone)
        assert os.path.dirname(own) == os.path.join(C.PACKAGE_DIR, backbone)
        cal = C.Calibration.load(own)
        assert (cal.space, cal.params["backbone"]) == (space, backbone) and cal.version != C.Calibration.load(default).version
    # A backbone fitted for nowhere, or a user's model file, falls back to the default backbone's.
    assert C.shipped(space, "resnet50") == default
    assert C.shipped(space, "/models/my_model.keras") == default and C.shipped(space, "..") == default


def test_precision_recall_counts_unproposed_duplicates_as_missed():
    scores = np.array([0.9, 0.8, 0.7, 0.2])
    labels = np.array([True, True, False, True])
    pr = C.precision_recall(scores, labels, n_true=5, thresholds=[0.75, 0.0, 0.95])
    assert pr[0] == {"threshold": 0.75, "pairs": 2, "precision": 1.0, "recall": 0.4}
    assert pr[1]["precision"] == 0.75 and pr[1]["recall"] == pytest.approx(0.6)
    assert pr[2]["pairs"] == 0 and pr[2]["precision"] == 1.0
    curve = C.curve(scores, labels, 5, points=11)
    assert [(p["threshold"], p["pairs"], p["recall"]) for p in curve] == [(0.9, 1, 0.2), (0.8, 2, 0.4), (0.7, 3, 0.4),
                                                                         (0.2, 4, 0.6)]
    assert curve[2]["precision"] == pytest.approx(2 / 3)
    assert len(C.curve(np.linspace(0, 1, 1000), np.ones(1000, bool), 1000, points=50)) == 50


def test_unlisted_can_pass_bounds_every_pair_below_the_list():
    """A pair outside a's list has cosine <= upper(a) and a level >= min(level_a, cap): when
    unlisted_can_pass says no, no such pair reaches the threshold (the incremental dedup's check)."""
    cal = C.Calibration(10, (8.0, 12.0), -14.0, "raw", level_cap=0.8)
    rng = np.random.default_rng(0)
    upper, level_a, level_b = rng.uniform(0.3, 1.0, 2000), rng.uniform(0.2, 1.0, 2000), rng.uniform(-1.0, 1.0, 2000)
    cosine = upper - rng.uniform(0.0, 0.2, 2000)
    can = C.unlisted_can_pass(upper, level_a, cal, 0.9)
    assert can.any() and (~can).any()
    assert (cal.probability(cosine, level_a, level_b)[~can] < 0.9).all()
    # A model whose score falls with the cosine gives no such bound.
    assert C.unlisted_can_pass(upper, level_a, C.Calibration(10, (-1.0, 12.0), -14.0, "raw"), 0.9).all()
