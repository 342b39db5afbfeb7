"""The Spark pair scoring of dedup equals the numpy calibration it is fitted with."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import schemas as S
from pipeline.core import calibration as C
from pipeline.stages import dedup as dd


def _knn_rows(n=40, k=7, seed=3):
    """Exact kNN lists (self first) of clustered unit vectors, as the search returns them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, 16))
    X = centres[rng.integers(0, 8, n)] + 0.6 * rng.normal(size=(n, 16))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    sims = X @ X.T
    rows = []
    for q in range(n):
        for r, j in enumerate(np.argsort(-sims[q], kind="stable")[:k]):
            rows.append((f"img{q:03d}", f"img{j:03d}", r, float(np.float32(sims[q, j]))))
    # a lone image with no other neighbour (its level is -1) and a short list (level = its last)
    rows += [("lone", "lone", 0, 1.0), ("short", "short", 0, 1.0), ("short", "img000", 1, 0.5)]
    return rows


@pytest.mark.parametrize("space", ["raw", "centred_nodba"])
def test_spark_scores_equal_numpy(spark, space):
    rows = _knn_rows()
    cal = C.Calibration.load(C.shipped(space))
    nb = spark.createDataFrame(rows, S.NEIGHBORS_TABLE)
    got = {(r[S.IMAGE_ID_A], r[S.IMAGE_ID_B]): (r[S.SIMILARITY], r[dd.SCORE])
           for r in dd.score_pairs(dd.pairs_from_neighbors(nb, -1.0), nb, cal).collect()}
    q, n, rk, s = (np.array(c) for c in zip(*rows))
    keys, cos, la, lb = C.pair_table(q, n, rk, s, cal.rank)
    want = dict(zip(keys, cal.probability(cos, la, lb)))
    assert set(got) == set(want) and len(want) > 100
    np.testing.assert_allclose([got[k][1] for k in keys], [want[k] for k in keys], atol=1e-5)
    levels = {r[S.IMAGE_ID]: r[dd.LEVEL] for r in dd.neighbour_levels(nb, cal.rank).collect()}
    numpy_levels = C.neighbour_levels(q, n, rk, s, cal.rank)
    assert "lone" not in levels and numpy_levels["lone"] == -1.0  # Spark: missing, scored as -1
    assert levels == pytest.approx({k: v for k, v in numpy_levels.items() if k != "lone"})
