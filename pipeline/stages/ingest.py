"""Stage 1: an image corpus -> the image table (Parquet shards of bounded size).

Every file found is exactly one row, with ``status`` ok / error / skipped and a reason.
Listing is ours rather than Spark's ``binaryFile`` source because that source silently
ignores names starting with ``_`` or ``.`` (Hadoop's hidden-file rule; cameras name files
``_DSC1234.JPG``) and one unreadable file fails its whole task. Bytes are read by the
executors, file by file, so a bad file becomes a row, not a crash.

Nothing on the driver grows with the number of files: executors list the tree
(:mod:`pipeline.core.listing`; the driver plans a bounded number of folders) and stream the
listing to a scratch Parquet table next to the image table; shards are decided from that
table in Spark (:func:`assign_shards`), and an incremental run plans its changes as a join
(:func:`plan_changes`). The driver only ever collects counts.

Incremental: when the workdir already holds an image table made with the same settings, a
file whose (path, size, modification time) is unchanged keeps its previous row without
being read; new and changed files are described; rows of deleted files are dropped. The
new table is written whole and committed by rename (see :mod:`pipeline.stages.tables`), so an
interrupted ingest leaves the previous table in place.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline import schemas as S
from pipeline.config import Config
from pipeline.core import listing as L
from pipeline.core import storage
from pipeline.core.listing import ListedFile, display_path, image_id_for, raw_path_of  # noqa: F401  (re-exported)
from pipeline.stages import tables

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    total: int
    by_status: dict[str, int]
    top_errors: list[tuple[str, int]] = field(default_factory=list)
    top_skipped: list[tuple[str, int]] = field(default_factory=list)
    # Incremental bookkeeping against the previous image table: reused / new / changed / deleted.
    changes: dict[str, int] = field(default_factory=dict)

    @property
    def error_fraction(self) -> float:
        return self.by_status.get(S.STATUS_ERROR, 0) / self.total if self.total else 0.0


# Bump when describe_files would produce a different row for the same bytes: a previous
# image table written by another version (or with another max_pixels) is then not reused.
DESCRIBE_VERSION = 1


# ------------------------------------------------------------ per-file work
read_file = storage.read_file  # re-exported: ingest's own reader


def describe_files(rows: pd.DataFrame, max_pixels: int, store_content: bool = False) -> pd.DataFrame:
    """Listed files -> image-table rows: read, hash and probe each file, never raising.

    ``rows`` has the listing columns (path, size_bytes, modification_time, listing_error,
    optionally listing_status, raw_path and image_id as made by :func:`build_image_table`).
    ``store_content``: decodable images carry their bytes (``ingest.store_content``); otherwise
    later stages read them from ``path``, except for a name that its displayed path cannot
    reopen (not UTF-8), whose bytes are kept.
    """
    from pipeline.core import imageio

    n = len(rows)
    raw_paths = rows["raw_path"] if "raw_path" in rows else [None] * n
    ids = rows[S.IMAGE_ID] if S.IMAGE_ID in rows else [None] * n
    statuses = rows["listing_status"] if "listing_status" in rows else [S.STATUS_ERROR] * n
    out = []
    for path, raw, image_id, size, mtime, listing_error, listing_status in zip(
            rows[S.PATH], raw_paths, ids, rows[S.SIZE_BYTES], rows[S.MODIFICATION_TIME],
            rows["listing_error"], statuses):
        record = {
            S.IMAGE_ID: image_id or image_id_for(path), S.PATH: path, S.SIZE_BYTES: int(size),
            S.MODIFICATION_TIME: None if pd.isna(mtime) else mtime, S.CONTENT_SHA256: None, S.FORMAT: None,
            S.WIDTH: None, S.HEIGHT: None, S.STATUS: S.STATUS_ERROR, S.ERROR: None, S.CONTENT: None,
        }
        if isinstance(listing_error, str):
            record[S.STATUS] = listing_status
            record[S.ERROR] = listing_error
            out.append(record)
            continue
        try:
            content = read_file(bytes(raw) if raw is not None else path)
        except OSError as exc:
            # The file vanished or became unreadable between listing and reading.
            content = None
            record[S.ERROR] = f"unreadable file: {exc.strerror or exc}"
        if content is not None:
            record[S.SIZE_BYTES] = len(content)
            record[S.CONTENT_SHA256] = hashlib.sha256(content).hexdigest()
            probe = imageio.probe(content, path, max_pixels)
            record.update({S.STATUS: probe.status, S.ERROR: probe.error, S.FORMAT: probe.format,
                           S.WIDTH: probe.width, S.HEIGHT: probe.height})
            # Only decodable images carry their bytes onward; the rest are accounted for by their row.
            if probe.status == S.STATUS_OK and (store_content or not _reopens(path, raw)):
                record[S.CONTENT] = content
        out.append(record)
    return pd.DataFrame(out, columns=S.IMAGE_TABLE.fieldNames())


def _reopens(path: str, raw: bytes | None) -> bool:
    """Whether the stored (display) path opens this same file later."""
    return raw is None or bytes(raw) == path.encode("utf-8", "surrogateescape")


# Shards hold image bytes up to ``max_shard_bytes``; without the bytes a row is about this big.
METADATA_ROW_BYTES = 256


# ------------------------------------------------------------------ listing
LISTING_SCHEMA = T.StructType([
    T.StructField(S.IMAGE_ID, T.StringType()), T.StructField(S.PATH, T.StringType()),
    T.StructField("raw_path", T.BinaryType()), T.StructField(S.SIZE_BYTES, T.LongType()),
    T.StructField(S.MODIFICATION_TIME, T.TimestampType()), T.StructField("listing_error", T.StringType()),
    T.StructField("listing_status", T.StringType()),
])
_WALK_FIELDS = [T.StructField("walk_key", T.StringType()), T.StructField("walk_sort", T.BinaryType())]
LISTING_COLUMNS = LISTING_SCHEMA.fieldNames()
_LISTED_WITH_WALKS = T.StructType(LISTING_SCHEMA.fields + _WALK_FIELDS)


def listing_tasks(uris: list[str]) -> tuple[list[L.Task], list[str]]:
    """The listing tasks of every input (a bounded number) and the inputs' real paths."""
    local = [storage.local_path_of(u) for u in uris]
    roots = L.input_roots([p for p in local if p is not None])
    tasks: list[L.Task] = []
    for uri, path in zip(uris, local):
        if path is None:
            tasks.extend(_remote_tasks(uri))
    return L.plan_tasks(roots, _parallelism()) + tasks, [os.path.realpath(r) for r in roots]


