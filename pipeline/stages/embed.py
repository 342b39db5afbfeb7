"""Stage 2: image table -> embedding table, with a pandas UDF per executor Python worker.

The per-batch work is the encoder's plain function (:meth:`pipeline.encoders.base.Encoder.embed_function`,
testable without Spark); the UDF only wraps it. Re-runs are incremental: rows made by the
same encoder fingerprint are reused for images whose bytes did not change.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline import schemas as S
from pipeline.encoders import registry
from pipeline.encoders.base import Encoder, file_identity
from pipeline.core import image_source, storage
from pipeline.stages import tables
from pipeline.config import Config

log = logging.getLogger(__name__)

# Above this many images to (re-)embed, the ids to embed are joined normally instead of broadcast.
BROADCAST_LIMIT = 1_000_000
_SAME = "same_content"

EMBED_RESULT = T.StructType([
    T.StructField(S.EMBEDDING, T.ArrayType(T.FloatType(), False), True),
    T.StructField(S.ERROR, T.StringType(), True),
])


def view_column(rotation: int) -> str:
    """The column holding the embedding of the image rotated by ``rotation`` degrees (one-pass views)."""
    return f"{S.EMBEDDING}_rot{rotation}"


def make_embed_udf(config: Config, encoder: Encoder, views: tuple[int, ...] = ()):
    """The pandas UDF (image_id, content, path, content_sha256) -> (embedding, error[, rotated views])
    around the encoder's function. A row without stored bytes is read from its path by the decoder
    (in its thread pool, so reading overlaps inference)."""
    embed_batch = encoder.embed_function()
    fail_once_on = config.embed.fail_once_on_image
    marker = (storage.local_path_of(storage.Workdir.of(config.workdir).fault_marker)
              if fail_once_on else None)
    schema = T.StructType(EMBED_RESULT.fields + [T.StructField(view_column(r), T.ArrayType(T.FloatType(), False), True)
                                                 for r in views])

    def arrays(vectors):
        return [None if v is None else np.asarray(v, dtype=np.float32) for v in vectors]

    @F.pandas_udf(schema)
    def embed_udf(batches: Iterator[tuple[pd.Series, ...]]) -> Iterator[pd.DataFrame]:
        for ids, stored, paths, hashes in batches:
            if fail_once_on is not None and fail_once_on in set(ids) and not os.path.exists(marker):
                _die_once(marker)
            contents = image_source.sources(stored, paths, hashes)
            if views:
                # All-pairs search: the quarter turns of one side of each pair suffice.
                per_view, errors = embed_batch.views(list(contents), (0, *views), one_side=True)
                vectors = per_view[0]
            else:
                vectors, errors = embed_batch(list(contents))
            out = {S.EMBEDDING: arrays(vectors), S.ERROR: errors}
            for r, rotated in zip(views, per_view[1:] if views else []):
                out[view_column(r)] = arrays(rotated)
            yield pd.DataFrame(out)

    return embed_udf


def _die_once(marker: str) -> None:
    """Fault injection for the tests: kill this Python worker the first time only."""
    with open(marker, "w", encoding="utf-8") as fh:
        fh.write("worker killed once by embed.fail_once_on_image\n")
    log.warning("fault injection: killing Python worker %d", os.getpid())
    os._exit(17)


def build_embedding_table(spark: SparkSession, config: Config, images: DataFrame,
                          views: tuple[int, ...] = (), counted: tuple[int, int] | None = None) -> DataFrame:
    """Embed every ok image of ``images`` (a frame with image_id, content_sha256, content).

    Every encoder gives the same table; they differ only in the per-batch function. Each
    distinct content is embedded once: rows with the same ``content_sha256`` (exact copies)
    share the embedding of the first of them (by image id). ``views``: also the embeddings of
    the images rotated by these degrees, in columns :func:`view_column`, from the same decode.
    ``counted``: (ok rows, their distinct contents) when the caller knows them (one job fewer).
    """
    encoder = registry.encoder_for(config)
    udf = make_embed_udf(config, encoder, views)
    partitions_per_core = encoder.partitions_per_core
    ok = images.where(F.col(S.STATUS) == S.STATUS_OK) if S.STATUS in images.columns else images
    ok = ok.select(S.IMAGE_ID, S.CONTENT_SHA256, S.CONTENT, S.PATH)
    same = _same_content().alias(_SAME)
    keys = ok.select(S.IMAGE_ID, S.CONTENT_SHA256, same)
    if counted is None:
        row = keys.agg(F.count(F.lit(1)).alias("rows"), F.countDistinct(_SAME).alias("distinct")).first()
        counted = (int(row["rows"]), int(row["distinct"]))
    copies = counted[0] - counted[1]
    todo = ok
    if copies:
        first = keys.groupBy(_SAME).agg(F.min(S.IMAGE_ID).alias(S.IMAGE_ID)).localCheckpoint()
        # Only the (small) ids travel: the rows (with image bytes, when stored) are filtered where they lie.
        chosen = first.select(S.IMAGE_ID)
        todo = ok.join(F.broadcast(chosen) if counted[1] <= BROADCAST_LIMIT else chosen, S.IMAGE_ID, "left_semi")
        log.info("%d exact copies (same content_sha256) share the embedding of their first image", copies)
    # At least one partition per core, so a small corpus still uses every executor core.
    n = max(todo.rdd.getNumPartitions(), partitions_per_core * spark.sparkContext.defaultParallelism)
    result = udf(F.col(S.IMAGE_ID), F.col(S.CONTENT), F.col(S.PATH), F.col(S.CONTENT_SHA256))
    embedded = (
        todo.repartition(n)
        .select(F.col(S.IMAGE_ID), F.col(S.CONTENT_SHA256), result.alias("r"))
        .select(
            F.col(S.IMAGE_ID),
            F.col(S.CONTENT_SHA256),
            F.lit(storage.tag_of(config.embed.backbone)).alias(S.BACKBONE),
            F.col("r." + S.EMBEDDING).alias(S.EMBEDDING),
            F.when(F.col("r." + S.ERROR).isNull(), F.lit(S.STATUS_OK)).otherwise(F.lit(S.STATUS_ERROR)).alias(S.STATUS),
            F.col("r." + S.ERROR).alias(S.ERROR),
            *[F.col("r." + view_column(r)).alias(view_column(r)) for r in views],
        )
    )
    columns = S.EMBEDDING_TABLE.fieldNames() + [view_column(r) for r in views]
    if not copies:
        return embedded
    shared = embedded.select(F.col(S.IMAGE_ID).alias("first_id"), *[c for c in columns
                                                                     if c not in (S.IMAGE_ID, S.CONTENT_SHA256)])
    return (keys.join(first.withColumnRenamed(S.IMAGE_ID, "first_id"), _SAME).join(shared, "first_id")
            .select(*columns))


def _same_content():
    """The key of identical contents; a row without a hash is its own content."""
    return F.coalesce(F.col(S.CONTENT_SHA256), F.concat(F.lit("id:"), F.col(S.IMAGE_ID)))


def derived_config(config: Config, name: str, **overrides) -> Config:
    """A config whose workdir is ``<workdir>/derived/<name>`` (derived tables and their index)."""
    sub = storage.Workdir.of(config.workdir).derived(name).root
    return config.with_overrides(workdir=sub, mlflow__tracking_uri=config.tracking_uri(), **overrides)


def rotated_table(config: Config, rotation: int) -> tuple[Config, str]:
    """The config and path of the embedding table of every image rotated by ``rotation`` degrees."""
    sub = derived_config(config, f"rot{rotation}", embed__rotation=rotation)
    return sub, storage.Workdir.of(sub.workdir).embeddings(config.embed.backbone)


def rotated_meta(config: Config, rotation: int, images: DataFrame) -> dict:
    """What a rotated table was made from: its model and the image table's (id, hash) digest."""
    meta = {"model": model_fingerprint(rotated_table(config, rotation)[0]), "images": _ok_digest(images)}
    return json.loads(json.dumps(meta))


