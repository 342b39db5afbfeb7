"""The dedup's pair arithmetic on the driver (pipeline.core.pairs); its agreement with the
Spark path is checked on a real run in tests/spark/test_driver_dedup.py."""
from __future__ import annotations

import datetime as dt
import random

import numpy as np
import pytest

from pipeline.core import grouping as G
from pipeline.core import pairs as P
from pipeline.core.calibration import candidate_pairs


def test_the_pure_pair_functions_on_hand_made_rows():
    q = np.array(["a", "a", "a", "b", "b", "c"], object)
    n = np.array(["a", "c", "b", "b", "a", "a"], object)
    r = np.array([0, 1, 2, 0, 1, 0])
    s = np.array([1.0, 0.9, 0.5, 1.0, 0.6, 0.95], np.float32)
    ids, lists, values = P.knn_lists(q, n, r, s, k=1)
    assert ids == ["a", "b", "c"] and lists == [["c"], ["a"], ["a"]]
    assert P.list_levels(ids, values, rank=3) == {"a": pytest.approx(0.9), "b": pytest.approx(0.6),
                                                 "c": pytest.approx(0.95)}
    a, b, best = candidate_pairs(q, n, s)
    assert list(zip(a, b)) == [("a", "b"), ("a", "c")] and best.tolist() == pytest.approx([0.6, 0.95])
    assert P.histogram(np.array([0.951, 0.955, -1.0, 1.0, np.nan])) == {"-1.00": 1, "0.95": 2, "0.99": 1}


def test_groups_keep_the_policy_s_choice_and_count_their_members():
    rng = random.Random(5)
    nodes = [f"img{i:02d}" for i in range(40)]
    labels = G.connected_components((rng.choice(nodes), rng.choice(nodes)) for _ in range(30))
    days = [None, dt.datetime(2020, 1, 1), dt.datetime(2021, 1, 1)]
    cands = {n: G.Candidate(n, f"/d/{rng.choice('ab')}/{n}.jpg", rng.choice([10, 20]), rng.choice([10, 20]),
                            rng.choice([100, 200]), rng.choice(["JPEG", "PNG", None]), rng.choice(days)) for n in labels}
    info = {n: {"path": c.path, "width": c.width, "height": c.height, "size_bytes": c.size_bytes,
                "format": c.format, "modification_time": c.modification_time} for n, c in cands.items()}
    for policy, folders in (("pixels", []), ("largest", []), ("oldest", []), ("newest", []), ("pixels", ["/d/b"])):
        groups = P.groups_with_keep(labels, info, policy, folders)
        members: dict = {}
        for n, g in labels.items():
            members.setdefault(g, []).append(cands[n])
        keepers = dict(zip(groups[groups.keep].group_id, groups[groups.keep].image_id))
        assert keepers == {g: G.choose_keeper(m, policy, folders) for g, m in members.items()}, policy
        assert all(size == len(members[g]) for g, size in zip(groups.group_id, groups.group_size))
    smallest = P.groups_with_keep(labels, None)
    assert set(smallest[smallest.keep].image_id) == {min(n for n in labels if labels[n] == g) for g in set(labels.values())}
