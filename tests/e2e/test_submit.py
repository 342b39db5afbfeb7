"""The jobs as users run them: ``spark-submit jobs/*.py`` in local mode.

The run on a real standalone cluster (a master and two workers from the classes pyspark ships,
on 127.0.0.1), with and without an executor JVM killed mid-job, is in test_cluster_faults.py:
one cluster and one fault-free reference run serve all those tests.
"""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from pipeline import java
from tests.e2e.spark_cluster import ROOT, make_small_corpus, spark_submit


@pytest.fixture(scope="module")
def small_corpus(demo_corpus, tmp_path_factory):
    return make_small_corpus(demo_corpus[0], tmp_path_factory.mktemp("small") / "corpus")


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
