"""Stage 4: index -> kNN lists -> pairs table -> groups table. Never deletes or moves files.

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

from pipeline import index as ix
from pipeline import schemas as S, store
from pipeline.config import Config

log = logging.getLogger(__name__)

SEARCH_CHUNK = 1024


def search_neighbors(spark: SparkSession, config: Config, k: int, queries: DataFrame | None = None) -> DataFrame:
    """Top-``k`` neighbours (self included) of every query embedding, as NEIGHBORS_TABLE rows.

    ``queries`` defaults to the indexed embedding table itself (all-pairs search).
    """
    workdir = store.Workdir.of(config.workdir)
    method = config.embed.backbone
    info = ix.IndexInfo.load(workdir.index_dir(method))
    if queries is None:
        queries = store.read_table(spark, workdir.embeddings(method), "embedding table")
    queries = queries.where(F.col(S.STATUS) == S.STATUS_OK).select(S.IMAGE_ID, S.EMBEDDING)
    n = max(queries.rdd.getNumPartitions(), spark.sparkContext.defaultParallelism)
    queries = queries.repartition(n)

    shard_paths = info.shard_paths()
    created_at = info.meta["created_at"]
    settings = config.index
    k = min(k, info.meta["count"])

    def search(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        shards = ix.load_shards(info.path, created_at, shard_paths, settings)
        for batch in batches:
            for start in range(0, len(batch), SEARCH_CHUNK):
                part = batch.iloc[start:start + SEARCH_CHUNK]
                vectors = np.stack(part[S.EMBEDDING].to_numpy()).astype(np.float32)
                sims, ids = ix.search_shards(shards, vectors, k)
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


def pairs_from_neighbors(neighbors: DataFrame, threshold: float) -> DataFrame:
    """Unordered pairs above ``threshold``: a < b, no self pairs, each pair once (best similarity)."""
    a = F.least(F.col(S.QUERY_ID), F.col(S.NEIGHBOR_ID))
    b = F.greatest(F.col(S.QUERY_ID), F.col(S.NEIGHBOR_ID))
    return (
        neighbors.where((F.col(S.SIMILARITY) >= threshold) & (F.col(S.QUERY_ID) != F.col(S.NEIGHBOR_ID)))
        .select(a.alias(S.IMAGE_ID_A), b.alias(S.IMAGE_ID_B), F.col(S.SIMILARITY))
        .groupBy(S.IMAGE_ID_A, S.IMAGE_ID_B)
        .agg(F.max(S.SIMILARITY).alias(S.SIMILARITY))
    )


def connected_components(pairs: DataFrame, max_iterations: int = 100) -> DataFrame:
    """(image_id, group_id) for every image in ``pairs``; group_id is the smallest id in its component.

    Min-label propagation with pointer jumping, in Spark: each round every node takes the
    smallest label among itself and its neighbours, then the label of its label. Rounds
    grow logarithmically with the component diameter; lineage is cut every round.
    """
    edges = pairs.select(F.col(S.IMAGE_ID_A).alias("src"), F.col(S.IMAGE_ID_B).alias("dst"))
    edges = edges.union(edges.select(F.col("dst").alias("src"), F.col("src").alias("dst"))).localCheckpoint()
    labels = edges.select(F.col("src").alias("node")).distinct().withColumn("label", F.col("node")).localCheckpoint()
    for round_no in range(max_iterations):
        from_neighbors = edges.join(labels, edges.src == labels.node).select(F.col("dst").alias("node"), "label")
        propagated = labels.union(from_neighbors).groupBy("node").agg(F.min("label").alias("label"))
        # Renamed copies, not aliases: Spark mis-resolves a self-join of an aggregate.
        label_of_label = propagated.select(F.col("node").alias("hop"), F.col("label").alias("hop_label"))
        jumped = (propagated.join(label_of_label, propagated.label == label_of_label.hop)
                  .select("node", F.least("label", "hop_label").alias("label"))
                  .localCheckpoint())
        previous = labels.select(F.col("node").alias("prev_node"), F.col("label").alias("prev_label"))
        changed = (jumped.join(previous, jumped.node == previous.prev_node)
                   .where(F.col("label") != F.col("prev_label")).limit(1).count())
        labels = jumped
        if changed == 0:
            log.info("connected components converged after %d rounds", round_no + 1)
            return labels.select(F.col("node").alias(S.IMAGE_ID), F.col("label").alias(S.GROUP_ID))
    raise RuntimeError(f"connected components did not converge in {max_iterations} rounds")


def groups_with_keep(components: DataFrame, images: DataFrame) -> DataFrame:
    """Attach the keep decision: one image per group, by the policy in :mod:`pipeline.grouping`."""
    info = images.select(S.IMAGE_ID, S.PATH, S.WIDTH, S.HEIGHT, S.SIZE_BYTES)
    pixels = F.coalesce(F.col(S.WIDTH), F.lit(0)).cast("long") * F.coalesce(F.col(S.HEIGHT), F.lit(0)).cast("long")
    by_group = Window.partitionBy(S.GROUP_ID)
    ranked = Window.partitionBy(S.GROUP_ID).orderBy(pixels.desc(), F.col(S.SIZE_BYTES).desc(), F.col(S.PATH).asc())
    return (
        components.join(info, S.IMAGE_ID)
        .withColumn(S.GROUP_SIZE, F.count(F.lit(1)).over(by_group))
        .withColumn(S.KEEP, F.row_number().over(ranked) == 1)
        .select(S.GROUP_ID, S.IMAGE_ID, S.GROUP_SIZE, S.KEEP)
    )


def dedup(spark: SparkSession, config: Config) -> dict:
    """Write the pairs and groups tables for ``config.embed.backbone``; returns counts."""
    workdir = store.Workdir.of(config.workdir)
    method = config.embed.backbone
    neighbors = search_neighbors(spark, config, config.dedup.k + 1)  # +1: the query finds itself
    from pipeline import classical_stage

    metric = ix.IndexInfo.load(workdir.index_dir(method)).meta.get("metric")
    threshold = classical_stage.effective_threshold(config, metric)  # dedup.hamming_bits for hashes
    pairs = pairs_from_neighbors(neighbors, threshold)
    store.write_table(pairs, workdir.pairs(method))
    pairs = store.read_table(spark, workdir.pairs(method), "pairs table")
    images = store.read_table(spark, workdir.images, "image table")
    groups = groups_with_keep(connected_components(pairs), images)
    store.write_table(groups, workdir.groups(method))
    groups = store.read_table(spark, workdir.groups(method), "groups table")
    counts = {
        "pairs": pairs.count(),
        "groups": groups.select(S.GROUP_ID).distinct().count(),
        "images_in_groups": groups.count(),
        "images_to_remove": groups.where(~F.col(S.KEEP)).count(),
    }
    log.info("dedup %s at threshold %.3f: %s", method, threshold, counts)
    return counts
