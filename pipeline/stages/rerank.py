"""Re-ranking in Spark: database-side augmentation (DBA), alpha-query expansion, rotated queries.

Derived tables and their index live under ``<workdir>/derived/<name>`` and are rebuilt when
their inputs change.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.config import Config
from pipeline.core import rerank as core_rerank
from pipeline.core import storage
from pipeline.stages import embed as em
from pipeline.stages import index as ix
from pipeline.stages import tables

log = logging.getLogger(__name__)


_VECTORS = f"{S.IMAGE_ID} string, {S.EMBEDDING} array<float>"
# Role of a row in a query-expansion group: the query itself, or one of its neighbours.
_ROLE = "role"


def _stack(column: pd.Series) -> np.ndarray:
    return np.stack(column.to_numpy()).astype(np.float32)


def _expand_group(alpha: float):
    def expand(pdf: pd.DataFrame) -> pd.DataFrame:
        is_query = pdf[_ROLE].to_numpy() == 0
        neighbors = pdf[~is_query]
        dim = len(pdf[S.EMBEDDING].iloc[0])
        vectors = _stack(neighbors[S.EMBEDDING]) if len(neighbors) else np.zeros((0, dim), np.float32)
        q = _stack(pdf[is_query][S.EMBEDDING])[:1]
        out = core_rerank.expand_with_neighbors(q, vectors[None], alpha)
        return pd.DataFrame({S.IMAGE_ID: [pdf[S.IMAGE_ID].iloc[0]], S.EMBEDDING: [out[0]]})

    return expand


def _augment_group(alpha: float):
    def augment(pdf: pd.DataFrame) -> pd.DataFrame:
        sims = pdf[S.SIMILARITY].to_numpy(np.float32)
        out = core_rerank.augment_with_neighbors(_stack(pdf[S.EMBEDDING])[None], sims[None], alpha)
        return pd.DataFrame({S.IMAGE_ID: [pdf[S.IMAGE_ID].iloc[0]], S.EMBEDDING: [out[0]]})

    return augment


def expand_queries(spark: SparkSession, config: Config, queries: DataFrame, neighbors: DataFrame,
                   qe_k: int, alpha: float) -> DataFrame:
    """alpha-QE (:func:`pipeline.core.rerank.expand_with_neighbors`) per query, over its qe_k best other neighbours."""
    database = tables.read_table(spark, storage.Workdir.of(config.workdir).embeddings(config.embed.backbone),
                                 "embedding table").select(F.col(S.IMAGE_ID).alias(S.NEIGHBOR_ID),
                                                           F.col(S.EMBEDDING).alias("vector"))
    order = Window.partitionBy(S.QUERY_ID).orderBy(F.desc(S.SIMILARITY), F.col(S.NEIGHBOR_ID))
    top = (neighbors.where(F.col(S.QUERY_ID) != F.col(S.NEIGHBOR_ID))
           .withColumn("r", F.row_number().over(order)).where(F.col("r") <= qe_k))
    parts = top.join(database, S.NEIGHBOR_ID).select(
        F.col(S.QUERY_ID).alias(S.IMAGE_ID), F.lit(1).alias(_ROLE), F.col("vector").alias(S.EMBEDDING))
    own = queries.select(S.IMAGE_ID, F.lit(0).alias(_ROLE), S.EMBEDDING)
    return own.unionByName(parts).groupBy(S.IMAGE_ID).applyInPandas(_expand_group(float(alpha)), schema=_VECTORS)


def augment_database(neighbors: DataFrame, embeddings: DataFrame, alpha: float) -> DataFrame:
    """DBA (:func:`pipeline.core.rerank.augment_with_neighbors`) per image, over its self-search neighbours."""
    vectors = embeddings.select(F.col(S.IMAGE_ID).alias(S.NEIGHBOR_ID), F.col(S.EMBEDDING).alias("vector"))
    rows = neighbors.join(vectors, S.NEIGHBOR_ID).select(
        F.col(S.QUERY_ID).alias(S.IMAGE_ID), S.SIMILARITY, F.col("vector").alias(S.EMBEDDING))
    return rows.groupBy(S.IMAGE_ID).applyInPandas(_augment_group(float(alpha)), schema=_VECTORS)


# Shared with the embed stage, which writes the rotated tables itself when it embeds everything
# (one decode per image for every view; see pipeline.stages.embed.rotated_meta).
derived_config = em.derived_config


def ensure_rotated(spark: SparkSession, config: Config, rotation: int) -> str:
    """The embedding table of every image rotated by ``rotation`` degrees (built when stale)."""
    sub, target = em.rotated_table(config, rotation)
    images = tables.read_table(spark, storage.Workdir.of(config.workdir).images, "image table")
    meta = em.rotated_meta(config, rotation, images)
    if tables.is_committed(spark, target) and storage.read_metadata(target) == meta:
        return target
    started = time.perf_counter()
    table = em.build_embedding_table(spark, sub, images.where(F.col(S.STATUS) == S.STATUS_OK))
    tables.write_table(table, target, metadata=meta)
    log.info("embedded rotated (%d degrees) query variants in %.1fs", rotation, time.perf_counter() - started)
    _log_metric(f"rotation_{rotation}_embed_seconds", time.perf_counter() - started)
    return target


def ensure_dba(spark: SparkSession, config: Config, search: Callable[..., DataFrame]) -> Config:
    """Database-side augmentation in Spark: self-search, weighted sums, a new table and index.

    ``search(spark, config, k, queries)`` is the raw kNN search of :mod:`pipeline.stages.search`
    (passed in, so that this module does not import the one that calls it).
    """
    d = config.dedup
    method = config.embed.backbone
    workdir = storage.Workdir.of(config.workdir)
    base = ix.IndexInfo.load(workdir.index_dir(method))
    sub = derived_config(config, "dba")
    marker = storage.Workdir.of(sub.workdir).dba_marker
    meta = {"base_index": base.meta["created_at"], "base_embeddings": base.meta.get("embeddings"),
            "count": base.meta["count"], "k": d.dba_k, "alpha": d.dba_alpha, "index": dataclasses.asdict(config.index)}
    if storage.file_exists(marker) and storage.read_json(marker) == meta:
        return sub
    started = time.perf_counter()
    embeddings = tables.read_table(spark, workdir.embeddings(method), "embedding table").where(
        F.col(S.STATUS) == S.STATUS_OK)
    neighbors = search(spark, config, d.dba_k, embeddings.select(S.IMAGE_ID, S.EMBEDDING))
    augmented = augment_database(neighbors, embeddings, d.dba_alpha).withColumnRenamed(S.EMBEDDING, "augmented")
    table = (embeddings.join(augmented, S.IMAGE_ID)
             .withColumn(S.EMBEDDING, F.col("augmented")).select(*S.EMBEDDING_TABLE.fieldNames()))
    tables.write_table(table, storage.Workdir.of(sub.workdir).embeddings(method), metadata=meta)
    ix.build_index(spark, sub, trained_from=base)  # same lists: DBA moves vectors only slightly
    storage.write_json(marker, meta)
    log.info("database-side augmentation (k=%d, alpha=%.1f) in %.1fs", d.dba_k, d.dba_alpha,
             time.perf_counter() - started)
    _log_metric("dba_seconds", time.perf_counter() - started)
    return sub


def _log_metric(name: str, value: float) -> None:
    try:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_metric(name, float(value))
    except Exception:  # metrics are best effort here
        log.debug("could not log %s", name, exc_info=True)