# (plan, files) -> digest: one job per written image table, not one per rotation and stage
# (a run asked for it six times, a Spark job each). The lock: the rotated tables are written
# from concurrent threads, which all missed the memo and each ran the job.
_DIGESTS: dict[tuple, list[int]] = {}
_DIGESTS_LOCK = threading.Lock()


def _ok_digest(images: DataFrame) -> list[int]:
    with _DIGESTS_LOCK:
        return _ok_digest_once(images)


def _digest_key(images: DataFrame) -> tuple | None:
    try:
        # Part files carry their write job's id, so a rewritten table is a new key.
        key = (images.semanticHash(), tuple(sorted(images.inputFiles())))
    except Exception:  # a frame without files (tests build some in memory): no memo
        return None
    return key if key[1] else None


def _remember_digest(key: tuple | None, digest: list[int]) -> None:
    if key is not None:
        if len(_DIGESTS) > 64:
            _DIGESTS.clear()
        _DIGESTS[key] = list(digest)


def _ok_digest_once(images: DataFrame) -> list[int]:
    key = _digest_key(images)
    if key is not None and key in _DIGESTS:
        return list(_DIGESTS[key])
    row = images.where(F.col(S.STATUS) == S.STATUS_OK).agg(
        F.count(F.lit(1)).alias("n"), F.sum(_id_hash()).alias("h")).first()
    digest = [int(row["n"]), int(row["h"] or 0)]
    _remember_digest(key, digest)
    return list(digest)


