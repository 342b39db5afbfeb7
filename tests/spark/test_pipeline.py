"""The main job end to end on the demo corpus: real Spark, TensorFlow, FAISS and MLflow."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.stages import index as ix
from pipeline.core import metrics as M
from pipeline import schemas as S
from pipeline.core import storage
from pipeline.stages import tables
from pipeline import api
from tests.helpers import make_config


@pytest.fixture(scope="module")
def demo_run(spark, demo_corpus, tmp_path_factory):
    corpus, truth_csv = demo_corpus
    workdir = tmp_path_factory.mktemp("demo-run")
    config = make_config(workdir, ingest__input=[str(corpus)])
    metrics = api.run(config=config)
    with open(truth_csv, encoding="utf-8") as fh:
        group_of = {r["filename"]: r["group"] for r in csv.DictReader(fh)}
    return config, metrics, group_of, corpus


def _tables(spark, config):
    wd = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    return (tables.read_table(spark, wd.images, "images"), tables.read_table(spark, wd.embeddings(method), "emb"),
            tables.read_table(spark, wd.pairs(method), "pairs"), tables.read_table(spark, wd.groups(method), "groups"))


def test_every_file_is_one_row_of_the_image_table(spark, demo_run):
    config, metrics, group_of, corpus = demo_run
    images, *_ = _tables(spark, config)
    files = sorted(os.path.relpath(os.path.join(d, f), corpus) for d, _, fs in os.walk(corpus) for f in fs)
    rows = images.select(S.PATH, S.STATUS, S.WIDTH, S.HEIGHT, S.CONTENT_SHA256, S.FORMAT).collect()
    assert sorted(os.path.relpath(r[S.PATH], corpus) for r in rows) == files
    assert {r[S.STATUS] for r in rows} == {S.STATUS_OK}
    assert all(r[S.WIDTH] > 0 and r[S.HEIGHT] > 0 and len(r[S.CONTENT_SHA256]) == 64 for r in rows)
    assert {r[S.FORMAT] for r in rows} == {"JPEG", "PNG"}
    assert images.select(S.IMAGE_ID).distinct().count() == len(files)
    assert metrics["files_total"] == len(files) and metrics["files_ok"] == len(files)


def test_embeddings_are_unit_vectors(spark, demo_run):
    config, *_ = demo_run
    _, emb, _, _ = _tables(spark, config)
    rows = emb.collect()
    vectors = np.array([r[S.EMBEDDING] for r in rows], dtype=np.float32)
    assert vectors.shape == (97, 1024)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert {r[S.BACKBONE] for r in rows} == {"mobilenet"} and {r[S.STATUS] for r in rows} == {S.STATUS_OK}


def test_pairs_and_groups_find_the_near_duplicates(spark, demo_run):
    config, metrics, group_of, corpus = demo_run
    images, _, pairs, groups = _tables(spark, config)
    rel = {r[S.IMAGE_ID]: os.path.relpath(r[S.PATH], corpus) for r in images.collect()}
    rows = pairs.collect()
    assert all(r[S.IMAGE_ID_A] < r[S.IMAGE_ID_B] for r in rows)
    # The default threshold applies to the calibrated score; the raw cosine is kept beside it.
    assert rows and all(r["score"] >= config.dedup.threshold and -1 <= r[S.SIMILARITY] <= 1 for r in rows)
    assert len({(r[S.IMAGE_ID_A], r[S.IMAGE_ID_B]) for r in rows}) == len(rows)
    precision, recall = M.pair_precision_recall([(rel[r[S.IMAGE_ID_A]], rel[r[S.IMAGE_ID_B]]) for r in rows],
                                                M.true_pairs(group_of))
    # Issue 11: the demo keeps 1.000 / 1.000 under the calibrated default (440 of 440 pairs on the
    # development VM, OpenVINO bf16, 2026-11-30). Its weakest true pair scores 0.905, so a CPU
    # without bf16 (fp32 there) may drop one or two at the 0.9 threshold: recall >= 0.99, no false pair.
    assert precision == 1.0 and recall >= 0.99, (precision, recall)

    g = groups.collect()
    keepers = {}
    for r in g:
        if r[S.KEEP]:
            assert r[S.GROUP_ID] not in keepers, "two images kept in one group"
            keepers[r[S.GROUP_ID]] = r[S.IMAGE_ID]
    assert set(keepers) == {r[S.GROUP_ID] for r in g}
    # Every photo's variants end up together, and no distractor joins a group.
    found = {}
    for r in g:
        found.setdefault(r[S.GROUP_ID], set()).add(group_of[rel[r[S.IMAGE_ID]]])
    assert all(len(labels) == 1 for labels in found.values()), found
    assert not any(label.startswith("unrelated") for labels in found.values() for label in labels)
    # The counts (made on the driver for a table this small) are those of the written tables.
    assert (metrics["pairs"], metrics["groups"], metrics["images_in_groups"], metrics["images_to_remove"]) == (
        len(rows), len(keepers), len(g), len(g) - len(keepers))
    # The components checkpoints live only while dedup runs.
    assert not list((Path(str(config.workdir)) / "tmp").glob("*"))


def test_mlflow_run_holds_every_stage(demo_run):
    import mlflow

    config, metrics, *_ = demo_run
    client = mlflow.tracking.MlflowClient(config.tracking_uri())
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in ("files_total", "embed_seconds", "images_per_second", "index_seconds", "dedup_seconds", "pairs"):
        assert key in run.data.metrics, key
    assert run.data.params["embed.backbone"] == "mobilenet"
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.parametrize("index_type, min_recall", [("ivf_flat", 0.9), ("hnsw", 0.95), ("ivf_pq", 0.5)])
def test_index_types_agree_with_exact_search(spark, demo_run, index_type, min_recall):
    """Approximate, sharded indexes against the brute-force oracle on the same vectors."""
    from pipeline.stages.search import search_neighbors

    config, *_ = demo_run
    cfg = config.with_overrides(index__type=index_type, index__shards=3)
    exact = {(r[S.QUERY_ID], r[S.NEIGHBOR_ID]) for r in search_neighbors(spark, config, 5).collect()}
    info = ix.build_index(spark, cfg)
    assert info.meta["type"] == index_type and len(info.meta["shards"]) == 3
    assert sum(s["count"] for s in info.meta["shards"]) == 97 and info.meta["trained"] == (index_type != "hnsw")
    got = {(r[S.QUERY_ID], r[S.NEIGHBOR_ID]) for r in search_neighbors(spark, cfg, 5).collect()}
    assert len(got & exact) / len(exact) >= min_recall
    ix.build_index(spark, config)  # leave the exact index in place for the other tests


def test_image_table_is_readable_through_petastorm(demo_run):
    from petastorm import make_batch_reader

    config, *_ = demo_run
    url = storage.Workdir.of(config.workdir).images
    seen = 0
    with make_batch_reader(url, schema_fields=[S.IMAGE_ID, S.WIDTH, S.STATUS], num_epochs=1,
                           workers_count=1, reader_pool_type="dummy") as reader:
        for batch in reader:
            seen += len(batch.image_id)
            assert set(batch.status) == {S.STATUS_OK}
    assert seen == 97
    assert [f for f in S.image_table_unischema().fields] == S.IMAGE_TABLE.fieldNames()


def test_a_failed_job_leaves_its_run_failed(spark, tmp_path):
    import mlflow

    config = make_config(tmp_path)  # empty workdir: no image table to embed
    with pytest.raises(FileNotFoundError, match="image table"):
        api.embed(config=config)
    runs = mlflow.tracking.MlflowClient(config.tracking_uri()).search_runs(
        [mlflow.get_experiment_by_name(config.mlflow.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
