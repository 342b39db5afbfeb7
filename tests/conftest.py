"""Shared fixtures: one real local Spark session, a seeded Keras cache, the shared data.

Environment is set before Spark starts so the Python workers inherit it (KERAS_HOME,
PYSPARK_PYTHON).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.java import ensure_java_home
from tests.helpers import ROOT, SHARED_WEIGHTS


def _seed_keras_cache() -> None:
    """Point Keras at a writable cache that holds the shared ImageNet weights (offline CI)."""
    home = Path(os.environ.get("KERAS_HOME") or (ROOT / ".keras"))
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    if SHARED_WEIGHTS.is_dir():
        for src in SHARED_WEIGHTS.iterdir():
            if not (models / src.name).exists():
                shutil.copyfile(src, models / src.name)
    os.environ["KERAS_HOME"] = str(home)


_seed_keras_cache()
# The local session below and every spark-submit the tests start run on the Java the set-up
# chose: the system's Java 17/21, else the JDK from PyPI in the venv.
ensure_java_home()
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One OpenVINO conversion per model for the whole session, not one per test workdir.
os.environ.setdefault("NEARDUP_MODEL_CACHE", tempfile.mkdtemp(prefix="neardup-models-"))


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    from pipeline.stages.session import BASE_CONF, LOCAL_CONF

    # local[2,4]: up to 4 attempts per task, as on a cluster; plain local[2] gives each task a
    # single attempt, and the fault tests check that Spark's retry recovers a killed worker.
    builder = SparkSession.builder.master("local[2,4]").appName("neardup-tests")
    for key, value in {**BASE_CONF, **LOCAL_CONF, "spark.sql.shuffle.partitions": "4",
                       "spark.sql.execution.arrow.maxRecordsPerBatch": "64",
                       "spark.driver.memory": "2g"}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The demo corpus (real photos + near-duplicate variants) and its ground truth CSV."""
    from pipeline.demo import make_demo_corpus

    root = tmp_path_factory.mktemp("demo") / "corpus"
    truth = make_demo_corpus(root)
    return root, truth



# A file name from a hostile archive: it must be shown as text in the report, never run.
HOSTILE_NAME = "<img src=x onerror=alert(1)>.jpg"


@pytest.fixture(scope="session")
def demo_run(spark, demo_corpus, tmp_path_factory):
    """A real `run` (ingest -> embed -> index -> dedup) over a copy of the demo corpus.

    The copy holds one extra file with a hostile name (a copy of an original photo), so the
    report tests see markup in a path. The archive is a copy so `apply` tests may act on it
    (they undo what they do). Returns (archive, config, metrics).
    """
    from pipeline import api
    from tests.helpers import make_config

    corpus, _ = demo_corpus
    base = tmp_path_factory.mktemp("demo-run")
    archive = base / "archive"
    shutil.copytree(corpus, archive)
    shutil.copyfile(archive / "astronaut" / "astronaut.jpg", archive / "astronaut" / HOSTILE_NAME)
    # Rotated queries and DBA off: they cost two more embedding passes and change nothing here.
    config = make_config(base / "work", ingest__input=[str(archive)], report__groups_per_page=3,
                         progress="never", dedup__rotations=[0], dedup__dba_k=0)
    result = api.run(config=config, spark=spark)
    return archive, result.config, result.metrics
