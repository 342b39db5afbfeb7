"""Stage 4a: kNN search of query embeddings against the sharded index.

The search runs in Spark: each task loads the index shards from the workdir (once per
Python worker), searches its partition's vectors against every shard and merges the
per-shard top-k. Only (query, neighbour, similarity) rows leave the executors; no step
gathers the embeddings on the driver.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.config import Config
from pipeline.core import faiss_index, storage
from pipeline.encoders import registry
from pipeline.stages import index as ix
from pipeline.stages import rerank, tables

log = logging.getLogger(__name__)

SEARCH_CHUNK = 1024


def search_neighbors(spark: SparkSession, config: Config, k: int, queries: DataFrame | None = None) -> DataFrame:
    """Top-``k`` neighbours (self included) of every query embedding, as NEIGHBORS_TABLE rows.

    ``queries`` defaults to the indexed embedding table itself (all-pairs search). The
    re-ranking options of ``dedup.*`` apply here, so ``dedup`` and ``evaluate`` agree:

    * ``dba_k > 1``: search against (and, by default, with) database vectors replaced by
      the alpha-weighted sum of their ``dba_k`` nearest neighbours (a derived embedding
      table and index under ``<workdir>/derived/dba``, rebuilt when its inputs change);
    * ``rotations``: also search with the query images rotated (embedded once into
      ``<workdir>/derived/rot<deg>``), keeping each neighbour's best similarity;
    * ``qe_k > 0``: alpha-query expansion, a second search with expanded queries.
    """
    # Encoders whose vectors re-ranking does not apply to (hash bits) switch it off here.
    config = registry.encoder_for(config).search_config()
    d = config.dedup
    index_cfg = rerank.ensure_dba(spark, config, _search) if d.dba_k > 1 else config
    if queries is None:
        queries = tables.read_table(spark, storage.Workdir.of(index_cfg.workdir).embeddings(config.embed.backbone),
                                   "embedding table")
    queries = queries.where(F.col(S.STATUS) == S.STATUS_OK).select(S.IMAGE_ID, S.EMBEDDING)
    result = _search(spark, index_cfg, k, queries)
    if d.qe_k > 0:
        expanded = rerank.expand_queries(spark, index_cfg, queries, result, d.qe_k, d.qe_alpha)
        result = _search(spark, index_cfg, k, expanded)
    # Rotated queries are merged last, so query expansion never discards a rotated match.
    rotations = [r for r in d.rotations if r != 0]
    if rotations:
        for r in rotations:
            rotated = tables.read_table(spark, rerank.ensure_rotated(spark, config, r), "rotated embedding table")
            rotated = rotated.where(F.col(S.STATUS) == S.STATUS_OK).select(S.IMAGE_ID, S.EMBEDDING)
            rotated = rotated.join(queries.select(S.IMAGE_ID), S.IMAGE_ID, "left_semi")
            result = result.unionByName(_search(spark, index_cfg, k, rotated))
        result = _best_per_neighbor(result, k)
    return result


def _search(spark: SparkSession, config: Config, k: int, queries: DataFrame) -> DataFrame:
    workdir = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    info = ix.IndexInfo.load(workdir.index_dir(method))
    queries = queries.select(S.IMAGE_ID, S.EMBEDDING)
    n = max(queries.rdd.getNumPartitions(), spark.sparkContext.defaultParallelism)
    queries = queries.repartition(n)

    shard_paths = info.shard_paths()
    build_id = info.meta.get("build_id", info.meta["created_at"])
    settings = config.index
    k = min(k, info.meta["count"])

    def search(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        shards = faiss_index.load_shards(info.path, build_id, shard_paths, settings)
        for batch in batches:
            for start in range(0, len(batch), SEARCH_CHUNK):
                part = batch.iloc[start:start + SEARCH_CHUNK]
                vectors = np.stack(part[S.EMBEDDING].to_numpy()).astype(np.float32)
                sims, ids = faiss_index.search_shards(shards, vectors, k)
                kk = ids.shape[1]
                valid = ids.reshape(-1) >= 0
                yield pd.DataFrame({
                    S.QUERY_ID: np.repeat(part[S.IMAGE_ID].to_numpy(), kk)[valid],
                    S.FAISS_ID: ids.reshape(-1)[valid],
                    S.RANK: np.tile(np.arange(kk, dtype=np.int32), len(part))[valid],
                    S.SIMILARITY: np.clip(sims.reshape(-1), -1.0, 1.0).astype(np.float32)[valid],
                })

    raw = queries.mapInPandas(search, schema="query_id string, faiss_id long, rank int, similarity float")
    idmap = spark.read.parquet(f"{info.path}/idmap").select(S.FAISS_ID, F.col(S.IMAGE_ID).alias(S.NEIGHBOR_ID))
    return raw.join(idmap, S.FAISS_ID).select(S.QUERY_ID, S.NEIGHBOR_ID, S.RANK, S.SIMILARITY)


def _best_per_neighbor(neighbors: DataFrame, k: int) -> DataFrame:
    """Merge the lists of several query variants: best similarity per neighbour, top k, re-ranked."""
    best = neighbors.groupBy(S.QUERY_ID, S.NEIGHBOR_ID).agg(F.max(S.SIMILARITY).alias(S.SIMILARITY))
    order = Window.partitionBy(S.QUERY_ID).orderBy(F.desc(S.SIMILARITY), F.col(S.NEIGHBOR_ID))
    return (best.withColumn(S.RANK, (F.row_number().over(order) - 1).cast("int"))
            .where(F.col(S.RANK) < k).select(S.QUERY_ID, S.NEIGHBOR_ID, S.RANK, S.SIMILARITY))