def _id_hash():
    return F.crc32(F.concat_ws("/", S.IMAGE_ID, S.CONTENT_SHA256))


@dataclasses.dataclass(frozen=True)
class ImageCounts:
    """What the embed stage needs to know of the image table before embedding."""

    rows: int         # every row (sizes the shuffles)
    ok: int           # rows to embed
    distinct_ok: int  # distinct contents among them (exact copies share one embedding)


def image_counts(images: DataFrame) -> ImageCounts:
    """The counts of the image table and its digest (:func:`rotated_meta`), in one job: at
    2,794 images these were four jobs, one of them after the network's, on the critical path."""
    ok = F.col(S.STATUS) == S.STATUS_OK
    spark = images.sparkSession
    # Before the table's size is known: its shuffle as wide as its scan, without adaptive
    # execution (which runs each shuffle stage as a job of its own: three jobs here).
    width = max(spark.sparkContext.defaultParallelism, images.rdd.getNumPartitions())
    with tables.session_settings(spark, {tables.SHUFFLE_PARTITIONS: str(width), tables.ADAPTIVE: "false"}):
        row = images.agg(F.count(F.lit(1)).alias("rows"), F.sum(ok.cast("long")).alias("ok"),
                         F.countDistinct(F.when(ok, _same_content())).alias("distinct"),
                         F.sum(F.when(ok, _id_hash())).alias("h")).first()
    counts = ImageCounts(int(row["rows"]), int(row["ok"] or 0), int(row["distinct"]))
    with _DIGESTS_LOCK:
        _remember_digest(_digest_key(images), [counts.ok, int(row["h"] or 0)])
    return counts


def _views_for(config: Config, encoder: Encoder) -> tuple[int, ...]:
    """Rotations the search will want (``dedup.rotations``), when this encoder can embed them in one pass."""
    if not (encoder.reranking and encoder.embeds_views) or config.embed.rotation or not config.embed.views_in_one_pass:
        return ()
    return tuple(r for r in dict.fromkeys(config.dedup.rotations) if r != 0)


# Embed settings that change how fast, not what, is computed.
_NOT_IN_FINGERPRINT = ("batch_size", "arrow_batch_rows", "fail_once_on_image", "tf_threads", "views_in_one_pass")


def model_fingerprint(config: Config) -> dict:
    """What decides an embedding besides the image bytes; committed with the embedding table.

    Every embed setting counts except those in ``_NOT_IN_FINGERPRINT`` (so a setting added
    later invalidates old embeddings by default rather than being silently ignored). A file a
    setting names (weights, model, post-processing) is identified by its size and modification
    time as well as its path, so replacing it in place invalidates the previous embeddings.
    """
    settings = {k: v for k, v in dataclasses.asdict(config.embed).items() if k not in _NOT_IN_FINGERPRINT}
    encoder = registry.encoder_for(config)
    files = file_identity(list(settings.values()) + encoder.fingerprint_files())
    key = encoder.fingerprint()
    return json.loads(json.dumps({"settings": settings, "model": key, "files": files,
                                  "max_pixels": config.ingest.max_pixels,
                                  "schema": S.EMBEDDING_TABLE.simpleString()}, sort_keys=True, default=str))


