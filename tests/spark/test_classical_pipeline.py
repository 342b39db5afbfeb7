"""Classical methods through the Spark jobs: evaluate, binary index, train job, config.

Small and real: 40 UKBench images (10 groups of 4) from ../shared, a vocabulary trained on
16 Holidays images (the other dataset), small SIFT settings. Real Spark, FAISS, MLflow.
"""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from pipeline import schemas as S
from pipeline.core import classical
from pipeline.core import faiss_index
from pipeline.stages import index as ix
from pipeline.core import storage
from pipeline.stages import tables
from pipeline import api
from pipeline.encoders import registry
from pipeline.config import Config, ConfigError
from tests.helpers import make_config, shared_path

# The same result keys as a CNN backbone's evaluate result (tests/e2e/test_accuracy.py) and more.
KEYS = {"dataset", "method", "weights", "images", "queries", "ns_score", "pair_precision", "pair_recall",
        "threshold", "embed_seconds", "images_per_second", "index_seconds", "dedup_seconds", "embedding_dim",
        "mlflow_run_id"}
SMALL_VLAD = {"k": 8, "max_side": 320, "nfeatures": 300}
SMALL_BOW = {"k": 16, "max_side": 320, "nfeatures": 300}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 ukbench-dev images (10 complete groups) and 16 holidays-dev images to train on."""
    ukb, hol = shared_path("data", "ukbench-dev"), shared_path("data", "holidays-dev")
    root = tmp_path_factory.mktemp("classical-data")
    evaluated, train = root / "ukbench-40", root / "holidays-16"
    evaluated.mkdir()
    train.mkdir()
    with open(ukb / "groundtruth.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    groups = sorted({r["group"] for r in rows}, key=int)[:10]
    kept = [r for r in rows if r["group"] in groups]
    assert len(kept) == 40
    for r in kept:
        shutil.copyfile(ukb / r["filename"], evaluated / r["filename"])
    with open(evaluated / "groundtruth.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["filename", "group"])
        w.writeheader()
        w.writerows({"filename": r["filename"], "group": r["group"]} for r in kept)
    for p in sorted(hol.glob("*.jpg"))[:16]:
        shutil.copyfile(p, train / p.name)
    return evaluated, train


@pytest.fixture(scope="module")
def evaluated(spark, data, tmp_path_factory):
    corpus, train = data
    work = tmp_path_factory.mktemp("classical-eval")
    out = work / "results.json"
    config = make_config(
        work / "work", evaluate__dataset="ukbench", evaluate__input=str(corpus),
        evaluate__backbones=["dhash", "vlad-ssr"], evaluate__json_out=str(out),
        classical__train_input=[str(train)], classical__options={"vlad-ssr": SMALL_VLAD},
        dedup__hamming_bits=10,
    )
    returned = api.evaluate(config=config).results
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    return config, {r["method"]: r for r in written}


def test_evaluate_two_classical_methods(evaluated):
    config, results = evaluated
    assert set(results) == {"dhash", "vlad-ssr"}
    for r in results.values():
        assert KEYS <= set(r), KEYS - set(r)
        assert r["images"] == 40 and r["queries"] == 40 and r["images_per_second"] > 0
    # Chance N-S on 10 groups of 4 is 1 + 3 * 3/39 = 1.23; both are far above it.
    assert results["dhash"]["ns_score"] >= 1.8, results["dhash"]
    assert results["vlad-ssr"]["ns_score"] >= 2.8, results["vlad-ssr"]
    assert results["dhash"]["embedding_dim"] == 64 and results["dhash"]["metric"] == "hamming"
    assert results["vlad-ssr"]["embedding_dim"] == 8 * 128 and results["vlad-ssr"]["metric"] == "inner_product"
    # The vocabulary came from the other collection, and the result names it.
    assert results["vlad-ssr"]["train_images"] == 16
    assert results["vlad-ssr"]["weights"] == f"artifact:{results['vlad-ssr']['artifact_version']}"


def test_hashes_go_through_the_binary_index(spark, evaluated):
    from pipeline.stages.search import search_neighbors

    config, results = evaluated
    cfg = config.with_overrides(embed__backbone="dhash")
    wd = storage.Workdir.of(cfg.workdir)
    emb = tables.read_table(spark, wd.embeddings("dhash"), "embeddings").collect()
    bits = np.array([r[S.EMBEDDING] for r in emb], dtype=np.float32)
    assert bits.shape == (40, 64) and set(np.unique(bits)) <= {0.0, 1.0}

    info = ix.IndexInfo.load(wd.index_dir("dhash"))
    assert info.meta["metric"] == "hamming" and info.meta["factory"] == faiss_index.BINARY_FLAT
    shard = faiss_index.deserialize(storage.read_bytes(info.shard_paths()[0]))
    assert faiss_index.is_binary_index(shard) and shard.d == 64

    # Similarities are 1 - Hamming/64, and the self match is exact.
    rows = search_neighbors(spark, cfg, 4).collect()
    sims = np.array([r[S.SIMILARITY] for r in rows])
    np.testing.assert_allclose(sims * 64, np.round(sims * 64), atol=1e-4)
    assert all(r[S.SIMILARITY] == 1.0 for r in rows if r[S.QUERY_ID] == r[S.NEIGHBOR_ID])

    # dedup.hamming_bits=10 is the threshold 1 - 10/64 on the same scale.
    assert results["dhash"]["threshold"] == pytest.approx(1 - 10 / 64)
    pairs = tables.read_table(spark, wd.pairs("dhash"), "pairs").collect()
    assert all(r[S.SIMILARITY] >= 1 - 10 / 64 for r in pairs)


def test_mlflow_records_method_and_training_set(evaluated, data):
    import mlflow

    config, results = evaluated
    client = mlflow.tracking.MlflowClient(config.tracking_uri())
    run = client.get_run(results["vlad-ssr"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["ns_score"] == pytest.approx(results["vlad-ssr"]["ns_score"])
    assert run.data.params["backbone"] == "vlad-ssr" and run.data.params["metric"] == "inner_product"
    assert run.data.params["train_input"] == storage.absolute_uri(str(data[1]))
    assert run.data.params["artifact_version"] == results["vlad-ssr"]["artifact_version"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "classical")] == ["classical/vlad-ssr"]
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert "study_table.txt" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_train_job_writes_a_versioned_artifact(spark, evaluated, data):
    import mlflow

    config, _ = evaluated
    cfg = config.with_overrides(embed__backbone="bow", classical__options={"bow": SMALL_BOW})
    first = api.train(config=cfg)
    wd = storage.Workdir.of(cfg.workdir)
    assert not first["reused"] and first["n_images"] == 16
    assert first["uri"] == wd.join("artifacts", "bow", f"{first['version']}.npz")
    art = classical.Artifact.load(storage.local_path_of(first["uri"]))
    assert art.version == first["version"] and art.arrays["centroids"].shape == (16, 128)
    method = classical.get_method("bow", artifact_path=storage.local_path_of(first["uri"]))
    assert method.dim == 16

    client = mlflow.tracking.MlflowClient(cfg.tracking_uri())
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.tags["job"] == "train" and run.data.params["train_artifact_version"] == first["version"]
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "classical/bow")]
    assert logged == [f"classical/bow/{first['version']}.npz"]

    again = api.train(config=cfg)  # same method, options and files: the artifact is reused
    assert again["reused"] and again["uri"] == first["uri"]


def test_config_accepts_classical_names_and_rejects_bad_ones(tmp_path):
    cfg = api.validate(Config.load(None, [f"workdir={tmp_path}", "embed.backbone=vlad-ssr"]))
    assert registry.expand_names(["all-classical", "mobilenet", "phash"]) == [*classical.CLASSICAL_METHODS,
                                                                                "mobilenet"]
    with pytest.raises(ConfigError, match="unknown backbone"):
        api.validate(Config.load(None, [f"workdir={tmp_path}", "embed.backbone=vlad-sss"]))
    with pytest.raises(ConfigError, match="classical.options.vlad"):
        api.validate(Config.load(None, [f"workdir={tmp_path}", "classical.options={vlad: {kk: 3}}"]))
    # A SIFT method with neither an artifact nor a training set fails before Spark starts.
    with pytest.raises(ConfigError, match="needs a trained vocabulary"):
        api.evaluate(config=cfg.with_overrides(evaluate__backbones=["phash", "bow"], evaluate__input=str(tmp_path)))


def test_cli_methods_alias_and_train_options():
    from pipeline.cli import JOB_OPTIONS, build_parser, config_from_args

    parser = build_parser(list(JOB_OPTIONS))
    args = parser.parse_args(["evaluate", "--methods", "all-classical,mobilenet",
                              "--set", "classical.train_input=/data/other"])
    cfg = config_from_args("evaluate", args)
    assert cfg.evaluate.backbones == ["all-classical", "mobilenet"]
    assert cfg.classical.train_input == ["/data/other"]
    cfg = config_from_args("train", parser.parse_args(["train", "--method", "vlad-ssr", "--input", "/a", "/b"]))
    assert cfg.embed.backbone == "vlad-ssr" and cfg.train.input == ["/a", "/b"]
    # For a classical method the train job's folders are its vocabulary's training set.
    assert api.preflight("train", cfg).classical.train_input == ["/a", "/b"]
