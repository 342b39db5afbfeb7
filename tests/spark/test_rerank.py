"""The Spark re-ranking (DBA, alpha-QE) gives what the numpy functions give on the whole database."""
from __future__ import annotations

import numpy as np

from pipeline import schemas as S
from pipeline.core import storage
from pipeline.core.rerank import alpha_query_expansion, database_side_augmentation
from pipeline.core.vectors import l2_normalize
from pipeline.stages import rerank, tables
from tests.helpers import make_config


def _setup(spark, tmp_path, n=40, d=8, k=4):
    D = l2_normalize(np.random.default_rng(5).normal(size=(n, d)))
    ids = [f"img{i:03d}" for i in range(n)]
    sims = D @ D.T
    knn = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    knn_sim = np.take_along_axis(sims, knn, axis=1)
    neighbors = spark.createDataFrame(
        [(ids[q], ids[int(j)], r, float(knn_sim[q, r])) for q in range(n) for r, j in enumerate(knn[q])],
        S.NEIGHBORS_TABLE)
    embeddings = spark.createDataFrame([(ids[i], "sha", "m", D[i].tolist(), S.STATUS_OK, None) for i in range(n)],
                                       S.EMBEDDING_TABLE)
    return D, ids, knn, knn_sim, neighbors, embeddings


def _as_array(df, ids):
    got = {r[S.IMAGE_ID]: r[S.EMBEDDING] for r in df.collect()}
    return np.array([got[i] for i in ids], dtype=np.float32)


def test_spark_dba_equals_numpy(spark, tmp_path):
    D, ids, knn, knn_sim, neighbors, embeddings = _setup(spark, tmp_path)
    got = _as_array(rerank.augment_database(neighbors, embeddings, 3.0), ids)
    np.testing.assert_allclose(got, database_side_augmentation(D, knn, knn_sim, k=4, alpha=3.0), atol=1e-5)


def test_spark_query_expansion_equals_numpy(spark, tmp_path):
    D, ids, knn, knn_sim, neighbors, embeddings = _setup(spark, tmp_path)
    config = make_config(tmp_path, embed__backbone="mobilenet")
    tables.write_table(embeddings, storage.Workdir.of(config.workdir).embeddings("mobilenet"))
    queries = embeddings.select(S.IMAGE_ID, S.EMBEDDING)
    got = _as_array(rerank.expand_queries(spark, config, queries, neighbors, 2, 3.0), ids)
    # The query itself (rank 0) is left out of its own expansion.
    np.testing.assert_allclose(got, alpha_query_expansion(D, D, knn[:, 1:], k=2, alpha=3.0), atol=1e-5)
