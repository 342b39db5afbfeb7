"""Faults and reruns with real Spark: a killed worker, repeated jobs, interrupted writes.

The guarantees: a job that Spark had to retry still writes exactly one row per image; running
any job again gives the same tables; a table that was not completely written is never read as
one; a bad configuration fails before any Spark or MLflow work starts.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.stages import ingest as ing
from pipeline.core import storage
from pipeline.stages import tables
from pipeline.cli import main as cli_main
from pipeline import api
from tests.helpers import make_config, make_small_corpus, snapshot

def assert_no_duplicates(snap: dict[str, list]) -> None:
    assert len({r[0] for r in snap["images"]}) == len(snap["images"])
    assert len({r[0] for r in snap["embeddings"]}) == len(snap["embeddings"])
    assert len({(r[0], r[1]) for r in snap["pairs"]}) == len(snap["pairs"])
    assert len({r[1] for r in snap["groups"]}) == len(snap["groups"])
    assert len({r[1] for r in snap["idmap"]}) == len(snap["idmap"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "corpus"
    truth = make_small_corpus(root)
    return root, truth


@pytest.fixture(scope="module")
def killed_run(spark, corpus, tmp_path_factory):
    """`run` with embed.fail_once_on_image: the Python worker embedding that image dies once."""
    root, truth = corpus
    victim = ing.image_id_for(str(root / "coffee" / "original.jpg"))
    workdir = tmp_path_factory.mktemp("faults-work")
    config = make_config(workdir, ingest__input=[str(root)], embed__fail_once_on_image=victim)
    metrics = api.run(config=config)
    return config, metrics, victim


def test_killed_worker_is_retried_and_nothing_is_lost_or_doubled(spark, killed_run, corpus):
    config, metrics, victim = killed_run
    root, truth = corpus
    marker = Path(config.workdir) / "_fault_injected"
    assert marker.exists(), "the fault was not injected: the test proves nothing"
    snap = snapshot(spark, config)
    assert_no_duplicates(snap)
    ids = {ing.image_id_for(str(root / rel)) for rel in truth}
    assert {r[0] for r in snap["embeddings"]} == ids and victim in ids
    assert {r[2] for r in snap["embeddings"]} == {"ok"}
    assert metrics["images_embedded"] == len(truth) and metrics["embeddings_ok"] == len(truth)
    # The retried partition's images still find their near-duplicates.
    found = {frozenset((a, b)) for a, b, _ in snap["pairs"]}
    coffee = [ing.image_id_for(str(root / rel)) for rel in truth if truth[rel] == "coffee"]
    assert any(victim in pair and (pair - {victim}) <= set(coffee) for pair in found)


def test_rerunning_every_job_is_idempotent(spark, killed_run):
    config, _, _ = killed_run
    config = config.with_overrides(embed__fail_once_on_image=None)
    first = snapshot(spark, config)
    metrics = api.run(config=config)
    assert snapshot(spark, config) == first
    # Nothing changed, so nothing was read or embedded again.
    assert metrics["files_reused"] == len(first["images"]) and metrics["files_new"] == 0
    assert metrics["embeddings_reused"] == len(first["embeddings"]) and metrics["images_embedded"] == 0
    for job in ("ingest", "embed", "index", "dedup"):
        getattr(api, job)(config=config)
        assert snapshot(spark, config) == first, job
    # A from-scratch embed (no reuse) gives the same vectors, to rounding.
    from pipeline.stages import embed as em

    with_reuse_off = em.embed(spark, config, incremental=False)
    assert with_reuse_off["embedded"] == len(first["embeddings"])
    again = snapshot(spark, config)["embeddings"]
    assert [r[:3] for r in again] == [r[:3] for r in first["embeddings"]]
    np.testing.assert_allclose([r[3] for r in again], [r[3] for r in first["embeddings"]], atol=1e-5)
    assert_no_duplicates(first)
    leftovers = [p for p in Path(config.workdir).rglob("*") if ".staging-" in p.name or ".old-" in p.name]
    assert not leftovers


def _images_uri(config) -> str:
    return storage.Workdir.of(config.workdir).images


def test_a_staging_folder_is_never_read_as_the_table(spark, tmp_path):
    """A job killed while writing leaves images.staging-*; readers must not take it for the table."""
    config = make_config(tmp_path / "work")
    uri = _images_uri(config)
    df = spark.createDataFrame([(1,)], "x int")
    df.write.parquet(uri + ".staging-deadbeef0000")  # complete, even with _SUCCESS, but never committed
    assert Path(storage.local_path_of(uri) + ".staging-deadbeef0000", "_SUCCESS").exists()
    with pytest.raises(FileNotFoundError, match="does not exist or was not completely written"):
        tables.read_table(spark, uri, "image table")
    # The next write of the same table clears the leftover and commits its own data.
    tables.write_table(spark.createDataFrame([(2,)], "x int"), uri)
    assert [r.x for r in tables.read_table(spark, uri, "image table").collect()] == [2]
    assert not list(Path(storage.local_path_of(uri)).parent.glob("images.staging-*"))


def test_a_replaced_table_is_read_with_its_own_schema(spark, tmp_path):
    """read_table keeps the schema it inferred per committed write: a replacement, with other
    columns, under the same path, is read with its own (never the kept one)."""
    uri = _images_uri(make_config(tmp_path / "work"))
    tables.write_table(spark.createDataFrame([(1, "a")], "x int, s string"), uri)
    first = tables.read_table(spark, uri, "image table")
    again = tables.read_table(spark, uri, "image table")  # the kept schema, no inference
    assert again.schema == first.schema and [tuple(r) for r in again.collect()] == [(1, "a")]
    tables.write_table(spark.createDataFrame([(2.5, [1, 2])], "y double, v array<int>"), uri)
    replaced = tables.read_table(spark, uri, "image table")
    assert replaced.columns == ["y", "v"] and [tuple(r) for r in replaced.collect()] == [(2.5, [1, 2])]
    assert tables.read_table(spark, uri, "image table").schema == replaced.schema
    # Partition folders keep their names across writes: such a table is never read with a kept schema.
    tables.write_table(spark.createDataFrame([(0, "a")], "p int, s string"), uri, partition_by=["p"])
    assert tables.read_table(spark, uri, "image table").columns == ["s", "p"]
    tables.write_table(spark.createDataFrame([(0, 1.5)], "p int, z double"), uri, partition_by=["p"])
    assert tables.read_table(spark, uri, "image table").columns == ["z", "p"]


def test_a_written_table_is_read_back_with_the_schema_spark_infers_without_a_job(spark, tmp_path):
    """write_table keeps the schema of what it wrote, relaxed as Spark's Parquet writer relaxes it,
    so the first read of a new table needs no inference job; that schema must be the inferred one."""
    from pyspark.sql import types as T

    from pipeline import schemas as S

    nested = T.StructType([
        T.StructField("v", T.ArrayType(T.FloatType(), False), False, {"note": "kept"}),
        T.StructField("m", T.MapType(T.StringType(), T.LongType(), False), False),
        T.StructField("s", T.StructType([T.StructField("a", T.IntegerType(), False)]), False),
    ])
    frames = {"nested": spark.createDataFrame([([1.0, 2.0], {"k": 1}, (3,))], nested)}
    for name in ("IMAGE_TABLE", "EMBEDDING_TABLE", "PAIRS_TABLE", "GROUPS_TABLE", "NEIGHBORS_TABLE", "ID_MAP"):
        frames[name] = spark.createDataFrame([], getattr(S, name))
    tracker = spark.sparkContext.statusTracker()
    for name, frame in frames.items():
        uri = str(tmp_path / name)
        tables.write_table(frame, uri)
        spark.sparkContext.setJobGroup(f"read-{name}", "first read")
        kept = tables.read_table(spark, uri, name).schema
        assert tracker.getJobIdsForGroup(f"read-{name}") == [], name
        assert kept == spark.read.parquet(uri).schema, name
    assert tables.read_table(spark, str(tmp_path / "nested"), "t").collect()[0]["v"] == [1.0, 2.0]
    # An index's id map (also appended to by pyarrow) is read with its declared schema.
    frames["ID_MAP"].write.parquet(str(tmp_path / "index" / "idmap"))
    spark.sparkContext.setJobGroup("read-id-map", "declared schema")
    declared = tables.read_id_map(spark, str(tmp_path / "index")).schema
    assert tracker.getJobIdsForGroup("read-id-map") == []
    assert declared == spark.read.parquet(str(tmp_path / "index" / "idmap")).schema
    spark.sparkContext.setJobGroup("after", "after")


def test_a_table_without_success_is_a_clear_error(spark, tmp_path):
    config = make_config(tmp_path / "work")
    uri = _images_uri(config)
    spark.createDataFrame([(1,)], "x int").write.parquet(uri)
    os.remove(os.path.join(storage.local_path_of(uri), "_SUCCESS"))  # as if the writer died before its commit
    with pytest.raises(FileNotFoundError, match=r"the image table at .* was not completely written; run the job"):
        tables.read_table(spark, uri, "image table")


def test_a_failed_write_keeps_the_previous_table(spark, tmp_path):
    from pyspark.sql import functions as F

    config = make_config(tmp_path / "work")
    uri = _images_uri(config)
    tables.write_table(spark.createDataFrame([(1,), (2,)], "x int"), uri)

    @F.udf("int")
    def explode(x):
        raise RuntimeError("disk full (simulated)")

    broken = spark.createDataFrame([(3,)], "x int").select(explode("x").alias("x"))
    with pytest.raises(Exception, match="disk full"):
        tables.write_table(broken, uri)
    assert sorted(r.x for r in tables.read_table(spark, uri, "image table").collect()) == [1, 2]
    assert not list(Path(storage.local_path_of(uri)).parent.glob("images.*-*"))


def test_a_crash_between_the_commit_renames_is_recovered(spark, killed_run):
    """The old table was moved aside and the process died before the new one moved in."""
    config, _, _ = killed_run
    config = config.with_overrides(embed__fail_once_on_image=None)
    local = storage.local_path_of(_images_uri(config))
    before = snapshot(spark, config)["images"]
    os.rename(local, local + ".old-0123456789ab")
    with pytest.raises(FileNotFoundError):
        tables.read_table(spark, _images_uri(config), "image table")
    metrics = api.ingest(config=config)
    # The previous table was restored and reused, not rebuilt from nothing.
    assert metrics["files_reused"] == len(before) and metrics["files_new"] == 0
    assert snapshot(spark, config)["images"] == before
    assert not os.path.exists(local + ".old-0123456789ab")


@pytest.mark.parametrize("args, message", [
    (["--backbone", "no_such_net"], "no_such_net"),
    (["--weights", "/nonexistent/weights.h5"], "/nonexistent/weights.h5"),
    (["--threshold", "1.5"], "dedup.threshold"),
    (["--set", "max_error_fraction=2"], "max_error_fraction"),
    (["--set", "ingest.max_pixels=0"], "ingest.max_pixels"),
    (["--set", "embed.no_such_key=1"], "unknown config key 'embed.no_such_key'"),
])
def test_bad_config_fails_before_any_work(spark, corpus, tmp_path, capsys, args, message):
    root, _ = corpus
    workdir = tmp_path / "work"
    code = cli_main(["run", "--input", str(root), "--workdir", str(workdir), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("neardup: error:") and message in err, err
    assert not workdir.exists(), "work started before the configuration was checked"


@pytest.mark.parametrize("make_input, message", [
    (lambda tmp: tmp / "missing", "input not found"),
    (lambda tmp: None, "no input"),
])
def test_bad_input_fails_before_any_work(spark, tmp_path, capsys, make_input, message):
    workdir = tmp_path / "work"
    path = make_input(tmp_path)
    argv = ["ingest", "--workdir", str(workdir)] + (["--input", str(path)] if path else [])
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not workdir.exists()
