"""Metrics on hand-checked cases."""
import pytest

from pipeline.core import metrics as M


def test_ns_score_counts_group_members_in_top4_query_included():
    group_of = {"a0": 0, "a1": 0, "a2": 0, "a3": 0, "b0": 1, "b1": 1, "b2": 1, "b3": 1}
    rankings = {
        "a0": ["a0", "a1", "a2", "a3"],  # 4
        "a1": ["a1", "b0", "a2", "b1"],  # 2
        "b0": ["a0", "a1", "a2", "a3"],  # 0
        "b1": ["b1", "b2", "a0", "b3", "b0"],  # 3 (b0 is 5th: ignored)
    }
    assert M.ns_score(rankings, group_of) == pytest.approx((4 + 2 + 0 + 3) / 4)


def test_average_precision_by_hand():
    # Relevant at ranks 0 and 2 of 2: (1/1 + 2/3) / 2
    assert M.average_precision(["r1", "x", "r2"], {"r1", "r2"}) == pytest.approx((1 + 2 / 3) / 2)
    assert M.average_precision(["r1", "r2", "x"], {"r1", "r2"}) == pytest.approx(1.0)
    # A relevant image never retrieved contributes nothing.
    assert M.average_precision(["r1", "x"], {"r1", "r2"}) == pytest.approx(0.5)
    assert M.average_precision(["x", "r1"], {"r1"}) == pytest.approx(0.5)


def test_average_precision_holidays_trapezoid():
    # INRIA's script: (1+1)/2*0.5 + (1/2+2/3)/2*0.5
    assert M.average_precision(["r1", "x", "r2"], {"r1", "r2"}, trapezoid=True) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    assert M.average_precision(["r1", "r2", "x"], {"r1", "r2"}, trapezoid=True) == pytest.approx(1.0)
    # First relevant at rank 1: precision before = 0/1, after = 1/2.
    assert M.average_precision(["x", "r1"], {"r1"}, trapezoid=True) == pytest.approx(0.25)


def test_map_excludes_the_query_from_its_own_ranking():
    rankings = {"q": ["q", "r", "x"], "p": ["x", "p", "s"]}
    relevant = {"q": ["r"], "p": ["s"]}
    # q: r at rank 0 -> 1.0 ; p: ranking without p is [x, s] -> 1/2 (trapezoid: 1/4)
    assert M.mean_average_precision(rankings, relevant) == pytest.approx((1.0 + 0.5) / 2)
    assert M.mean_average_precision(rankings, relevant, trapezoid=True) == pytest.approx((1.0 + 0.25) / 2)


def test_pair_precision_recall():
    truth = M.true_pairs({"a": 1, "b": 1, "c": 1, "d": 2})
    assert truth == {("a", "b"), ("a", "c"), ("b", "c")}
    p, r = M.pair_precision_recall([("b", "a"), ("c", "d")], truth)
    assert (p, r) == (pytest.approx(0.5), pytest.approx(1 / 3))
    assert M.pair_precision_recall([], truth) == (1.0, 0.0)


def test_empty_inputs_are_errors():
    with pytest.raises(ValueError):
        M.ns_score({}, {})
    with pytest.raises(ValueError):
        M.average_precision(["a"], set())
