"""The Spark path of ``neardup query``: many new images against an archive's index.

The query files are ingested and embedded (the usual stages, incremental) into a nested
workdir, ``<workdir>/query/``; the search is :func:`pipeline.stages.search.search_neighbors`
with the query vectors. The similarity is the one the light path computes
(:mod:`pipeline.querylight`, :mod:`pipeline.core.matching`): per query, the best over its
variants (its DBA-augmented vector as if it were in the archive, its rotations) of the inner
product with the archive's augmented vectors.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.config import Config
from pipeline.core import matching, storage
from pipeline.encoders import registry
from pipeline.stages import dedup as dd
from pipeline.stages import embed as em
from pipeline.stages import ingest as ing
from pipeline.stages import tables
from pipeline.stages.search import search_neighbors

log = logging.getLogger(__name__)

MATCHES_SCHEMA = ("query_path string, query_status string, query_error string, image_id string, path string, "
                  "similarity float, score float, rank int")
_ROLE = "role"


def _as_queries(frame: DataFrame) -> DataFrame:
    """search_neighbors' query rows (it keeps the ok ones)."""
    return frame.select(S.IMAGE_ID, S.EMBEDDING, F.lit(S.STATUS_OK).alias(S.STATUS))


def query_config(config: Config) -> Config:
    """The nested workdir of the query files (its MLflow store stays the archive's)."""
    sub = storage.Workdir.of(config.workdir).query_area.root
    return config.with_overrides(workdir=sub, ingest__input=list(config.query.input),
                                 mlflow__tracking_uri=config.tracking_uri())


def _augment_queries(dba_k: int, alpha: float):
    def run(pdf: pd.DataFrame) -> pd.DataFrame:
        own = pdf[pdf[_ROLE] == 0]
        rest = pdf[pdf[_ROLE] == 1].sort_values([S.SIMILARITY, S.NEIGHBOR_ID], ascending=[False, True])
        vector = np.asarray(own[S.EMBEDDING].iloc[0], np.float32)
        aug = matching.augment_query(vector, rest[S.SIMILARITY].to_numpy(np.float32),
                                     [np.asarray(v, np.float32) for v in rest[S.EMBEDDING]], dba_k, alpha)
        return pd.DataFrame({S.IMAGE_ID: [own[S.IMAGE_ID].iloc[0]], S.EMBEDDING: [aug]})

    return run


def augmented_queries(spark: SparkSession, config: Config, queries: DataFrame) -> DataFrame:
    """Each query's DBA vector over the archive plus itself (raw search: re-ranking off)."""
    d = config.dedup
    raw = config.with_overrides(dedup__dba_k=0, dedup__rotations=[0], dedup__qe_k=0)
    lists = search_neighbors(spark, raw, d.dba_k, queries=_as_queries(queries))
    archive = tables.read_table(spark, storage.Workdir.of(config.workdir).embeddings(config.embed.backbone),
                                "embedding table").select(F.col(S.IMAGE_ID).alias(S.NEIGHBOR_ID), S.EMBEDDING)
    rows = lists.join(archive, S.NEIGHBOR_ID).select(
        F.col(S.QUERY_ID).alias(S.IMAGE_ID), F.lit(1).alias(_ROLE), S.NEIGHBOR_ID, S.SIMILARITY, S.EMBEDDING)
    own = queries.select(S.IMAGE_ID, F.lit(0).alias(_ROLE), F.col(S.IMAGE_ID).alias(S.NEIGHBOR_ID),
                         F.lit(1.0).cast("float").alias(S.SIMILARITY), S.EMBEDDING)
    return own.unionByName(rows).groupBy(S.IMAGE_ID).applyInPandas(
        _augment_queries(d.dba_k, float(d.dba_alpha)), schema=f"{S.IMAGE_ID} string, {S.EMBEDDING} array<float>")


