"""Spark tables and how a table is committed (the workdir layout is :class:`pipeline.core.storage.Workdir`).

Commit protocol: a table is written to a run-unique staging folder next to its final place
and moved there by rename once Spark has finished writing it (Spark writes ``_SUCCESS``
last). A reader only accepts a folder that has ``_SUCCESS``, so an interrupted job can never
leave a half-written table that a later job mistakes for a complete one; rerunning a job
replaces the table whole, so reruns never duplicate rows.

Replacing a table is two renames (old one aside to ``<name>.old-*``, staging in). A crash
between them leaves only the ``.old-*`` copy; the next write of that table renames it
back (:func:`recover_table`), so the last committed table is never lost (until then, readers
report the table as missing rather than guess). Leftover
``<name>.staging-*`` folders are deleted by the next write of the same table. One writer per
table at a time: two jobs writing the same table concurrently is not supported.

A table may carry a small ``_neardup.json`` (what produced it: settings, model fingerprint)
written into the staging folder before the rename, so it is committed atomically with the
data; Spark's Parquet reader ignores names starting with ``_``.

Paths may be local or any Hadoop filesystem URI: Spark tables go through Hadoop's
FileSystem (the same one Spark uses); small files are in :mod:`pipeline.core.storage`.
"""
from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any, Callable, Iterator

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from pipeline import schemas as S
from pipeline.core.storage import METADATA_FILE, write_json

log = logging.getLogger(__name__)

SUCCESS_MARKER = "_SUCCESS"


# ------------------------------------------------------------ Spark tables
def _hadoop_fs(spark: SparkSession, uri: str):
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(uri)
    return hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), hpath


def path_exists(spark: SparkSession, uri: str) -> bool:
    fs, hpath = _hadoop_fs(spark, uri)
    return bool(fs.exists(hpath))


def is_committed(spark: SparkSession, uri: str) -> bool:
    return path_exists(spark, uri.rstrip("/") + "/" + SUCCESS_MARKER)


def write_table(df: DataFrame, uri: str, *, max_records_per_file: int | None = None,
                partition_by: list[str] | None = None, metadata: dict[str, Any] | None = None) -> None:
    """Write ``df`` as Parquet to ``uri`` through a staging folder and commit by rename.

    ``df`` may read the current table at ``uri`` (incremental jobs do): the old table is only
    moved aside after the new one is completely written.
    """
    writer = df.write.mode("errorifexists")
    if max_records_per_file:
        writer = writer.option("maxRecordsPerFile", int(max_records_per_file))
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    _write_staged(df.sparkSession, uri, writer.parquet, metadata)
    if not partition_by:
        _remember_schema(df.sparkSession, uri, as_read_back(df.schema))


def _write_staged(spark: SparkSession, uri: str, write: Callable[[str], None], metadata: dict[str, Any] | None) -> None:
    """``write(staging folder)``, the metadata next to it, then the commit by rename (the
    staging folder removed when anything fails)."""
    recover_table(spark, uri)
    staging = f"{uri}.staging-{uuid.uuid4().hex[:12]}"
    try:
        write(staging)
        if metadata is not None:
            write_json(f"{staging}/{METADATA_FILE}", metadata)
    except BaseException:
        remove(spark, staging)
        raise
    commit_folder(spark, staging, uri)


