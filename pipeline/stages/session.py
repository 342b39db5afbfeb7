"""Getting a SparkSession: reuse the caller's, create one only when there is none.

Under ``spark-submit`` the master and resources come from the command line and the
cluster's defaults; our config's ``spark.master`` is only used when we create the session
ourselves (the embedded ``local[*]`` default).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

from pyspark.sql import SparkSession

from pipeline import java
from pipeline.config import Config

log = logging.getLogger(__name__)

# Settings the pipeline relies on. Worker reuse keeps the model cached per Python worker
# (3x faster than reloading it every task); Arrow batches are capped so a UDF never gets a
# whole partition of image bytes at once.
# Shuffle partitions are sized from the data by adaptive query execution: a shuffle is
# written into spark.sql.shuffle.partitions buckets (Spark's default, 200: the most a
# shuffle can use) and its readers coalesce them into partitions of about the advisory size,
# keeping at least one partition per core (parallelismFirst, Spark's default) because the
# stages after a shuffle are Python work, not I/O. Stages that need an exact partitioning
# (one index shard, one image shard per task) ask for it with an explicit repartition(n),
# which adaptive execution leaves alone.
BASE_CONF = {
    "spark.python.worker.reuse": "true",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.parquet.compression.codec": "snappy",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.adaptive.enabled": "true",
    "spark.sql.adaptive.coalescePartitions.enabled": "true",
    "spark.sql.adaptive.advisoryPartitionSizeInBytes": "64m",
}


# Sessions whose Python workers run this interpreter (local mode), where the pipeline is
# installed: pyspark's worker daemon without its per-task overheads (pipeline.stages.spark_worker:
# 200 ms a task once a worker holds the model; a default run of 2,800 images 10-18% faster).
# Not for clusters: an executor may receive the pipeline only with its first task (--py-files),
# too late for the daemon that starts its workers.
LOCAL_CONF = {"spark.python.daemon.module": "pipeline.stages.spark_worker"}

# Local mode runs the executors inside the driver JVM, so its heap is the whole cluster's:
# a share of the machine, not Spark's 1g default. 2g failed at 1M images (the scoring joins
# over 21M candidate rows: "Java heap space"); the Python workers need the rest (FAISS
# search blocks, the model), hence a share and not most of it.
LOCAL_DRIVER_MEMORY_SHARE = 0.3
LOCAL_DRIVER_MEMORY_MIN_MIB = 2048
LOCAL_DRIVER_MEMORY_MAX_MIB = 32768


def local_driver_memory(total_bytes: int | None = None) -> str:
    """``spark.driver.memory`` for the embedded ``local[*]`` session: a share of this machine's RAM."""
    if total_bytes is None:
        try:
            total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not POSIX: Spark's own floor
            total_bytes = 0
    mib = int(total_bytes * LOCAL_DRIVER_MEMORY_SHARE) // 2 ** 20
    return f"{max(LOCAL_DRIVER_MEMORY_MIN_MIB, min(LOCAL_DRIVER_MEMORY_MAX_MIB, mib))}m"


@contextlib.contextmanager
def spark_session(config: Config) -> Iterator[SparkSession]:
    """Yield the active session if there is one, else a new one that is stopped afterwards."""
    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    # Executors and the driver must run the interpreter that has our dependencies.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(config.spark.app_name)
    if not _launched_by_spark_submit():
        builder = builder.master(config.spark.master)
        # pyspark is about to launch the JVM: on a machine without Java 17/21, the one from PyPI.
        java.ensure_java_home()
    # Our settings are defaults: what spark-submit --conf or spark-defaults.conf already set
    # (visible to SparkConf as JVM system properties) wins; spark.conf in our config wins over both.
    from pyspark import SparkConf

    submitted = SparkConf()
    conf = {k: v for k, v in BASE_CONF.items() if not submitted.contains(k)}
    if not submitted.contains("spark.sql.execution.arrow.maxRecordsPerBatch"):
        conf["spark.sql.execution.arrow.maxRecordsPerBatch"] = str(config.embed.arrow_batch_rows)
    if not _launched_by_spark_submit() and config.spark.master.startswith("local") \
            and not submitted.contains("spark.driver.memory"):
        # Spark's 1g default failed at 100k images (the incremental state's join of 4 KB
        # vectors), 2g at 1M; the suite pins 2g (conftest) so it also holds on small machines.
        conf["spark.driver.memory"] = local_driver_memory()
    local = {k: v for k, v in LOCAL_CONF.items() if not submitted.contains(k)}
    if local and not _launched_by_spark_submit() and config.spark.master.startswith("local") \
            and workers_import_pipeline():
        conf.update(local)
    conf.update({k: str(v) for k, v in config.spark.conf.items()})
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    log.info("Spark %s, master %s", spark.version, spark.sparkContext.master)
    try:
        yield spark
    finally:
        spark.stop()


def workers_import_pipeline() -> bool:
    """Whether a fresh interpreter started here (as local mode starts its Python workers: this
    executable, this environment and folder) imports the worker daemon. Not when the pipeline
    was put on this process's path by hand: the daemon would fail, and every Python task with it."""
    import subprocess

    module = LOCAL_CONF["spark.python.daemon.module"]
    try:
        probe = subprocess.run([sys.executable, "-c", f"import importlib.util as u; "
                                f"raise SystemExit(u.find_spec({module!r}) is None)"],
                               capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    if probe.returncode:
        log.info("the pipeline is not importable by a new interpreter here: Spark's own worker daemon")
    return probe.returncode == 0


def _launched_by_spark_submit() -> bool:
    # spark-submit starts the driver JVM first and hands its gateway to Python.
    return "PYSPARK_GATEWAY_PORT" in os.environ