def _parallelism() -> int:
    active = SparkSession.getActiveSession()
    return active.sparkContext.defaultParallelism if active is not None else os.cpu_count() or 1


def _remote_tasks(uri: str) -> list[L.Task]:
    if not storage.file_exists(uri):
        raise FileNotFoundError(f"input not found: {uri}")
    try:
        subfolders = L.remote_subfolders(uri)
    except (OSError, NotADirectoryError):
        subfolders = []
    if subfolders is None:
        return [L.Task(uri, "remote_tree")]
    return [L.Task(uri, "remote_top")] + [L.Task(s, "remote_tree") for s in subfolders]


def run_tasks(tasks: Iterable[L.Task], real_roots: list[str], follow_symlinks: bool) -> Iterator[ListedFile]:
    for task in tasks:
        if task.kind == "remote_top":
            yield from L.list_remote(task.path, files_only_of_top=True)
        elif task.kind == "remote_tree":
            yield from L.list_remote(task.path)
        else:
            yield from L.list_task(task, real_roots, follow_symlinks)


def _listing_row(f: ListedFile) -> tuple:
    # Times are UTC instants: tz-aware, so no executor's local time zone shifts them.
    mtime = f.modification_time.replace(tzinfo=dt.timezone.utc) if f.modification_time is not None else None
    return (image_id_for(f.path), display_path(f.path), raw_path_of(f.path), f.size_bytes, mtime,
            f.listing_error, f.listing_status, f.walk_key, f.walk_sort)


