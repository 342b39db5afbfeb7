"""The similarity of query and incremental dedup (pipeline.core.matching) against plain numpy."""
from __future__ import annotations

import numpy as np

from pipeline.core import matching
from pipeline.core.rerank import database_side_augmentation
from pipeline.core.vectors import l2_normalize


def _data(n=40, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = l2_normalize(rng.standard_normal((n, d)).astype(np.float32))
    x[1] = l2_normalize(x[0] + 0.1 * rng.standard_normal(d).astype(np.float32))
    return x


def test_augment_query_is_dba_with_the_query_in_the_database():
    x = _data()
    k = 3
    sims = x @ x.T
    order = np.argsort(-sims, axis=1)
    full = database_side_augmentation(x, order, np.take_along_axis(sims, order, axis=1), k, 3.0)
    # Row 0 as a new image against the other rows: its archive neighbours, then itself.
    archive = x[1:]
    s = archive @ x[0]
    best = np.argsort(-s)[:k]
    got = matching.augment_query(x[0], s[best], list(archive[best]), k, 3.0)
    assert np.allclose(got, full[0], atol=1e-6)


def test_pair_scores_are_the_best_variant_in_either_direction():
    x = _data()
    aug, rot = x[:20], x[20:]
    var = np.stack([aug, rot], axis=1)
    s = matching.pair_scores(var[:5], aug[:5], var, aug)
    for i in range(5):
        for j in range(20):
            want = max(aug[i] @ aug[j], rot[i] @ aug[j], aug[j] @ aug[i], rot[j] @ aug[i])
            assert abs(s[i, j] - want) < 1e-6


def test_best_matches_keeps_threshold_and_k():
    scores = np.array([[0.5, 0.95, 0.9, 0.95], [0.1, 0.2, 0.3, 0.4]], np.float32)
    assert matching.best_matches(scores, 2, 0.88) == [[(1, 0.949999988079071), (3, 0.949999988079071)], []]


def test_merge_lists_drops_padding():
    vals, ids = matching.merge_lists(np.array([[0.9, 0.1]]), np.array([[3, -1]]), np.array([[0.5]]), np.array([[7]]), 2)
    assert ids.tolist() == [[3, 7]] and np.allclose(vals, [[0.9, 0.5]])


def test_light_query_column_names_match_the_schemas():
    from pipeline import querylight, schemas

    for name in ("STATUS_OK", "STATUS_ERROR", "IMAGE_ID", "PATH", "EMBEDDING", "FAISS_ID"):
        assert getattr(querylight.S, name) == getattr(schemas, name)


def test_merged_lists_tell_the_levels_a_fresh_search_finds():
    """Lists updated by merge_list after some images changed (calibrated incremental dedup) against
    lists computed from scratch: a level they report is the true one, the bound covers every
    unlisted image, and some levels cannot be told (those are recomputed)."""
    rng = np.random.default_rng(1)
    n, k, rank = 60, 8, 6
    x = _data(n=n, d=8, seed=3)

    def exact(vectors):
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -np.inf)
        order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), -sims), axis=1)
        return sims, order

    sims, order = exact(x)
    lists = {z: ([int(c) for c in order[z, :k]], [float(sims[z, c]) for c in order[z, :k]], float(sims[z, order[z, k - 1]]))
             for z in range(n)}
    changed = set(rng.choice(n, 30, replace=False).tolist())
    y = x.copy()
    y[list(changed)] = l2_normalize(y[list(changed)] + 2.0 * rng.standard_normal((30, 8)).astype(np.float32))
    new_sims, new_order = exact(y)
    told = unknown = 0
    for z in set(range(n)) - changed:
        ds = sorted(changed, key=lambda c: (-new_sims[z, c], c))[:k + 1]
        ids, vals, bound = matching.merge_list(*lists[z], changed, ds, [new_sims[z, c] for c in ds], k)
        level = matching.list_level(vals, bound, rank)
        truth = new_sims[z, new_order[z, rank - 1]]
        assert all(new_sims[z, c] <= bound + 1e-6 for c in set(range(n)) - set(ids) - {z})
        assert matching.outside_bound(vals, bound, k) >= new_sims[z, new_order[z, k - 1]] - 1e-6
        if level is None:
            unknown += 1
        else:
            told += 1
            assert abs(level - truth) < 1e-6
    assert told > 10 and unknown > 0


def test_small_collections_list_everything():
    assert matching.list_level([0.9, 0.5], matching.NO_BOUND, 10) == 0.5
    assert matching.list_level([], matching.NO_BOUND, 10) == -1.0
    assert matching.list_level([0.9, 0.5], 0.4, 10) is None
    assert matching.outside_bound([0.9, 0.5], matching.NO_BOUND, 2) is None
    ids, sims, bound = matching.merge_list(["a", "b"], [0.9, 0.5], matching.NO_BOUND, {"b"}, ["b", "c"], [0.7, 0.2], 2)
    assert (ids, sims, bound) == (["a", "b"], [0.9, 0.7], 0.2)