def _keys(compared: DataFrame, *kinds: str) -> DataFrame:
    keys = compared.where(F.col("kind").isin(*kinds)).select(S.IMAGE_ID, S.CONTENT_SHA256)
    # Broadcast the (image_id, sha256) keys so the rows they select, image bytes or vectors,
    # are filtered where they lie instead of being shuffled to a join.
    return F.broadcast(keys) if keys.count() <= BROADCAST_LIMIT else keys


ONE_SIDE_REASON = "wider than tall: its sideways copies are found from their side"


def _view_writes(spark: SparkSession, config: Config, images: DataFrame, table: DataFrame,
                 views: tuple[int, ...]) -> list:
    """Writes of the rotated-view tables where the search looks for them (its rebuild then finds them fresh)."""
    def write(r: int) -> None:
        _, target = rotated_table(config, r)
        vector = F.col(view_column(r))
        # A quarter turn not embedded (one side of each pair suffices) is a skipped row, not an error.
        skipped = (F.col(S.STATUS) == S.STATUS_OK) & vector.isNull()
        replaced = {S.EMBEDDING: vector.alias(S.EMBEDDING),
                    S.STATUS: F.when(skipped, F.lit(S.STATUS_SKIPPED)).otherwise(F.col(S.STATUS)).alias(S.STATUS),
                    S.ERROR: F.when(skipped, F.lit(ONE_SIDE_REASON)).otherwise(F.col(S.ERROR)).alias(S.ERROR)}
        rotated = table.select(*[replaced.get(c, F.col(c)) for c in S.EMBEDDING_TABLE.fieldNames()])
        tables.write_table(rotated, target, metadata=rotated_meta(config, r, images))

    return [lambda r=r: write(r) for r in views]


def _run_together(writes: list) -> None:
    """Independent table writes at once: each is a short chain of Spark jobs on a small table,
    mostly scheduling latency, so they overlap (the first error is raised after all ended)."""
    if len(writes) == 1:
        writes[0]()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(writes), thread_name_prefix="write") as pool:
        futures = [pool.submit(w) for w in writes]
    for future in futures:
        future.result()


def embed(spark: SparkSession, config: Config, incremental: bool = True) -> dict:
    """Write the embedding table for ``config.embed.backbone``; returns counts.

    Incremental: rows of a previous embedding table made by the same model are reused for
    images whose (image_id, content_sha256) is unchanged; only new and changed images go
    through the model. Counts: ok / error (rows of the table written), and reused / new /
    changed / deleted (against the previous table) and embedded (model calls this run).
    ``incremental=False`` embeds everything again (benchmarks that time the model want that).
    """
    images = tables.read_table(spark, storage.Workdir.of(config.workdir).images, "image table")
    known = image_counts(images)
    with tables.sized_shuffles(spark, known.rows):
        return _embed(spark, config, images, incremental, known)