def write_frame(spark: SparkSession, frame, schema, uri: str, *, metadata: dict[str, Any] | None = None) -> None:
    """Write rows made on the driver (a pandas frame) as a table of ``schema`` (a Spark
    StructType): one Parquet file written by pyarrow, committed as :func:`write_table` commits.

    For the small tables the driver computes (a small collection's pairs, lists, groups and
    incremental state). Spark's way there, ``createDataFrame`` and a write job, converts every
    row between Arrow and the JVM: 2.5 of the 4.7 s of the state of 9,978 images."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql.pandas.types import to_arrow_schema

    from pipeline.core.storage import write_bytes

    arrow_schema = to_arrow_schema(schema)
    table = pa.Table.from_arrays([pa.array(frame[f.name].tolist() if f.name in frame else [None] * len(frame),
                                           type=arrow_schema.field(f.name).type, from_pandas=True)
                                  for f in schema.fields], schema=arrow_schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="snappy")

    def write(staging: str) -> None:
        write_bytes(f"{staging}/part-00000-{uuid.uuid4()}-c000.snappy.parquet", buffer.getvalue())
        write_bytes(f"{staging}/{SUCCESS_MARKER}", b"")

    _write_staged(spark, uri, write, metadata)


def commit_folder(spark: SparkSession, staging: str, uri: str) -> None:
    """Replace ``uri`` by ``staging``: old table aside, new one in, old one deleted."""
    fs, final = _hadoop_fs(spark, uri)
    jvm = spark.sparkContext._jvm
    fs.mkdirs(final.getParent())
    old = None
    if fs.exists(final):
        old = jvm.org.apache.hadoop.fs.Path(f"{uri}.old-{uuid.uuid4().hex[:12]}")
        if not fs.rename(final, old):
            raise IOError(f"could not move the previous table {uri} aside")
    if not fs.rename(jvm.org.apache.hadoop.fs.Path(staging), final):
        if old is not None:
            fs.rename(old, final)
        raise IOError(f"could not commit {staging} to {uri}")
    if old is not None:
        fs.delete(old, True)
    log.info("committed %s", uri)


def remove(spark: SparkSession, uri: str) -> None:
    fs, hpath = _hadoop_fs(spark, uri)
    if fs.exists(hpath):
        fs.delete(hpath, True)


# Reading Parquet without a schema runs a Spark job that infers it (0.1 s with its planning; a
# default run reads its tables 17 times). A committed table is only ever replaced whole, by a
# write whose data files have new names (Spark puts the write's id in them), so the schema
# is kept per (application, table, data file names) and given to later reads: the schema
# Spark wrote (:func:`write_table`), else the one it inferred on the first read.
_SCHEMAS: dict[tuple, Any] = {}
_SCHEMAS_MAX = 256


def as_read_back(schema: T.StructType) -> T.StructType:
    """``schema`` as Spark infers it from the Parquet files it wrote: every field, array element
    and map value nullable (Spark's writer relaxes them all, with field metadata kept)."""
    def relaxed(node):
        if isinstance(node, list):
            return [relaxed(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: relaxed(v) for k, v in node.items()}
        for flag in ("nullable", "containsNull", "valueContainsNull"):
            if flag in out:
                out[flag] = True
        return out

    return T.StructType.fromJson(relaxed(schema.jsonValue()))


def _remember_schema(spark: SparkSession, uri: str, schema: T.StructType) -> None:
    files = _data_files(spark, uri)
    if files:
        if len(_SCHEMAS) >= _SCHEMAS_MAX:
            _SCHEMAS.pop(next(iter(_SCHEMAS)))
        _SCHEMAS[(spark.sparkContext.applicationId, uri.rstrip("/"), files)] = schema


def _data_files(spark: SparkSession, uri: str) -> tuple[str, ...]:
    """The names of a table's data files; empty (nothing kept) when it has none or is partitioned
    (partition folders keep their names from one write to the next)."""
    fs, hpath = _hadoop_fs(spark, uri)
    entries = [st for st in fs.listStatus(hpath) if not st.getPath().getName().startswith(("_", "."))]
    if any(not st.isFile() for st in entries):
        return ()
    return tuple(sorted(st.getPath().getName() for st in entries))


def read_table(spark: SparkSession, uri: str, what: str) -> DataFrame:
    """Read a committed table; a missing or half-written one is a clear error, not empty data."""
    if not is_committed(spark, uri):
        raise FileNotFoundError(
            f"the {what} at {uri} does not exist or was not completely written; run the job that makes it first"
        )
    files = _data_files(spark, uri)
    key = (spark.sparkContext.applicationId, uri.rstrip("/"), files)
    schema = _SCHEMAS.get(key) if files else None
    if schema is not None:
        return spark.read.schema(schema).parquet(uri)
    frame = spark.read.parquet(uri)
    if files:
        _remember_schema(spark, uri, frame.schema)
    return frame


def read_id_map(spark: SparkSession, index_path: str) -> DataFrame:
    """An index's FAISS id -> image id table (written by Spark and appended to by pyarrow), read
    with its declared schema: no job to infer it."""
    return spark.read.schema(as_read_back(S.ID_MAP)).parquet(f"{index_path}/idmap")


def clean_stale_staging(spark: SparkSession, parent: str) -> None:
    """Delete staging folders that an interrupted job left behind (they were never committed)."""
    fs, hpath = _hadoop_fs(spark, parent)
    if not fs.exists(hpath):
        return
    for status in fs.listStatus(hpath):
        name = status.getPath().getName()
        if ".staging-" in name or ".old-" in name:
            fs.delete(status.getPath(), True)
            log.info("removed stale %s", status.getPath().toString())


def remove_siblings(spark: SparkSession, uri: str, infix: str) -> None:
    """Delete ``<uri><infix>*`` next to ``uri`` (scratch data an interrupted job left behind)."""
    uri = uri.rstrip("/")
    fs, final = _hadoop_fs(spark, uri)
    parent = final.getParent()
    if parent is None or not fs.exists(parent):
        return
    prefix = final.getName() + infix
    for status in fs.listStatus(parent):
        if status.getPath().getName().startswith(prefix):
            fs.delete(status.getPath(), True)
            log.info("removed stale %s", status.getPath().toString())


def recover_table(spark: SparkSession, uri: str) -> None:
    """Undo what an interrupted write of ``uri`` left behind.

    Only this table's own ``<name>.staging-*`` / ``<name>.old-*`` siblings are touched, so a
    concurrent job writing a different table in the same folder is not disturbed. Only
    writers call this; readers never rename or delete, so a read cannot break a write in flight.
    """
    uri = uri.rstrip("/")
    fs, final = _hadoop_fs(spark, uri)
    parent = final.getParent()
    if parent is None or not fs.exists(parent):
        return
    name = final.getName()
    staging, old = [], []
    for status in fs.listStatus(parent):
        other = status.getPath().getName()
        if other.startswith(name + ".staging-"):
            staging.append(status.getPath())
        elif other.startswith(name + ".old-"):
            old.append(status.getPath())
    jvm = spark.sparkContext._jvm
    final_committed = is_committed(spark, uri)
    for path in old:
        committed = fs.exists(jvm.org.apache.hadoop.fs.Path(path, SUCCESS_MARKER))
        if not final_committed and committed:
            # The crash fell between "old aside" and "new in": the old table is the last good one.
            if fs.exists(final):
                fs.delete(final, True)
            if fs.rename(path, final):
                final_committed = True
                log.warning("restored %s from %s after an interrupted commit", uri, path.getName())
                continue
        fs.delete(path, True)
        log.info("removed stale %s", path.toString())
    for path in staging:
        fs.delete(path, True)
        log.info("removed uncommitted %s", path.toString())


# A lookup table of up to this many rows (the id map, the levels: an id and a number per
# image) is broadcast to the tasks that join with it, instead of shuffling the millions of
# neighbour rows on the other side (at 100k images the level join went from 30 s to a few
# seconds). It passes through the driver, and the local-mode heap is 2 GB: at most 500k rows
# (~30 MB); above it, a shuffle join.
BROADCAST_MAX_ROWS = 500_000


def lookup(frame: DataFrame, rows: int) -> DataFrame:
    """``frame`` marked for a broadcast join when it has at most :data:`BROADCAST_MAX_ROWS` rows."""
    from pyspark.sql import functions as F

    return F.broadcast(frame) if rows <= BROADCAST_MAX_ROWS else frame


# Rows per partition of the per-image and per-pair frames a job keeps (persist) and reads
# several times. A persisted frame keeps the partitions of the shuffle that made it
# (spark.sql.shuffle.partitions, 200 by default): adaptive execution coalesces shuffle reads,
# not a cached relation, and every later pass then runs 200 tiny tasks (at 100k images the
# two histograms took 15 s over 200 partitions, 0.8 s over 4).
ROWS_PER_PARTITION = 1_000_000


def sized(frame: DataFrame, rows: int, per_partition: int = ROWS_PER_PARTITION) -> DataFrame:
    """``frame`` coalesced to about ``per_partition`` rows per partition (``rows``: an
    estimate), and at least one partition per core."""
    cores = frame.sparkSession.sparkContext.defaultParallelism
    return frame.coalesce(max(cores, -(-int(rows) // max(1, per_partition))))


# Initial shuffle partitions per this many images (adaptive execution then coalesces them).
# Spark's default, 200, costs a fixed ~0.2 s per shuffle on a small table (200 buckets written
# and read per shuffle: a 2,800-image run spent 2-3 s of its 30 in them); sized from the
# images, a job starts at one per core and reaches the default at 2M images. One per core, not
# two: every partition is a task (and a written file) of fixed cost, and a small run is a chain
# of short jobs; 2,794 images, default runs alternating in one application (4 rounds each,
# 2-core Xeon, 2026-12-02): 17.5 -> 16.1 s, the median of the sum of the stages.
IMAGES_PER_SHUFFLE_PARTITION = 10_000
SHUFFLE_PARTITIONS_PER_CORE = 1
SHUFFLE_PARTITIONS = "spark.sql.shuffle.partitions"


def shuffle_partitions_for(spark: SparkSession, images: int) -> int:
    """Initial shuffle partitions for a job over ``images`` images: never more than the session's setting."""
    cores = spark.sparkContext.defaultParallelism
    configured = int(spark.conf.get(SHUFFLE_PARTITIONS))
    wanted = max(SHUFFLE_PARTITIONS_PER_CORE * cores, -(-int(images) // IMAGES_PER_SHUFFLE_PARTITION))
    return max(1, min(configured, wanted))


# Below this many images a job runs without adaptive execution: its shuffles are already sized
# (above), and adaptive execution runs every shuffle stage as a job of its own and re-plans
# after it, a fixed cost per shuffle that was 2 s of a 28 s run on 2,800 images (measured
# side by side, 2026-12-01). Larger jobs keep it: partition coalescing, skew handling,
# broadcast joins chosen from measured sizes.
ADAPTIVE_MIN_IMAGES = 20_000
ADAPTIVE = "spark.sql.adaptive.enabled"


@contextlib.contextmanager
def sized_shuffles(spark: SparkSession, images: int) -> Iterator[None]:
    """Shuffles of the enclosed jobs start from :func:`shuffle_partitions_for` partitions; below
    :data:`ADAPTIVE_MIN_IMAGES` images, without adaptive execution."""
    settings = {SHUFFLE_PARTITIONS: str(shuffle_partitions_for(spark, images))}
    if int(images) < ADAPTIVE_MIN_IMAGES:
        settings[ADAPTIVE] = "false"
    with session_settings(spark, settings):
        yield


@contextlib.contextmanager
def no_auto_broadcast(spark: SparkSession) -> Iterator[None]:
    """Joins without Spark's automatic broadcast, for a job whose rows carry vectors.

    Adaptive execution broadcasts a side whose measured size is under its threshold; with
    4 KB vectors and the local driver heap, building that table failed ("Not enough memory
    to build and broadcast the table", the incremental state at 100k images). Explicit
    broadcast hints (:func:`lookup`) still apply.
    """
    with session_settings(spark, {"spark.sql.autoBroadcastJoinThreshold": "-1",
                                  "spark.sql.adaptive.autoBroadcastJoinThreshold": "-1"}):
        yield


@contextlib.contextmanager
def session_settings(spark: SparkSession, settings: dict[str, str]) -> Iterator[None]:
    """SQL settings of ``spark`` for the enclosed jobs; the previous values (or none) afterwards."""
    before = {k: spark.conf.get(k, None) for k in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
