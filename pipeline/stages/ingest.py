"""Stage 1: an image corpus -> the image table (Parquet shards of bounded size).

Every file found is exactly one row, with ``status`` ok / error / skipped and a reason.
Listing is ours rather than Spark's ``binaryFile`` source because that source silently
ignores names starting with ``_`` or ``.`` (Hadoop's hidden-file rule; cameras name files
``_DSC1234.JPG``) and one unreadable file fails its whole task. Bytes are read by the
executors, file by file, so a bad file becomes a row, not a crash.

Incremental: when the workdir already holds an image table made with the same settings, a
file whose (path, size, modification time) is unchanged keeps its previous row without
being read; new and changed files are described; rows of deleted files are dropped. The
new table is written whole and committed by rename (see :mod:`pipeline.stages.tables`), so an
interrupted ingest leaves the previous table in place.
"""
from __future__ import annotations

import datetime as dt
import errno
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
from pipeline.core import storage
from pipeline.stages import tables
from pipeline.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListedFile:
    path: str  # as the OS gave it: may hold surrogate escapes for names that are not UTF-8
    size_bytes: int
    modification_time: dt.datetime | None
    # Set when the listing itself decided the row (broken symlink, link cycle, not a file ...).
    listing_error: str | None = None
    listing_status: str = S.STATUS_ERROR


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


def raw_path_of(path: str) -> bytes:
    """The exact bytes of a path (names that are not UTF-8 come back from the OS escaped)."""
    return path.encode("utf-8", "surrogateescape")


def display_path(path: str) -> str:
    """The path as stored in the image table: valid UTF-8, undecodable bytes shown as ``\\xNN``.

    Spark strings must be valid UTF-8; an archive from an old Latin-1 system has names that
    are not, and those files still deserve a row (and a readable name) instead of a crash.
    """
    return raw_path_of(path).decode("utf-8", "backslashreplace")


def image_id_for(path: str) -> str:
    """Stable id derived from the path, so reruns and incremental ingests agree."""
    return hashlib.sha1(raw_path_of(path)).hexdigest()[:20]


# ------------------------------------------------------------------ listing
def list_files(uri: str, follow_symlinks: bool = True, spark: SparkSession | None = None) -> list[ListedFile]:
    """All files under ``uri`` (a file or a folder, recursively)."""
    return list_inputs([uri], follow_symlinks, spark)


def list_inputs(uris: list[str], follow_symlinks: bool = True,
                spark: SparkSession | None = None) -> list[ListedFile]:
    """Every file under every input, each path once, sorted by path."""
    files: list[ListedFile] = []
    local = [storage.local_path_of(u) for u in uris]
    local_roots = [os.path.abspath(p) for p in local if p is not None]
    if local_roots:
        files.extend(_list_local(local_roots, follow_symlinks))
    for uri, path in zip(uris, local):
        if path is None:
            if spark is None:
                raise ValueError(f"listing {uri} needs a Spark session (Hadoop filesystem)")
            files.extend(_list_hadoop(spark, uri))
    # A file reached twice (overlapping inputs) is still one file: one row.
    unique = {f.path: f for f in files}
    return sorted(unique.values(), key=lambda f: f.path)


