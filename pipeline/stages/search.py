"""Stage 4a: kNN search of query embeddings against the sharded index.

The search runs in Spark: each task holds one block of queries and ONE index shard (loaded
once per Python worker). The all-pairs search of the indexed table reads its queries from
the index's vector stores and merges per-shard lists in its tasks (:mod:`pipeline.stages.allpairs`); given
queries go through Spark rows and their per-shard lists are merged in Spark. Only (query,
neighbour, similarity) rows leave the executors; no step gathers the embeddings on the driver.
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
from pipeline.core import vector_store as vs
from pipeline.encoders import registry
from pipeline.stages import allpairs, rerank, tables
from pipeline.stages import index as ix

log = logging.getLogger(__name__)

# Candidates taken from the raw index per query when DBA re-ranks them: at least this many,
# so a short list (UKBench's top 4) is re-ranked from a pool as a full DBA search would see it.
MIN_CANDIDATES = 16


def search_neighbors(spark: SparkSession, config: Config, k: int, queries: DataFrame | None = None) -> DataFrame:
    """Top-``k`` neighbours (self included) of every query embedding, as NEIGHBORS_TABLE rows.

    ``queries`` defaults to the indexed vectors themselves (all-pairs search, read from the
    index's vector stores unit by unit: :mod:`pipeline.stages.allpairs`). The re-ranking
    options of ``dedup.*`` apply here, so ``dedup`` and ``evaluate`` agree:

    * ``dba_k > 1``: database-side augmentation. ONE raw search gives every query its
      candidates; each database vector is replaced by the alpha-weighted sum of its ``dba_k``
      best candidates (vectors under ``<workdir>/derived/dba``, rebuilt when the index
      changes); the candidates are then re-scored exactly with those vectors, so the
      similarity is the true cosine of the augmented vectors (all-pairs: query augmented
      too; given queries: as they are, against the augmented database);
    * ``rotations``: also search with the query images rotated (embedded once into
      ``<workdir>/derived/rot<deg>``), keeping each neighbour's best similarity;
    * ``qe_k > 0``: alpha-query expansion, a second search with expanded queries.
    """
    # Encoders whose vectors re-ranking does not apply to (hash bits) switch it off here.
    config = registry.encoder_for(config).search_config()
    d = config.dedup
    workdir = storage.Workdir.of(config.workdir)
    info = ix.IndexInfo.load(workdir.index_dir(config.embed.backbone))
    info.require_layout()
    dba = d.dba_k > 1
    k_search = max(k, MIN_CANDIDATES) if dba else k
    folder = allpairs.new_folder(config.workdir)

    def self_search(kk: int):
        return allpairs.self_search(spark, info, config.index, kk, f"{folder}/k{kk}")

    # Candidates are re-scored with stored vectors: DBA's, else the raw ones (an exact cosine
    # whatever the index's compression: calibrated scores and the incremental dedup need it).
    # Hamming similarities of binary hashes are exact already.
    exact = info.meta.get("metric", "inner_product") == "inner_product"
    vectors_of = allpairs.raw_files(info) if exact else None
    if queries is None:
        candidates = self_search(k_search)
        if dba:
            vectors_of = rerank.ensure_dba(spark, config, info, self_search, candidates).files_of()
        result = allpairs.finish(spark, info, candidates, k, vectors_of)
        if d.qe_k > 0 or d.rotations:
            queries = tables.read_table(spark, workdir.embeddings(config.embed.backbone), "embedding table")
    else:
        if dba:
            vectors_of = rerank.ensure_dba(spark, config, info, self_search).files_of()
        result = None
    if queries is not None:
        queries = queries.where(F.col(S.STATUS) == S.STATUS_OK).select(S.IMAGE_ID, S.EMBEDDING) \
            if S.STATUS in queries.columns else queries.select(S.IMAGE_ID, S.EMBEDDING)
    if result is None:
        result = _search(spark, config, info, k, queries, vectors_of, k_search)
    if d.qe_k > 0:
        expanded = rerank.expand_queries(spark, config, queries, result, d.qe_k, d.qe_alpha)
        result = _search(spark, config, info, k, expanded, vectors_of, k_search)
    # Rotated queries are merged last, so query expansion never discards a rotated match.
    rotations = [r for r in d.rotations if r != 0]
    if rotations and not tables.is_committed(spark, workdir.images):
        # A table of embeddings computed elsewhere: there are no images to rotate.
        log.warning("dedup.rotations=%s skipped: no image table at %s to re-embed rotated", d.rotations, workdir.images)
        rotations = []
    if rotations:
        # Every rotation's queries in one search (one pass over the shards). Each view is its own
        # query (its own top k across shards) until the merge keeps each neighbour's best similarity.
        views = None
        for r in rotations:
            rotated = tables.read_table(spark, rerank.ensure_rotated(spark, config, r), "rotated embedding table")
            rotated = (rotated.where(F.col(S.STATUS) == S.STATUS_OK).join(queries.select(S.IMAGE_ID), S.IMAGE_ID, "left_semi")
                       .select(F.concat(S.IMAGE_ID, F.lit(f"{_VIEW_MARK}{r}")).alias(S.IMAGE_ID), S.EMBEDDING))
            views = rotated if views is None else views.unionByName(rotated)
        found = _search(spark, config, info, k, views, vectors_of, k_search)
        found = found.withColumn(S.QUERY_ID, F.regexp_replace(S.QUERY_ID, f"{_VIEW_MARK}[0-9]+$", ""))
        result = _best_per_neighbor(result.unionByName(found), k)
    return result


_VIEW_MARK = "#rot"


def _search(spark: SparkSession, config: Config, info: ix.IndexInfo, k: int, queries: DataFrame,
            vectors_of=None, k_search: int | None = None) -> DataFrame:
    """Top-``k`` neighbours of every query row over every index shard, as NEIGHBORS_TABLE rows.

    Each task holds one query partition and ONE shard (``index.query_block`` queries searched
    at a time), so its memory is bounded by the shard size (planned from ``index.max_memory``)
    and the block, never by N. With ``vectors_of`` (the DBA store, or the raw store), the
    shard's ``k_search`` candidates are re-scored with those vectors before its top k is kept. Per-shard lists are merged
    in Spark.
    """
    queries = queries.select(S.IMAGE_ID, S.EMBEDDING)
    settings = config.index
    wanted = max(spark.sparkContext.defaultParallelism, -(-info.meta["count"] // settings.query_block))
    if queries.rdd.getNumPartitions() < wanted:
        queries = queries.repartition(wanted)

    build_id, stores = info.build_id, info.store_ids()
    k = min(k, info.meta["count"])
    k_search = min(max(k, k_search or k), info.meta["count"])
    shards = [s["shard"] for s in info.meta["shards"]]
    rescoring = (vectors_of, int(info.meta["dimension"])) if vectors_of is not None else None
    schema = "query_id string, faiss_id long, rank int, similarity float"
    # Shard-major union: tasks of one shard run together, so each worker loads a shard once.
    parts = [queries.mapInPandas(_shard_searcher(info.path, build_id, stores[shard], shard, settings, k, k_search,
                                                 rescoring),
                                 schema=schema)
             for shard in shards]
    raw = parts[0]
    for part in parts[1:]:
        raw = raw.unionByName(part)
    if len(parts) > 1:
        order = Window.partitionBy(S.QUERY_ID).orderBy(F.desc(S.SIMILARITY), F.col(S.FAISS_ID))
        raw = (raw.withColumn(S.RANK, (F.row_number().over(order) - 1).cast("int"))
               .where(F.col(S.RANK) < k))
    idmap = tables.lookup(tables.read_id_map(spark, info.path).select(S.FAISS_ID, F.col(S.IMAGE_ID).alias(S.NEIGHBOR_ID)),
                          int(info.meta["count"]))
    return raw.join(idmap, S.FAISS_ID).select(S.QUERY_ID, S.NEIGHBOR_ID, S.RANK, S.SIMILARITY)


def _shard_searcher(index_path: str, build_id: str, store_id: str, shard: int, settings, k: int, k_search: int,
                    rescoring):
    block = settings.query_block

    def search(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        ix.set_task_threads()
        index = faiss_index.load_shard(ix.shard_file(index_path, shard), build_id, settings)
        pending: list[pd.DataFrame] = []
        size = 0
        for batch in batches:
            pending.append(batch)
            size += len(batch)
            if size >= block:
                yield _search_block(index, pd.concat(pending, ignore_index=True), k, k_search, index_path, shard,
                                    store_id, rescoring)
                pending, size = [], 0
        if size:
            yield _search_block(index, pd.concat(pending, ignore_index=True), k, k_search, index_path, shard,
                                store_id, rescoring)

    return search


def _search_block(index, part: pd.DataFrame, k: int, k_search: int, index_path: str, shard: int,
                  store_id: str, rescoring) -> pd.DataFrame:
    vectors = np.stack(part[S.EMBEDDING].to_numpy()).astype(np.float32)
    sims, ids = faiss_index.search_shard(index, vectors, k_search if rescoring else k)
    sims, ids = faiss_index.merge_topk([sims], [ids], k_search if rescoring else k)  # sorted, -1 padding last
    if rescoring is not None:
        files_of, dim = rescoring
        pos = vs.positions(index_path, shard, store_id, ids)
        sims = allpairs.rescore(vectors, files_of, np.full(pos.shape, shard), pos, dim)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        sims, ids = np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)
        ids = np.where(np.isfinite(sims), ids, -1)
    kk = ids.shape[1]
    valid = ids.reshape(-1) >= 0
    return pd.DataFrame({
        S.QUERY_ID: np.repeat(part[S.IMAGE_ID].to_numpy(), kk)[valid],
        S.FAISS_ID: ids.reshape(-1)[valid],
        S.RANK: np.tile(np.arange(kk, dtype=np.int32), len(part))[valid],
        S.SIMILARITY: np.clip(sims.reshape(-1), -1.0, 1.0).astype(np.float32)[valid],
    })


def _best_per_neighbor(neighbors: DataFrame, k: int) -> DataFrame:
    """Merge the lists of several query variants: best similarity per neighbour, top k, re-ranked."""
    best = neighbors.groupBy(S.QUERY_ID, S.NEIGHBOR_ID).agg(F.max(S.SIMILARITY).alias(S.SIMILARITY))
    order = Window.partitionBy(S.QUERY_ID).orderBy(F.desc(S.SIMILARITY), F.col(S.NEIGHBOR_ID))
    return (best.withColumn(S.RANK, (F.row_number().over(order) - 1).cast("int"))
            .where(F.col(S.RANK) < k).select(S.QUERY_ID, S.NEIGHBOR_ID, S.RANK, S.SIMILARITY))