def listing_frame(spark: SparkSession, uris: list[str], follow_symlinks: bool) -> DataFrame:
    """The (lazy) listing of every input, made by executors; one row per directory entry.

    Evaluate it once (write it, or checkpoint it): a second evaluation lists the disk again.
    """
    tasks, real_roots = listing_tasks(uris)
    rdd = spark.sparkContext.parallelize(tasks, max(1, min(len(tasks), 4 * _parallelism())))
    rows = rdd.mapPartitions(lambda part: (_listing_row(f) for f in run_tasks(part, real_roots, follow_symlinks)))
    return spark.createDataFrame(rows, _LISTED_WITH_WALKS, verifySchema=False)


def first_walks_only(raw: DataFrame) -> DataFrame:
    """Drop rows of outside folders that a path earlier in walk order also reached (see listing)."""
    inside = raw.where(F.col("walk_key").isNull())
    outside = raw.where(F.col("walk_key").isNotNull())
    first = outside.groupBy("walk_key").agg(F.min("walk_sort").alias("_first"))
    outside = outside.join(first, "walk_key").where(F.col("walk_sort") == F.col("_first"))
    return inside.select(*LISTING_COLUMNS).unionByName(outside.select(*LISTING_COLUMNS))


def list_inputs(uris: list[str], follow_symlinks: bool = True, spark: SparkSession | None = None) -> list[ListedFile]:
    """Every file under every input, listed in this process: for small inputs and tests only."""
    tasks, real_roots = listing_tasks(uris)
    files = list(run_tasks(tasks, real_roots, follow_symlinks))
    first: dict[str, bytes] = {}
    for f in files:
        if f.walk_key is not None and (f.walk_key not in first or f.walk_sort < first[f.walk_key]):
            first[f.walk_key] = f.walk_sort
    kept = [f for f in files if f.walk_key is None or first[f.walk_key] == f.walk_sort]
    return sorted(kept, key=lambda f: f.path)


def list_files(uri: str, follow_symlinks: bool = True, spark: SparkSession | None = None) -> list[ListedFile]:
    """All files under ``uri`` (a file or a folder, recursively), listed in this process."""
    return list_inputs([uri], follow_symlinks, spark)


# ------------------------------------------------------------------ shards
# Shards are packed greedily within ranges of the path order; each range holds about this
# many shards, so at most one shard in this many is less than full.
SHARDS_PER_RANGE = 8


def _pack(sizes: Iterable[int], max_bytes: int, state: list[int]) -> list[int]:
    """Greedy packing in order; ``state`` = [current shard, bytes in it] carries across batches."""
    out = []
    for size in sizes:
        if state[1] and state[1] + size > max_bytes:
            state[0], state[1] = state[0] + 1, 0
        out.append(state[0])
        state[1] += int(size)
    return out


