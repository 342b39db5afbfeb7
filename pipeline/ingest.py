"""Stage 1: an image corpus -> the image table (Parquet shards of bounded size).

Every file found is exactly one row, with ``status`` ok / error / skipped and a reason.
Listing is ours rather than Spark's ``binaryFile`` source because that source silently
ignores names starting with ``_`` or ``.`` (Hadoop's hidden-file rule; cameras name files
``_DSC1234.JPG``) and one unreadable file fails its whole task. Bytes are read by the
executors, file by file, so a bad file becomes a row, not a crash.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline import store
from pipeline.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListedFile:
    path: str
    size_bytes: int
    modification_time: dt.datetime | None
    # Set when the listing itself found a problem (broken symlink, link cycle, unreadable).
    listing_error: str | None = None


@dataclass
class IngestReport:
    total: int
    by_status: dict[str, int]
    top_errors: list[tuple[str, int]] = field(default_factory=list)

    @property
    def error_fraction(self) -> float:
        return self.by_status.get(S.STATUS_ERROR, 0) / self.total if self.total else 0.0


def image_id_for(path: str) -> str:
    """Stable id derived from the path, so reruns and incremental ingests agree."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:20]


# ------------------------------------------------------------------ listing
def list_files(uri: str, follow_symlinks: bool = True, spark: SparkSession | None = None) -> list[ListedFile]:
    """All files under ``uri`` (a file or a folder, recursively)."""
    local = store.local_path_of(uri)
    if local is not None:
        return list(_list_local(local, follow_symlinks))
    if spark is None:
        raise ValueError(f"listing {uri} needs a Spark session (Hadoop filesystem)")
    return list(_list_hadoop(spark, uri))


def _list_local(root: str, follow_symlinks: bool) -> Iterator[ListedFile]:
    """Walk a local tree. Symlink policy: followed (files and folders) when
    ``follow_symlinks``, each real folder visited once, so link cycles cannot loop;
    broken links are reported as errors; with ``follow_symlinks=False`` links are
    listed and recorded as skipped by the caller."""
    root = os.path.abspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"input not found: {root}")
    if os.path.isfile(root):
        yield _listed(root, follow_symlinks)
        return
    seen_dirs: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as exc:
            yield ListedFile(folder, 0, None, f"unreadable folder: {exc.strerror}")
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue  # a symlink back into a folder already walked (a cycle or an alias)
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield ListedFile(folder, 0, None, f"unreadable folder: {exc.strerror}")
            continue
        for entry in entries:
            path = entry.path
            if entry.is_symlink():
                if not follow_symlinks:
                    yield ListedFile(path, 0, None, "symbolic link (not followed: ingest.follow_symlinks=false)")
                    continue
                if not os.path.exists(path):
                    yield ListedFile(path, 0, None, "broken symbolic link")
                    continue
            if entry.is_dir(follow_symlinks=follow_symlinks):
                stack.append(path)
            else:
                yield _listed(path, follow_symlinks)


def _listed(path: str, follow_symlinks: bool) -> ListedFile:
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except OSError as exc:
        return ListedFile(path, 0, None, f"unreadable file: {exc.strerror}")
    if not stat.S_ISREG(st.st_mode):
        return ListedFile(path, 0, None, "not a regular file")
    mtime = dt.datetime.fromtimestamp(st.st_mtime, tz=dt.timezone.utc).replace(tzinfo=None)
    return ListedFile(path, int(st.st_size), mtime)


def _list_hadoop(spark: SparkSession, uri: str) -> Iterator[ListedFile]:
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(uri)
    fs = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    if not fs.exists(hpath):
        raise FileNotFoundError(f"input not found: {uri}")
    it = fs.listFiles(hpath, True)
    while it.hasNext():
        status = it.next()
        mtime = dt.datetime.utcfromtimestamp(status.getModificationTime() / 1000.0)
        yield ListedFile(status.getPath().toString(), int(status.getLen()), mtime)


# ------------------------------------------------------------ per-file work
def read_file(path: str) -> bytes:
    if "://" in path and not path.startswith("file://"):
        return store.read_bytes(path)
    with open(store.local_path_of(path) or path, "rb") as fh:
        return fh.read()


