"""The jobs as users run them: ``spark-submit jobs/*.py``, locally and on a real standalone
cluster (a master and two workers from the classes pyspark ships, on 127.0.0.1).

On the cluster the executors run in the workers' own folders, in other JVMs and Python
processes than the driver, so anything that only works in local mode (relative paths,
driver-only files, module globals set on the driver) fails here. Faults on that cluster
(an executor JVM killed mid-job) are in test_cluster_faults.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import java
from tests.e2e.spark_cluster import ROOT, make_small_corpus, spark_submit, start_cluster


@pytest.fixture(scope="module")
def small_corpus(demo_corpus, tmp_path_factory):
    return make_small_corpus(demo_corpus[0], tmp_path_factory.mktemp("small") / "corpus")


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("cluster"), workers=2, cores=1, memory="2g")
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.leftovers(), "cluster processes left running"


def test_spark_submit_ingest_local(small_corpus, tmp_path):
    result = spark_submit(["--master", "local[2]", str(ROOT / "jobs" / "ingest.py"),
                           "--input", str(small_corpus), "--workdir", str(tmp_path / "work")])
    assert result.returncode == 0, result.stderr[-3000:]
    table = pq.read_table(tmp_path / "work" / "images", columns=["path", "status"])
    assert table.num_rows == sum(len(files) for _, _, files in os.walk(small_corpus))
    assert set(table.column("status").to_pylist()) == {"ok"}


def test_spark_submit_rejects_bad_arguments_before_any_work(tmp_path):
    result = spark_submit(["--master", "local[1]", str(ROOT / "jobs" / "embed.py"),
                           "--backbone", "resnet5", "--workdir", str(tmp_path / "work")], timeout=120)
    assert result.returncode == 2
    # spark-submit hands the Python driver's stderr to its own stdout.
    assert "unknown backbone 'resnet5'" in result.stdout + result.stderr
    assert not (tmp_path / "work").exists()


def test_run_job_on_a_standalone_cluster(standalone_cluster, small_corpus, tmp_path):
    # A relative workdir: must be resolved on the driver, since executors have another cwd.
    result = spark_submit(["--master", standalone_cluster.url, "--conf", "spark.executor.memory=1g",
                           str(ROOT / "jobs" / "run.py"), "--input", str(small_corpus),
                           "--workdir", "rel/work", "--set", "index.shards=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    work = tmp_path / "rel" / "work"
    images = pq.read_table(work / "images", columns=["image_id", "path"]).to_pylist()
    folder_of = {r["image_id"]: Path(r["path"]).parent.name for r in images}
    groups = pq.read_table(work / "groups" / "mobilenet").to_pylist()
    by_group: dict[str, set[str]] = {}
    for r in groups:
        by_group.setdefault(r["group_id"], set()).add(folder_of[r["image_id"]])
    assert sorted(tuple(sorted(v)) for v in by_group.values()) == [("astronaut",), ("coffee",), ("rocket",)]
    assert sum(r["keep"] for r in groups) == 3
    assert sorted(p.name for p in (work / "index" / "mobilenet" / "shards").iterdir()) == [
        "shard_00000.faiss", "shard_00001.faiss"]
    # The work really ran on both workers' executors, not in the driver.
    assert all(any(folder.rglob("stderr")) for folder in standalone_cluster.worker_dirs())
    assert len(standalone_cluster.worker_dirs()) == 2


PROBE = """
import sys
import pandas as pd
from pyspark.sql import SparkSession, functions as F

spark = SparkSession.builder.getOrCreate()
plus_one = F.pandas_udf(lambda s: s + 1, "long")
spark.range(100).select(plus_one("id").alias("x")).write.parquet(sys.argv[1])
print("java.home", spark._jvm.System.getProperty("java.home"))
print("sum", spark.read.parquet(sys.argv[1]).agg(F.sum("x")).first()[0])
"""


def test_spark_runs_on_the_jdk_from_pypi(tmp_path):
    """What a machine without Java 17/21 gets (pipeline/java.py): the JVM, Arrow and Parquet work on it."""
    (tmp_path / "no-java").mkdir()
    home = java.choose_java_home({"PATH": str(tmp_path / "no-java")})
    (tmp_path / "probe.py").write_text(PROBE)
    result = spark_submit(["--master", "local[1]", str(tmp_path / "probe.py"), str(tmp_path / "out")],
                          env={"JAVA_HOME": home}, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("java.home", "sum")))
    assert os.path.realpath(lines["java.home"]) == os.path.realpath(java.bundled_java_home())
    assert lines["sum"] == "5050"