def _embed(spark: SparkSession, config: Config, images: DataFrame, incremental: bool, known: ImageCounts) -> dict:
    workdir = storage.Workdir.of(config.workdir)
    target = workdir.embeddings(config.embed.backbone)
    tables.recover_table(spark, target)
    fingerprint = model_fingerprint(config)
    ok = images.where(F.col(S.STATUS) == S.STATUS_OK)
    previous = None
    if incremental and tables.is_committed(spark, target):
        if storage.read_metadata(target) == fingerprint:
            previous = tables.read_table(spark, target, "embedding table")
        else:
            log.info("previous embedding table at %s was made by another model or version: not reused", target)
    views: tuple[int, ...] = ()
    writes: list = []
    if previous is None:
        changes = {"reused": 0, "new": known.ok, "changed": 0, "deleted": 0}
        views = _views_for(config, registry.encoder_for(config))
        table = build_embedding_table(spark, config, ok, views, counted=(known.ok, known.distinct_ok))
        if views:
            # One pass computes every view; it is kept (executor memory) while the tables are written.
            table = table.localCheckpoint()
            writes = _view_writes(spark, config, images, table, views)
            table = table.select(*S.EMBEDDING_TABLE.fieldNames())
            log.info("rotated views %s embedded in the same pass", list(views))
    else:
        current = ok.select(S.IMAGE_ID, S.CONTENT_SHA256)
        before = previous.select(S.IMAGE_ID, F.col(S.CONTENT_SHA256).alias("previous_sha256"))
        kind = (F.when(F.col("previous_sha256").isNull(), "new")
                .when(F.col(S.CONTENT_SHA256).isNull(), "deleted")
                .when(F.col(S.CONTENT_SHA256) == F.col("previous_sha256"), "reused")
                .otherwise("changed"))
        compared = current.join(before, S.IMAGE_ID, "full_outer").withColumn("kind", kind)
        compared = compared.localCheckpoint()  # compared once, used for the counts and the to-do list
        changes = {"reused": 0, "new": 0, "changed": 0, "deleted": 0}
        changes.update({r["kind"]: r["count"] for r in compared.groupBy("kind").count().collect()})
        todo = ok.join(_keys(compared, "new", "changed"), [S.IMAGE_ID, S.CONTENT_SHA256], "left_semi")
        kept = previous.join(_keys(compared, "reused"), [S.IMAGE_ID, S.CONTENT_SHA256], "left_semi")
        fresh = (build_embedding_table(spark, config, todo) if changes["new"] + changes["changed"]
                 else spark.createDataFrame([], S.EMBEDDING_TABLE))
        table = kept.select(*S.EMBEDDING_TABLE.fieldNames()).unionByName(fresh)
    _run_together(writes + [lambda: tables.write_table(table, target, metadata=fingerprint)])
    written = tables.read_table(spark, target, "embedding table")
    row = written.agg(F.count(F.lit(1)).alias("rows"), F.countDistinct(_same_content()).alias("distinct"),
                      *[F.sum((F.col(S.STATUS) == status).cast("long")).alias(status)
                        for status in (S.STATUS_OK, S.STATUS_ERROR)]).first()
    counts = {status: int(row[status] or 0) for status in (S.STATUS_OK, S.STATUS_ERROR)}
    counts.update(changes)
    counts["embedded"] = changes["new"] + changes["changed"]
    # Rows sharing another row's embedding because their bytes are the same (embedded once).
    counts["exact_copies"] = int(row["rows"]) - int(row["distinct"])
    log.info("embedded with %s: %s", config.embed.backbone, counts)
    return counts


def embed_rotated(spark: SparkSession, config: Config, ids: list[str], rotations: list[int]) -> dict[int, dict]:
    """The rotated embeddings of a few images (incremental dedup: the new ones), the model unchanged."""
    out: dict[int, dict] = {r: {} for r in rotations}
    if not ids or not rotations:
        return out
    images = tables.read_table(spark, storage.Workdir.of(config.workdir).images, "image table")
    chosen = images.where(F.col(S.IMAGE_ID).isin(ids) & (F.col(S.STATUS) == S.STATUS_OK))
    # Every rotation in one job: one decode per image for all views where the encoder can
    # (the embed stage's one-pass views), else its batch function per rotation.
    encoder = registry.encoder_for(config)
    if encoder.embeds_views:
        views_fn = encoder.embed_function()

        def per_rotation(contents: list) -> dict[int, list]:
            # As the embed stage's one-pass views (the full dedup this update must equal).
            return dict(zip(rotations, views_fn.views(contents, tuple(rotations), one_side=True)[0]))
    else:
        functions = {r: registry.encoder_for(config.with_overrides(embed__rotation=r)).embed_function()
                     for r in rotations}

        def per_rotation(contents: list) -> dict[int, list]:
            return {r: fn(contents)[0] for r, fn in functions.items()}

    def embed(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            contents = image_source.sources(pdf[S.CONTENT], pdf[S.PATH], pdf[S.CONTENT_SHA256])
            for r, vectors in per_rotation(contents).items():
                yield pd.DataFrame({"rotation": r, S.IMAGE_ID: pdf[S.IMAGE_ID],
                                    S.EMBEDDING: [None if v is None else np.asarray(v, np.float32) for v in vectors]})

    rows = (chosen.select(S.IMAGE_ID, S.CONTENT, S.PATH, S.CONTENT_SHA256).repartition(spark.sparkContext.defaultParallelism)
            .mapInPandas(embed, schema=f"rotation int, {S.IMAGE_ID} string, {S.EMBEDDING} array<float>").collect())
    for row in rows:
        if row[S.EMBEDDING] is not None:
            out[row["rotation"]][row[S.IMAGE_ID]] = np.asarray(row[S.EMBEDDING], np.float32)
    return out