def query_spark(spark: SparkSession, config: Config) -> DataFrame:
    """Ingest, embed and search the query files; returns the matches rows (every input file at least once)."""
    config = registry.encoder_for(config).search_config()
    d = config.dedup
    sub = query_config(config)
    ing.ingest(spark, sub)
    em.embed(spark, sub)
    qwd = storage.Workdir.of(sub.workdir)
    images = tables.read_table(spark, qwd.images, "query image table")
    emb = tables.read_table(spark, qwd.embeddings(config.embed.backbone), "query embedding table")
    ok = emb.where(F.col(S.STATUS) == S.STATUS_OK).select(S.IMAGE_ID, S.EMBEDDING).localCheckpoint()
    variants = [augmented_queries(spark, config, ok) if d.dba_k > 1 else ok]
    good = images.where(F.col(S.STATUS) == S.STATUS_OK)
    for r in sorted({int(r) for r in d.rotations if int(r) % 360}):
        rotated = em.build_embedding_table(spark, config.with_overrides(embed__rotation=r), good)
        variants.append(rotated.where(F.col(S.STATUS) == S.STATUS_OK).select(S.IMAGE_ID, S.EMBEDDING)
                        .join(ok.select(S.IMAGE_ID), S.IMAGE_ID, "left_semi"))
    plain = config.with_overrides(dedup__rotations=[0])
    found = None
    for v in variants:
        part = search_neighbors(spark, plain, d.k, queries=_as_queries(v).localCheckpoint())
        found = part if found is None else found.unionByName(part)
    best = found.groupBy(S.QUERY_ID, S.NEIGHBOR_ID).agg(F.max(S.SIMILARITY).alias(S.SIMILARITY))
    if dd.uses_calibration(config):
        best = calibrated(spark, config, best)
        order = Window.partitionBy(S.QUERY_ID).orderBy(F.desc(dd.SCORE), F.col(S.NEIGHBOR_ID))
    else:
        best = best.where(F.col(S.SIMILARITY) >= d.threshold).withColumn(dd.SCORE, F.lit(None).cast("float"))
        order = Window.partitionBy(S.QUERY_ID).orderBy(F.desc(S.SIMILARITY), F.col(S.NEIGHBOR_ID))
    best = best.withColumn(S.RANK, F.row_number().over(order) - 1).where(F.col(S.RANK) < d.k)
    archive = tables.read_table(spark, storage.Workdir.of(config.workdir).images, "image table") \
        if tables.is_committed(spark, storage.Workdir.of(config.workdir).images) else None
    matched = best.select(F.col(S.QUERY_ID).alias("qid"), F.col(S.NEIGHBOR_ID).alias(S.IMAGE_ID), S.SIMILARITY,
                          dd.SCORE, S.RANK)
    if archive is not None:
        matched = matched.join(archive.select(S.IMAGE_ID, S.PATH), S.IMAGE_ID, "left")
    else:
        matched = matched.withColumn(S.PATH, F.lit(None).cast("string"))
    # A file whose embedding failed is an error row here, as in the light path.
    failed = emb.where(F.col(S.STATUS) != S.STATUS_OK).select(F.col(S.IMAGE_ID).alias("qid"),
                                                               F.col(S.ERROR).alias("embed_error"))
    files = (images.select(F.col(S.IMAGE_ID).alias("qid"), F.col(S.PATH).alias("query_path"), S.STATUS, S.ERROR)
             .join(failed, "qid", "left"))
    status = F.when(F.col("embed_error").isNotNull(), F.lit(S.STATUS_ERROR)).otherwise(F.col(S.STATUS))
    error = F.coalesce(F.col("embed_error"), F.col(S.ERROR))
    return (files.join(matched, "qid", "left")
            .select("query_path", status.alias("query_status"), error.alias("query_error"), S.IMAGE_ID, S.PATH,
                    F.col(S.SIMILARITY).cast("float").alias(S.SIMILARITY), F.col(dd.SCORE).cast("float").alias(dd.SCORE),
                    F.col(S.RANK).cast("int").alias(S.RANK)))


def calibrated(spark: SparkSession, config: Config, best: DataFrame) -> DataFrame:
    """Each query's top ``dedup.k`` by similarity with its calibrated score, those at or above the
    threshold (:func:`pipeline.querylight.calibrated_matches` in Spark)."""
    d = config.dedup
    calibration = dd.load_calibration(config)
    uri = storage.Workdir.of(config.workdir).incremental(config.embed.backbone)
    if not tables.is_committed(spark, uri) or storage.read_metadata(uri).get("calibration") != calibration.version:
        raise ValueError(f"dedup.score=calibrated: the last dedup's state at {uri} has no levels for calibration "
                         f"{calibration.version} (run dedup with these settings, or query with dedup.score=cosine)")
    by_sim = Window.partitionBy(S.QUERY_ID).orderBy(F.desc(S.SIMILARITY), F.col(S.NEIGHBOR_ID))
    top = (best.withColumn("_pos", F.row_number().over(by_sim)).where(F.col("_pos") <= d.k)
           .withColumn("_n", F.count(F.lit(1)).over(Window.partitionBy(S.QUERY_ID))).localCheckpoint())
    level_q = (top.where(F.col("_pos") == F.least(F.lit(calibration.rank), F.col("_n")))
               .select(F.col(S.QUERY_ID).alias("_q"), F.col(S.SIMILARITY).cast("double").alias("_lq")))
    level_y = tables.read_table(spark, uri, "incremental state").select(F.col(S.IMAGE_ID).alias("_y"),
                                                                         F.col(dd.LEVEL).alias("_ly"))
    scored = (top.join(level_q, F.col(S.QUERY_ID) == F.col("_q")).join(level_y, F.col(S.NEIGHBOR_ID) == F.col("_y"), "left")
              .withColumn(dd.SCORE, dd.probability(calibration, F.col(S.SIMILARITY), F.col("_lq"), F.col("_ly"))))
    return scored.where(F.col(dd.SCORE) >= d.threshold).select(S.QUERY_ID, S.NEIGHBOR_ID, S.SIMILARITY, dd.SCORE)