def describe_files(rows: pd.DataFrame, max_pixels: int) -> pd.DataFrame:
    """Listed files -> image-table rows: read, hash and probe each file, never raising."""
    from pipeline import imageio

    out = []
    for path, size, mtime, listing_error in zip(rows[S.PATH], rows[S.SIZE_BYTES], rows[S.MODIFICATION_TIME],
                                               rows["listing_error"]):
        record = {
            S.IMAGE_ID: image_id_for(path), S.PATH: path, S.SIZE_BYTES: int(size),
            S.MODIFICATION_TIME: mtime, S.CONTENT_SHA256: None, S.FORMAT: None, S.WIDTH: None,
            S.HEIGHT: None, S.STATUS: S.STATUS_ERROR, S.ERROR: None, S.CONTENT: None,
        }
        if isinstance(listing_error, str):
            record[S.STATUS] = S.STATUS_SKIPPED if listing_error.startswith("symbolic link") else S.STATUS_ERROR
            record[S.ERROR] = listing_error
            out.append(record)
            continue
        try:
            content = read_file(path)
        except OSError as exc:
            content = None
            record[S.ERROR] = f"unreadable file: {exc.strerror or exc}"
        if content is not None:
            record[S.SIZE_BYTES] = len(content)
            record[S.CONTENT_SHA256] = hashlib.sha256(content).hexdigest()
            probe = imageio.probe(content, path, max_pixels)
            record.update({S.STATUS: probe.status, S.ERROR: probe.error, S.FORMAT: probe.format,
                           S.WIDTH: probe.width, S.HEIGHT: probe.height})
            # Only decodable images carry their bytes onward; the rest are accounted for by their row.
            if probe.status == S.STATUS_OK:
                record[S.CONTENT] = content
        out.append(record)
    return pd.DataFrame(out, columns=S.IMAGE_TABLE.fieldNames())


# ---------------------------------------------------------------- the stage
def shard_by_size(files: list[ListedFile], max_shard_bytes: int) -> list[int]:
    """Consecutive (path-ordered) files are packed into shards of at most ``max_shard_bytes``."""
    shards, shard, filled = [], 0, 0
    for f in files:
        if filled and filled + f.size_bytes > max_shard_bytes:
            shard, filled = shard + 1, 0
        shards.append(shard)
        filled += f.size_bytes
    return shards


def build_image_table(spark: SparkSession, config: Config) -> DataFrame:
    """List the inputs and describe every file; returns the (lazy) image table."""
    files: list[ListedFile] = []
    for uri in config.ingest.input:
        files.extend(list_files(uri, config.ingest.follow_symlinks, spark))
    # A file reached twice (two inputs, or through a link) is still one file: one row.
    unique = {f.path: f for f in files}
    files = sorted(unique.values(), key=lambda f: f.path)
    if not files:
        raise ValueError(f"no files found under {', '.join(config.ingest.input)}")
    shard_ids = shard_by_size(files, config.ingest.max_shard_bytes)
    n_shards = shard_ids[-1] + 1
    listing_schema = "shard int, path string, size_bytes long, modification_time timestamp, listing_error string"
    rows = [(s, f.path, f.size_bytes, f.modification_time, f.listing_error) for s, f in zip(shard_ids, files)]
    listing = spark.createDataFrame(rows, listing_schema)
    # One Spark partition per shard, so each Parquet file stays within max_shard_bytes.
    listing = listing.repartition(n_shards, "shard").drop("shard") if n_shards > 1 else listing.coalesce(1).drop("shard")
    max_pixels = config.ingest.max_pixels

    def describe(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            yield describe_files(batch, max_pixels)

    return listing.mapInPandas(describe, schema=S.IMAGE_TABLE)


def summarize(image_table: DataFrame, top: int = 5) -> IngestReport:
    counts = {r[S.STATUS]: r["count"] for r in image_table.groupBy(S.STATUS).count().collect()}
    errors = (image_table.where(F.col(S.STATUS) != S.STATUS_OK).groupBy(S.ERROR).count()
              .orderBy(F.desc("count"), F.asc(S.ERROR)).limit(top).collect())
    return IngestReport(total=sum(counts.values()), by_status=counts,
                        top_errors=[(r[S.ERROR], r["count"]) for r in errors])


def ingest(spark: SparkSession, config: Config) -> IngestReport:
    """Write the image table under the workdir and return its status counts."""
    workdir = store.Workdir.of(config.workdir)
    table = build_image_table(spark, config)
    store.write_table(table, workdir.images)
    report = summarize(store.read_table(spark, workdir.images, "image table"))
    log.info("ingested %d files: %s", report.total, report.by_status)
    return report
