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
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline import schemas as S
from pipeline.encoders import registry
from pipeline.encoders.base import Encoder, file_identity
from pipeline.core import storage
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


def make_embed_udf(config: Config, encoder: Encoder):
    """The pandas UDF (image_id, content) -> (embedding, error) around ``encoder.embed_function()``."""
    embed_batch = encoder.embed_function()
    fail_once_on = config.embed.fail_once_on_image
    marker = (storage.local_path_of(storage.Workdir.of(config.workdir).fault_marker)
              if fail_once_on else None)

    @F.pandas_udf(EMBED_RESULT)
    def embed_udf(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        for ids, contents in batches:
            if fail_once_on is not None and fail_once_on in set(ids) and not os.path.exists(marker):
                _die_once(marker)
            vectors, errors = embed_batch(list(contents))
            yield pd.DataFrame({
                S.EMBEDDING: [None if v is None else np.asarray(v, dtype=np.float32) for v in vectors],
                S.ERROR: errors,
            })

    return embed_udf


def _die_once(marker: str) -> None:
    """Fault injection for the tests: kill this Python worker the first time only."""
    with open(marker, "w", encoding="utf-8") as fh:
        fh.write("worker killed once by embed.fail_once_on_image\n")
    log.warning("fault injection: killing Python worker %d", os.getpid())
    os._exit(17)


def build_embedding_table(spark: SparkSession, config: Config, images: DataFrame) -> DataFrame:
    """Embed every ok image of ``images`` (a frame with image_id, content_sha256, content).

    Every encoder gives the same table; they differ only in the per-batch function. Each
    distinct content is embedded once: rows with the same ``content_sha256`` (exact copies)
    share the embedding of the first of them (by image id).
    """
    encoder = registry.encoder_for(config)
    udf = make_embed_udf(config, encoder)
    partitions_per_core = encoder.partitions_per_core
    ok = images.where(F.col(S.STATUS) == S.STATUS_OK) if S.STATUS in images.columns else images
    ok = ok.select(S.IMAGE_ID, S.CONTENT_SHA256, S.CONTENT)
    # A row without a hash is its own content.
    same = F.coalesce(F.col(S.CONTENT_SHA256), F.concat(F.lit("id:"), F.col(S.IMAGE_ID))).alias(_SAME)
    keys = ok.select(S.IMAGE_ID, S.CONTENT_SHA256, same)
    first = keys.groupBy(_SAME).agg(F.min(S.IMAGE_ID).alias(S.IMAGE_ID)).localCheckpoint()
    copies = keys.count() - first.count()
    todo = ok
    if copies:
        # Only the (small) ids travel: the image bytes are filtered where they lie.
        chosen = first.select(S.IMAGE_ID)
        todo = ok.join(F.broadcast(chosen) if first.count() <= BROADCAST_LIMIT else chosen, S.IMAGE_ID, "left_semi")
        log.info("%d exact copies (same content_sha256) share the embedding of their first image", copies)
    # At least one partition per core, so a small corpus still uses every executor core.
    n = max(todo.rdd.getNumPartitions(), partitions_per_core * spark.sparkContext.defaultParallelism)
    result = udf(F.col(S.IMAGE_ID), F.col(S.CONTENT))
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
        )
    )
    if not copies:
        return embedded
    shared = embedded.select(F.col(S.IMAGE_ID).alias("first_id"), *[c for c in S.EMBEDDING_TABLE.fieldNames()
                                                                     if c not in (S.IMAGE_ID, S.CONTENT_SHA256)])
    return (keys.join(first.withColumnRenamed(S.IMAGE_ID, "first_id"), _SAME).join(shared, "first_id")
            .select(*S.EMBEDDING_TABLE.fieldNames()))


# Embed settings that change how fast, not what, is computed.
_NOT_IN_FINGERPRINT = ("batch_size", "arrow_batch_rows", "fail_once_on_image", "tf_threads")


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


def embed(spark: SparkSession, config: Config, incremental: bool = True) -> dict:
    """Write the embedding table for ``config.embed.backbone``; returns counts.

    Incremental: rows of a previous embedding table made by the same model are reused for
    images whose (image_id, content_sha256) is unchanged; only new and changed images go
    through the model. Counts: ok / error (rows of the table written), and reused / new /
    changed / deleted (against the previous table) and embedded (model calls this run).
    ``incremental=False`` embeds everything again (benchmarks that time the model want that).
    """
    workdir = storage.Workdir.of(config.workdir)
    images = tables.read_table(spark, workdir.images, "image table")
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
    if previous is None:
        changes = {"reused": 0, "new": ok.count(), "changed": 0, "deleted": 0}
        table = build_embedding_table(spark, config, ok)
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
    tables.write_table(table, target, metadata=fingerprint)
    written = tables.read_table(spark, target, "embedding table")
    counts = {S.STATUS_OK: 0, S.STATUS_ERROR: 0}
    counts.update({r[S.STATUS]: r["count"] for r in written.groupBy(S.STATUS).count().collect()})
    counts.update(changes)
    counts["embedded"] = changes["new"] + changes["changed"]
    # Rows sharing another row's embedding because their bytes are the same (embedded once).
    counts["exact_copies"] = written.count() - written.select(S.CONTENT_SHA256).distinct().count()
    log.info("embedded with %s: %s", config.embed.backbone, counts)
    return counts