def assign_shards(rows: DataFrame, max_shard_bytes: int, min_shards: int = 1,
                  same_size: tuple[int, int] | None = None) -> tuple[DataFrame, int, list[DataFrame]]:
    """Add ``shard``: consecutive (path-ordered) rows packed into shards of at most ``max_shard_bytes``,
    smaller if that makes fewer than ``min_shards`` (while there are that many rows).

    Returns the rows, the number of shards and what was persisted (unpersist it after use).
    Computed in Spark: rows are range-partitioned by path, packed within each range, and
    shard numbers offset by the counts of the ranges before (a collect of one number per range).
    ``same_size``: (the number of rows, the size every row has), when the caller knows them (a
    metadata table: every row counts METADATA_ROW_BYTES). Then nothing is counted in Spark, and
    in a single range (metadata tables up to about 4M files) the shards are counted by arithmetic
    instead of a packing pass: two Spark jobs fewer, each a fixed cost of a small run.
    """
    if same_size is None:
        n, total = rows.agg(F.count(F.lit(1)), F.coalesce(F.sum(S.SIZE_BYTES), F.lit(0))).first()
    else:
        n, total = same_size[0], same_size[0] * same_size[1]
    if n == 0:
        return rows.withColumn("shard", F.lit(0)), 0, []
    # A shard is one describing task: a metadata table of 100k files (25 MB) would be one shard,
    # so one core would hash and probe every file while the others wait.
    max_shard_bytes = max(1, min(max_shard_bytes, -(-int(total) // max(1, min(min_shards, int(n))))))
    n_ranges = max(1, math.ceil(total / (max_shard_bytes * SHARDS_PER_RANGE)))
    ranged = (rows.repartitionByRange(n_ranges, S.PATH).sortWithinPartitions(S.PATH)
              .withColumn("_range", F.spark_partition_id()))
    schema = T.StructType([f for f in ranged.schema.fields if f.name != "_range"] + [T.StructField("shard", T.LongType())])
    if same_size is not None and n_ranges == 1:
        # What _pack makes of equal sizes: as many rows per shard as fit, at least one.
        per_shard = max(1, max_shard_bytes // max(1, same_size[1]))
        return ranged.mapInPandas(_numbering(max_shard_bytes, {0: 0}), schema), -(-int(n) // per_shard), []
    ranged = ranged.persist(StorageLevel.MEMORY_AND_DISK)

    def count(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        state, where = [0, 0], None
        for batch in batches:
            if len(batch):
                where = int(batch["_range"].iloc[0])
                _pack(batch[S.SIZE_BYTES], max_shard_bytes, state)
        if where is not None:
            yield pd.DataFrame({"_range": [where], "n": [state[0] + 1]})

    counts = dict(ranged.select("_range", S.SIZE_BYTES).mapInPandas(count, "_range int, n long").collect())
    offsets, start = {}, 0
    for r in sorted(counts):
        offsets[r], start = start, start + counts[r]

    return ranged.mapInPandas(_numbering(max_shard_bytes, offsets), schema), start, [ranged]


def _numbering(max_shard_bytes: int, offsets: dict[int, int]):
    """The shard of each row of a range: packed in path order, offset by the shards of the ranges before."""
    def number(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        state = [0, 0]
        for batch in batches:
            if len(batch):
                local = _pack(batch[S.SIZE_BYTES], max_shard_bytes, state)
                batch = batch.assign(shard=[offsets[int(batch["_range"].iloc[0])] + s for s in local])
                yield batch.drop(columns=["_range"])

    return number


def one_shard_per_partition(rows: DataFrame, n_shards: int) -> DataFrame:
    """Repartition so that partition ``k`` holds exactly shard ``k`` (one shard, one task, one file).

    ``repartition(n, shard)`` hashes, so two shards can share a task and others get none.
    Spark's hash partitioning puts a key in partition ``pmod(hash(key), n)`` (Murmur3, the SQL
    ``hash``), so a key per shard that lands exactly there is found in Spark and used instead.
    """
    spark = rows.sparkSession
    for tries in (32, 1024):
        keys = (spark.range(n_shards * tries)
                .select(F.expr(f"pmod(hash(id), {n_shards})").alias("shard"), F.col("id").alias("_key"))
                .groupBy("shard").agg(F.min("_key").alias("_key")))
        if keys.count() == n_shards:
            break
    else:  # pragma: no cover  (each of n buckets missed by 1024 n draws: probability e^-1024)
        raise RuntimeError(f"no partition key found for each of {n_shards} shards")
    placed = rows.join(F.broadcast(keys), "shard").repartition(n_shards, "_key")
    return placed.sortWithinPartitions(S.PATH).drop("_key", "shard")


def describe_listing(rows: DataFrame, config: Config, count: int | None = None) -> tuple[DataFrame, list[DataFrame]]:
    """The (lazy) image-table rows of listed files, one Spark partition per size-bounded shard.

    ``count``: the number of rows, when the caller has counted them already.
    Also returns what was persisted on the way (unpersist it once the table is written).
    """
    store_content = config.ingest.store_content
    listed = rows.select(*LISTING_COLUMNS)
    if not store_content:
        # Shards are sized by what they will hold: metadata rows, not image bytes.
        listed = listed.withColumn("_listed_size", F.col(S.SIZE_BYTES)).withColumn(
            S.SIZE_BYTES, F.lit(METADATA_ROW_BYTES).cast("long"))
    same_size = (count, METADATA_ROW_BYTES) if count is not None and not store_content else None
    sharded, n_shards, persisted = assign_shards(listed, config.ingest.max_shard_bytes,
                                                 min_shards=rows.sparkSession.sparkContext.defaultParallelism,
                                                 same_size=same_size)
    if not store_content:
        sharded = sharded.withColumn(S.SIZE_BYTES, F.col("_listed_size")).drop("_listed_size")
    if n_shards == 0:
        return rows.sparkSession.createDataFrame([], S.IMAGE_TABLE), persisted
    max_pixels = config.ingest.max_pixels

    def describe(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            yield describe_files(batch, max_pixels, store_content)

    return one_shard_per_partition(sharded, n_shards).mapInPandas(describe, schema=S.IMAGE_TABLE), persisted


def build_image_table(spark: SparkSession, config: Config) -> DataFrame:
    """List the inputs and describe every file from scratch; returns the (lazy) image table."""
    # Checkpointed: the listing is read several times (shards, then rows) and must not change.
    listed = first_walks_only(listing_frame(spark, config.ingest.input, config.ingest.follow_symlinks)
                              .localCheckpoint(eager=True))
    if listed.limit(1).count() == 0:
        raise ValueError(f"no files found under {', '.join(config.ingest.input)}")
    return describe_listing(listed, config)[0]


def table_metadata(config: Config) -> dict:
    """What decides an image-table row besides the file itself (committed with the table)."""
    return {"describe_version": DESCRIBE_VERSION, "max_pixels": config.ingest.max_pixels,
            "store_content": config.ingest.store_content}


# ------------------------------------------------------------ incremental
CHANGES = ("reused", "new", "changed", "deleted")
# Up to this many dropped paths are broadcast, so the kept rows (image bytes included) are
# filtered where they lie; above it the previous table is shuffled by a plain anti-join.
BROADCAST_DROPS = 200_000


def plan_changes(listing: DataFrame, previous: DataFrame) -> DataFrame:
    """The listing joined with the previous table by path: every path with its ``change``.

    A file whose path, size and modification time are unchanged is ``reused`` (its previous
    row stays, unread). Rows the listing itself decided (links, special files) and rows of
    files that could not be read are always redone (``changed``): they are cheap, and a file
    that was unreadable may be readable now. ``deleted`` paths have no listing columns.
    """
    prev = previous.select(S.PATH, F.col(S.SIZE_BYTES).alias("_prev_size"),
                           F.col(S.MODIFICATION_TIME).alias("_prev_time"),
                           F.col(S.CONTENT_SHA256).alias("_prev_sha"), F.lit(True).alias("_prev"))
    joined = listing.select(*LISTING_COLUMNS, F.lit(True).alias("_listed")).join(prev, S.PATH, "full_outer")
    unchanged = (F.col("listing_error").isNull() & F.col("_prev_sha").isNotNull()
                 & (F.col(S.SIZE_BYTES) == F.col("_prev_size")) & (F.col(S.MODIFICATION_TIME) == F.col("_prev_time")))
    change = (F.when(F.col("_prev").isNull(), "new").when(F.col("_listed").isNull(), "deleted")
              .when(unchanged, "reused").otherwise("changed"))
    return joined.select(*LISTING_COLUMNS, change.alias("change"))


def count_changes(plan: DataFrame) -> dict[str, int]:
    counts = dict(plan.groupBy("change").count().collect())
    return {c: int(counts.get(c, 0)) for c in CHANGES}


def _previous_rows(spark: SparkSession, uri: str, config: Config) -> DataFrame | None:
    """The committed image table at ``uri`` when it was made with the same settings, else None."""
    if not tables.is_committed(spark, uri):
        return None
    if storage.read_metadata(uri) != table_metadata(config):
        log.info("previous image table made with other settings: describing every file again")
        return None
    return tables.read_table(spark, uri, "image table")


# ---------------------------------------------------------------- the stage
def ingest(spark: SparkSession, config: Config) -> IngestReport:
    """Write the image table under the workdir (incrementally) and return its status counts."""
    workdir = storage.Workdir.of(config.workdir)
    tables.recover_table(spark, workdir.images)
    # The listing is streamed to a scratch table next to the image table (any filesystem),
    # read back for every later step, and deleted at the end; an interrupted run's is deleted
    # by the next one.
    tables.remove_siblings(spark, workdir.images, ".listing-")
    scratch = f"{workdir.images}.listing-{uuid.uuid4().hex[:12]}"
    try:
        listing_frame(spark, config.ingest.input, config.ingest.follow_symlinks).write.parquet(scratch)
        listed = first_walks_only(spark.read.schema(_LISTED_WITH_WALKS).parquet(scratch))
        n = listed.count()
        # Every job from here on is over about n files: its shuffles are sized from them.
        with tables.sized_shuffles(spark, n):
            changes = _write_image_table(spark, config, listed, n)
            report = summarize(tables.read_table(spark, workdir.images, "image table"))
    finally:
        tables.remove(spark, scratch)
    report.changes = changes
    log.info("ingested %d files: %s (%s)", report.total, report.by_status, changes)
    return report


def _write_image_table(spark: SparkSession, config: Config, listed: DataFrame, n: int) -> dict[str, int]:
    """Describe the new and changed files of the listing, keep the rest of the previous table,
    write the image table; returns the counts of the changes."""
    workdir = storage.Workdir.of(config.workdir)
    previous = _previous_rows(spark, workdir.images, config)
    persisted: list[DataFrame] = []
    try:
        if previous is None:
            if n == 0:
                raise ValueError(f"no files found under {', '.join(config.ingest.input)}")
            changes = {"reused": 0, "new": n, "changed": 0, "deleted": 0}
            table, persisted = describe_listing(listed, config, count=n)
        else:
            plan = plan_changes(listed, previous).persist(StorageLevel.MEMORY_AND_DISK)
            persisted.append(plan)
            changes = count_changes(plan)
            if changes["reused"] + changes["new"] + changes["changed"] == 0:
                raise ValueError(f"no files found under {', '.join(config.ingest.input)}")
            drop = plan.where(F.col("change").isin("changed", "deleted")).select(S.PATH)
            n_drop = changes["changed"] + changes["deleted"]
            kept = previous.join(F.broadcast(drop) if n_drop <= BROADCAST_DROPS else drop, S.PATH, "left_anti")
            described, more = describe_listing(plan.where(F.col("change").isin("new", "changed")), config,
                                               count=changes["new"] + changes["changed"])
            persisted += more
            table = kept.select(*S.IMAGE_TABLE.fieldNames()).unionByName(described)
        tables.write_table(table, workdir.images, metadata=table_metadata(config))
    finally:
        for df in persisted:
            df.unpersist()
    return changes


def summarize(image_table: DataFrame, top: int = 5) -> IngestReport:
    rows = image_table.groupBy(S.STATUS, S.ERROR).count().collect()  # one job: statuses and reasons
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[S.STATUS]] = counts.get(r[S.STATUS], 0) + int(r["count"])
    rows = [r for r in rows if r[S.STATUS] != S.STATUS_OK]

    def most_common(status: str) -> list[tuple[str, int]]:
        reasons = sorted(((r[S.ERROR], r["count"]) for r in rows if r[S.STATUS] == status),
                         key=lambda rc: (-rc[1], rc[0] or ""))
        return reasons[:top]

    return IngestReport(total=sum(counts.values()), by_status=counts, top_errors=most_common(S.STATUS_ERROR),
                        top_skipped=most_common(S.STATUS_SKIPPED))