def _inside(real: str, real_roots: list[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in real_roots)


def _list_local(roots: list[str], follow_symlinks: bool) -> Iterator[ListedFile]:
    """Walk local trees; every directory entry that is not a folder becomes one ListedFile.

    Symlink policy (documented in docs/bad-files.md):

    * ``follow_symlinks=false``: every link is listed and recorded as skipped.
    * a link whose target lies inside an input is skipped ("already in the input"): the
      target is listed once under its real path, so a link can neither double a file nor
      loop (link cycles are links into the tree);
    * a link to a file or folder outside every input is followed and listed under the
      link's path; each real folder is walked at most once, so links between outside
      folders cannot loop either;
    * a link to nothing is an error ("broken symbolic link"; "symbolic link loop" when
      the link chain never ends).
    """
    for root in roots:
        if not os.path.exists(root):
            raise FileNotFoundError(f"input not found: {root}")
    real_roots = [os.path.realpath(r) for r in roots]
    seen_dirs: set[tuple[int, int]] = set()
    stack: list[str] = []
    for root in reversed(roots):
        if os.path.isdir(root):
            stack.append(root)
        else:
            yield _listed(root, follow_symlinks=True)
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as exc:
            yield ListedFile(folder, 0, None, f"unreadable folder: {exc.strerror}")
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue  # an input nested in another, or an outside folder reached twice
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield ListedFile(folder, 0, None, f"unreadable folder: {exc.strerror}")
            continue
        subfolders: list[str] = []
        for entry in entries:
            path = entry.path
            if entry.is_symlink():
                listed = _symlink(path, follow_symlinks, real_roots)
                if listed is None:
                    subfolders.append(path)
                elif listed is not _FOLLOW_FILE:
                    yield listed
                    continue
                else:
                    yield _listed(path, follow_symlinks=True)
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(path)
            else:
                yield _listed(path, follow_symlinks=False)
        # Reversed so folders pop in name order: which of two links to the same outside
        # folder names its files is then decided by name, the same on every run.
        stack.extend(reversed(subfolders))


_FOLLOW_FILE = ListedFile("", 0, None)  # sentinel: "list the link like a plain file"


def _symlink(path: str, follow_symlinks: bool, real_roots: list[str]) -> ListedFile | None:
    """Apply the symlink policy to one link: a finished row, _FOLLOW_FILE, or None (walk it)."""
    if not follow_symlinks:
        return ListedFile(path, 0, None, "symbolic link (not followed: ingest.follow_symlinks=false)",
                          S.STATUS_SKIPPED)
    try:
        st = os.stat(path)
    except OSError as exc:
        reason = "symbolic link loop" if exc.errno == errno.ELOOP else "broken symbolic link"
        return ListedFile(path, 0, None, reason)
    is_dir = stat.S_ISDIR(st.st_mode)
    if _inside(os.path.realpath(path), real_roots):
        what = "folder" if is_dir else "file"
        return ListedFile(path, 0, None, f"symbolic link to a {what} already in the input", S.STATUS_SKIPPED)
    return None if is_dir else _FOLLOW_FILE


def _listed(path: str, follow_symlinks: bool) -> ListedFile:
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except OSError as exc:
        return ListedFile(path, 0, None, f"unreadable file: {exc.strerror}")
    if not stat.S_ISREG(st.st_mode):
        return ListedFile(path, 0, None, f"not a regular file ({_file_kind(st.st_mode)})")
    mtime = dt.datetime.fromtimestamp(st.st_mtime, tz=dt.timezone.utc).replace(tzinfo=None)
    return ListedFile(path, int(st.st_size), mtime)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


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
def read_file(path: str | bytes) -> bytes:
    if isinstance(path, str) and "://" in path and not path.startswith("file://"):
        return storage.read_bytes(path)
    if isinstance(path, str):
        path = storage.local_path_of(path) or path
    # Opened read-only and never written back: the jobs never modify their inputs.
    with open(path, "rb") as fh:
        return fh.read()


def describe_files(rows: pd.DataFrame, max_pixels: int) -> pd.DataFrame:
    """Listed files -> image-table rows: read, hash and probe each file, never raising.

    ``rows`` has the listing columns (path, size_bytes, modification_time, listing_error,
    optionally listing_status, raw_path and image_id as made by :func:`build_image_table`).
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


LISTING_SCHEMA = ("shard int, image_id string, path string, raw_path binary, size_bytes long, "
                  "modification_time timestamp, listing_error string, listing_status string")


def describe_listing(spark: SparkSession, files: list[ListedFile], config: Config) -> DataFrame:
    """The (lazy) image-table rows of ``files``, one Spark partition per size-bounded shard."""
    if not files:
        return spark.createDataFrame([], S.IMAGE_TABLE)
    shard_ids = shard_by_size(files, config.ingest.max_shard_bytes)
    n_shards = shard_ids[-1] + 1
    rows = [(s, image_id_for(f.path), display_path(f.path), raw_path_of(f.path), f.size_bytes,
             f.modification_time, f.listing_error, f.listing_status) for s, f in zip(shard_ids, files)]
    listing = spark.createDataFrame(rows, LISTING_SCHEMA)
    # One Spark partition per shard, so each Parquet file stays within max_shard_bytes.
    listing = listing.repartition(n_shards, "shard").drop("shard") if n_shards > 1 else listing.coalesce(1).drop("shard")
    max_pixels = config.ingest.max_pixels

    def describe(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            yield describe_files(batch, max_pixels)

    return listing.mapInPandas(describe, schema=S.IMAGE_TABLE)


def build_image_table(spark: SparkSession, config: Config) -> DataFrame:
    """List the inputs and describe every file from scratch; returns the (lazy) image table."""
    files = list_inputs(config.ingest.input, config.ingest.follow_symlinks, spark)
    if not files:
        raise ValueError(f"no files found under {', '.join(config.ingest.input)}")
    return describe_listing(spark, files, config)


def table_metadata(config: Config) -> dict:
    """What decides an image-table row besides the file itself (committed with the table)."""
    return {"describe_version": DESCRIBE_VERSION, "max_pixels": config.ingest.max_pixels}


@dataclass
class Plan:
    """Incremental ingest: which listed files need reading, which previous rows stay."""
    describe: list[ListedFile]
    drop_paths: list[str]  # previous rows not carried over (changed, deleted, re-read)
    changes: dict[str, int]


def plan_incremental(files: list[ListedFile], previous: dict[str, tuple]) -> Plan:
    """Compare the listing with the previous table's (path -> size, mtime, sha256, status).

    A file whose path, size and modification time are unchanged keeps its previous row
    without being read again. Rows the listing itself decided (links, special files) and
    rows of files that could not be read are always redone: they are cheap, and a file
    that was unreadable may be readable now.
    """
    describe, keep = [], set()
    changes = {"reused": 0, "new": 0, "changed": 0, "deleted": 0}
    for f in files:
        key = display_path(f.path)
        old = previous.get(key)
        if old is None:
            changes["new"] += 1
            describe.append(f)
        elif (f.listing_error is None and old[2] is not None and old[0] == f.size_bytes
              and old[1] == f.modification_time):
            changes["reused"] += 1
            keep.add(key)
        else:
            changes["changed"] += 1
            describe.append(f)
    listed = {display_path(f.path) for f in files}
    changes["deleted"] = sum(1 for p in previous if p not in listed)
    return Plan(describe, sorted(p for p in previous if p not in keep), changes)


def _previous_rows(spark: SparkSession, uri: str, config: Config) -> DataFrame | None:
    """The committed image table at ``uri`` when it was made with the same settings, else None."""
    if not tables.is_committed(spark, uri):
        return None
    if storage.read_metadata(uri) != table_metadata(config):
        log.info("previous image table made with other settings: describing every file again")
        return None
    return tables.read_table(spark, uri, "image table")


def ingest(spark: SparkSession, config: Config) -> IngestReport:
    """Write the image table under the workdir (incrementally) and return its status counts."""
    workdir = storage.Workdir.of(config.workdir)
    tables.recover_table(spark, workdir.images)
    files = list_inputs(config.ingest.input, config.ingest.follow_symlinks, spark)
    if not files:
        raise ValueError(f"no files found under {', '.join(config.ingest.input)}")
    previous = _previous_rows(spark, workdir.images, config)
    if previous is None:
        plan = Plan(files, [], {"reused": 0, "new": len(files), "changed": 0, "deleted": 0})
        table = describe_listing(spark, files, config)
    else:
        known = {r[S.PATH]: (r[S.SIZE_BYTES], r[S.MODIFICATION_TIME], r[S.CONTENT_SHA256], r[S.STATUS])
                 for r in previous.select(S.PATH, S.SIZE_BYTES, S.MODIFICATION_TIME, S.CONTENT_SHA256,
                                          S.STATUS).collect()}
        plan = plan_incremental(files, known)
        kept = previous
        if plan.drop_paths:
            # Broadcast the (usually short) list of dropped paths so the kept rows, image bytes
            # included, are filtered where they lie instead of being shuffled.
            drop = spark.createDataFrame([(p,) for p in plan.drop_paths], f"{S.PATH} string")
            kept = previous.join(F.broadcast(drop), S.PATH, "left_anti")
        table = kept.select(*S.IMAGE_TABLE.fieldNames()).unionByName(describe_listing(spark, plan.describe, config))
    tables.write_table(table, workdir.images, metadata=table_metadata(config))
    report = summarize(tables.read_table(spark, workdir.images, "image table"))
    report.changes = plan.changes
    log.info("ingested %d files: %s (%s)", report.total, report.by_status, plan.changes)
    return report


def summarize(image_table: DataFrame, top: int = 5) -> IngestReport:
    rows = image_table.where(F.col(S.STATUS) != S.STATUS_OK).groupBy(S.STATUS, S.ERROR).count().collect()
    counts = {r[S.STATUS]: r["count"] for r in image_table.groupBy(S.STATUS).count().collect()}

    def most_common(status: str) -> list[tuple[str, int]]:
        reasons = sorted(((r[S.ERROR], r["count"]) for r in rows if r[S.STATUS] == status),
                         key=lambda rc: (-rc[1], rc[0] or ""))
        return reasons[:top]

    return IngestReport(total=sum(counts.values()), by_status=counts, top_errors=most_common(S.STATUS_ERROR),
                        top_skipped=most_common(S.STATUS_SKIPPED))
