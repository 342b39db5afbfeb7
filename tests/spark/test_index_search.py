"""Every index type finds the pairs exact search finds, with the true cosine as similarity.

A synthetic embedding table (1024-d, mean cosine ~0.43 between unrelated rows, near-copies
planted at cosine 0.90-0.97) is indexed with each type and searched all-against-all through
the real Spark stages; the pairs above the threshold are compared with brute force in numpy.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline import schemas as S
from pipeline.config import IndexSettings
from pipeline.core import faiss_index, storage
from pipeline.core.synthetic import exact_pairs, near_copy_table
from pipeline.stages import index as ix
from pipeline.stages import search, tables
from pipeline.stages.dedup import pairs_from_neighbors
from tests.helpers import make_config

N, DIM, THRESHOLD = 2000, 1024, 0.88


@pytest.fixture(scope="module")
def table(spark, tmp_path_factory):
    vectors, planted = near_copy_table(N, DIM, copy_fraction=0.1, seed=3)
    workdir = tmp_path_factory.mktemp("index-types")
    config = make_config(workdir, dedup__rotations=[0], dedup__dba_k=0, dedup__qe_k=0)
    ids = [f"img{i:05d}" for i in range(N)]
    frame = pd.DataFrame({S.IMAGE_ID: ids, S.CONTENT_SHA256: None, S.BACKBONE: config.embed.backbone,
                          S.EMBEDDING: list(vectors), S.STATUS: S.STATUS_OK, S.ERROR: None})
    df = spark.createDataFrame(frame, S.EMBEDDING_TABLE).repartition(4)
    tables.write_table(df, storage.Workdir.of(config.workdir).embeddings(config.embed.backbone))
    truth = {(ids[i], ids[j]): s for (i, j), s in exact_pairs(vectors, THRESHOLD).items()}
    assert len(truth) >= len(planted) * 0.99  # the planted copies are what the test is about
    return config, truth


def _pairs(spark, config):
    neighbors = search.search_neighbors(spark, config, config.dedup.k + 1)
    rows = pairs_from_neighbors(neighbors, THRESHOLD).collect()
    return {(r[S.IMAGE_ID_A], r[S.IMAGE_ID_B]): r[S.SIMILARITY] for r in rows}


@pytest.mark.parametrize("index_type, overrides, factory", [
    ("flat", {"index__shards": 2}, "IDMap2,Flat"),
    ("ivf_flat", {}, "IVF"),
    ("ivf_sq", {"index__shards": 3}, "SQfp16"),
    ("ivf_pq", {}, "Refine(SQfp16)"),
    ("hnsw", {}, "HNSW"),
    # auto above its exact-search limit: IVF with fp16 codes, shards from a small memory budget.
    ("auto", {"index__auto_flat_max": 1000, "index__max_memory": "16m", "index__query_block": 1024}, "SQfp16"),
])
def test_pairs_match_exact_search_with_true_cosines(spark, table, index_type, overrides, factory):
    config, truth = table
    cfg = config.with_overrides(index__type=index_type, **overrides)
    info = ix.build_index(spark, cfg)
    assert factory in info.meta["factory"] and info.meta["count"] == N
    assert sum(s["count"] for s in info.meta["shards"]) == N and info.meta["reason"]
    if index_type == "auto":
        assert info.meta["type"] == "ivf_sq" and len(info.meta["shards"]) >= 2, info.meta
    got = _pairs(spark, cfg)
    found = set(got) & set(truth)
    assert len(found) / len(truth) >= 0.98, (index_type, len(found), len(truth))
    # Precision 1 by construction: every similarity is the true cosine, so nothing below passes.
    assert set(got) <= set(truth), sorted(set(got) - set(truth))[:5]
    errors = [abs(got[p] - truth[p]) for p in found]
    assert max(errors) <= 1e-3, (index_type, max(errors))


def test_auto_records_its_decision_and_stays_exact_when_small(spark, table):
    config, truth = table
    info = ix.build_index(spark, config)  # defaults: auto, 3000 vectors -> exact
    meta = json.loads(storage.read_bytes(f"{info.path}/index.json"))
    assert meta["type"] == "flat" and meta["requested_type"] == "auto" and meta["nlist"] == 0
    assert "auto_flat_max" in meta["reason"] and meta["estimated_bytes"] >= N * DIM * 4
    assert not any("train_sample" in p for p in _listing(info.path))  # the sample is not kept
    assert _pairs(spark, config) == pytest.approx(truth, abs=1e-5)


def _listing(path: str) -> list[str]:
    import os

    local = storage.local_path_of(path)
    return [os.path.join(d, f) for d, _, fs in os.walk(local) for f in fs]


def test_plan_sizes_lists_shards_and_training_from_n_and_memory():

    plan = faiss_index.plan_index(IndexSettings(), 100_000, 1024)
    assert plan.factory == "IVF1024,SQfp16" and plan.shards == 1 and plan.train_size == 64 * 1024
    # nprobe follows the list count (recall held at 1M), unless the user forces it.
    assert plan.nprobe == 16
    assert faiss_index.plan_index(IndexSettings(), 1_000_000, 1024).nprobe == 32
    assert faiss_index.plan_index(IndexSettings(nprobe=8), 1_000_000, 1024).nprobe == 8
    big = faiss_index.plan_index(IndexSettings(), 10_000_000, 1024)
    # fp16 codes + ids: 2056 bytes a vector; half of 4 GiB per shard -> about 11 shards.
    assert big.nlist == 16384 and 10 <= big.shards <= 12 and big.train_size == 100_000 and big.nprobe == 64
    assert faiss_index.plan_index(IndexSettings(shards=5), 10_000_000, 1024).shards == 5
    assert faiss_index.plan_index(IndexSettings(), 5000, 1024).factory == "IDMap2,Flat"
    with pytest.raises(ValueError, match="max_memory"):
        faiss_index.plan_index(IndexSettings(max_memory="16m", query_block=16384), 100_000, 1024)


def test_big_block_list_scan_equals_index_search():
    """The BLAS list scan used for big query blocks returns what IVF search returns."""
    vectors, _ = near_copy_table(4000, 64, seed=1)
    index = faiss_index.new_index("IVF32,SQfp16", 64)
    index.train(vectors)
    index.add_with_ids(vectors, np.arange(4000, dtype=np.int64) + 7)
    faiss_index.set_search_params(index, IndexSettings(nprobe=4))
    d1, i1 = faiss_index.search_shard(index, vectors[:1000], 5)  # 1000 * 4 probes > 4 * 32 lists
    d2, i2 = index.search(vectors[:1000], 5)
    assert (i1[:, 0] == i2[:, 0]).mean() > 0.99
    np.testing.assert_allclose(d1[:, 0], d2[:, 0], atol=1e-4)


@pytest.mark.parametrize("index_type, overrides", [
    ("flat", {}),
    # IVF in two shards: DBA neighbours and re-scored candidates come from both shards' stores.
    ("auto", {"index__auto_flat_max": 1000, "index__max_memory": "16m", "index__query_block": 1024}),
])
def test_dba_from_one_raw_search_equals_exact_dba(spark, table, index_type, overrides):
    """DBA vectors from the raw search's top dba_k, candidates re-scored with them: the pairs and
    cosines of exhaustive search over exact DBA vectors (pipeline.core.rerank)."""
    from pipeline.core.rerank import database_side_augmentation

    config, _ = table
    cfg = config.with_overrides(index__type=index_type, dedup__dba_k=3, dedup__dba_alpha=3.0, **overrides)
    ix.build_index(spark, cfg)
    vectors, _ = near_copy_table(N, DIM, copy_fraction=0.1, seed=3)
    sims = vectors @ vectors.T
    knn = np.argsort(-sims, axis=1, kind="stable")[:, :3]
    augmented = database_side_augmentation(vectors, knn, np.take_along_axis(sims, knn, axis=1), k=3, alpha=3.0)
    ids = [f"img{i:05d}" for i in range(N)]
    truth = {(ids[i], ids[j]): s for (i, j), s in exact_pairs(augmented, THRESHOLD).items()}
    got = _pairs(spark, cfg)
    found = set(got) & set(truth)
    assert len(found) / len(truth) >= 0.98, (len(found), len(truth))
    # IVF may find another third neighbour for a vector: cosines within 5e-3.
    near = {(ids[i], ids[j]) for i, j in exact_pairs(augmented, THRESHOLD - 5e-3)}
    assert set(got) <= near, sorted(set(got) - near)[:5]
    assert max(abs(got[p] - truth[p]) for p in found) <= 5e-3


def _write_embeddings(spark, config, ids, vectors, parts):
    frame = pd.DataFrame({S.IMAGE_ID: ids, S.CONTENT_SHA256: None, S.BACKBONE: config.embed.backbone,
                          S.EMBEDDING: list(vectors), S.STATUS: S.STATUS_OK, S.ERROR: None})
    df = spark.createDataFrame(frame, S.EMBEDDING_TABLE).repartition(parts)
    tables.write_table(df, storage.Workdir.of(config.workdir).embeddings(config.embed.backbone))


def test_append_then_all_pairs_after_the_table_is_rewritten(spark, tmp_path):
    """The incremental dedup's append (one more shard, hashed ids, its own store), then the
    embedding table rewritten (the incremental embed replaces its files): the all-pairs search
    reads the stores, so it finds exact search's pairs over old + new vectors, DBA included."""
    from pipeline.core.rerank import database_side_augmentation

    vectors, _ = near_copy_table(N, DIM, copy_fraction=0.1, seed=5)
    ids = [f"img{i:05d}" for i in range(N)]
    old = N - 60
    config = make_config(tmp_path, dedup__rotations=[0], dedup__dba_k=0, dedup__qe_k=0, index__type="flat",
                         index__shards=2, index__query_block=512)
    _write_embeddings(spark, config, ids[:old], vectors[:old], 4)
    info = ix.build_index(spark, config)
    _write_embeddings(spark, config, ids, vectors, 3)  # new files: units.json names none of them
    after = ix.append_to_index(config, info, ids[old:], vectors[old:])
    assert after.meta["count"] == N and len(after.meta["shards"]) == len(info.meta["shards"]) + 1
    truth = {(ids[i], ids[j]): s for (i, j), s in exact_pairs(vectors, THRESHOLD).items()}
    assert any(b >= ids[old] for _, b in truth)  # pairs with appended images exist
    assert _pairs(spark, config) == pytest.approx(truth, abs=1e-5)
    sims = vectors @ vectors.T
    knn = np.argsort(-sims, axis=1, kind="stable")[:, :3]
    augmented = database_side_augmentation(vectors, knn, np.take_along_axis(sims, knn, axis=1), k=3, alpha=3.0)
    dba_truth = {(ids[i], ids[j]): s for (i, j), s in exact_pairs(augmented, THRESHOLD).items()}
    got = _pairs(spark, config.with_overrides(dedup__dba_k=3, dedup__dba_alpha=3.0))
    found = set(got) & set(dba_truth)
    assert len(found) / len(dba_truth) >= 0.98 and max(abs(got[p] - dba_truth[p]) for p in found) <= 1e-4
