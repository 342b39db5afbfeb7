"""Stage 4: index -> kNN lists -> pairs table -> groups table. Never deletes or moves files.

The search runs in Spark: each task loads the index shards from the workdir (once per
Python worker), searches its partition's vectors against every shard and merges the
per-shard top-k. Only (query, neighbour, similarity) rows leave the executors; no step
gathers the embeddings on the driver.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline import index as ix
from pipeline import schemas as S, store
from pipeline.config import Config

log = logging.getLogger(__name__)

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
    from pipeline import classical

    if classical.is_classical(config.embed.backbone):
        # Rotated queries and re-ranking are defined for CNN descriptors (DBA would average hash
        # bits); classical baselines are searched as published.
        config = config.with_overrides(dedup__rotations=[0], dedup__dba_k=0, dedup__qe_k=0)
    d = config.dedup
    index_cfg = ensure_dba(spark, config) if d.dba_k > 1 else config
    if queries is None:
        queries = store.read_table(spark, store.Workdir.of(index_cfg.workdir).embeddings(config.embed.backbone),
                                   "embedding table")
    queries = queries.where(F.col(S.STATUS) == S.STATUS_OK).select(S.IMAGE_ID, S.EMBEDDING)
    result = _search(spark, index_cfg, k, queries)
    if d.qe_k > 0:
        expanded = _expand_queries(spark, index_cfg, queries, result, d.qe_k, d.qe_alpha)
        result = _search(spark, index_cfg, k, expanded)
    # Rotated queries are merged last, so query expansion never discards a rotated match.
    rotations = [r for r in d.rotations if r != 0]
    images = store.Workdir.of(config.workdir).images
    if rotations and not store.is_committed(spark, images):
        # A table of embeddings computed elsewhere: there are no images to rotate.
        log.warning("dedup.rotations=%s skipped: no image table at %s to re-embed rotated", d.rotations, images)
        rotations = []
    if rotations:
        for r in rotations:
            rotated = store.read_table(spark, ensure_rotated(spark, config, r), "rotated embedding table")
            rotated = rotated.where(F.col(S.STATUS) == S.STATUS_OK).select(S.IMAGE_ID, S.EMBEDDING)
            rotated = rotated.join(queries.select(S.IMAGE_ID), S.IMAGE_ID, "left_semi")
            result = result.unionByName(_search(spark, index_cfg, k, rotated))
        result = _best_per_neighbor(result, k)
    return result


def _search(spark: SparkSession, config: Config, k: int, queries: DataFrame) -> DataFrame:
    """Top-``k`` neighbours of every query row over every index shard, as NEIGHBORS_TABLE rows.

    Each task holds one query partition and ONE shard (``index.query_block`` queries searched
    at a time), so its memory is bounded by the shard size (planned from ``index.max_memory``)
    and the block, never by N. The per-shard top-k lists are merged in Spark.
    """
    workdir = store.Workdir.of(config.workdir)
    method = config.embed.backbone
    info = ix.IndexInfo.load(workdir.index_dir(method))
    queries = queries.select(S.IMAGE_ID, S.EMBEDDING)
    settings = config.index
    wanted = max(spark.sparkContext.defaultParallelism, -(-info.meta["count"] // settings.query_block))
    if queries.rdd.getNumPartitions() < wanted:
        queries = queries.repartition(wanted)

    build_id = info.meta.get("build_id", info.meta["created_at"])
    k = min(k, info.meta["count"])
    shards = [s["shard"] for s in info.meta["shards"]]
    schema = "query_id string, faiss_id long, rank int, similarity float"
    # Shard-major union: tasks of one shard run together, so each worker loads a shard once.
    parts = [queries.mapInPandas(_shard_searcher(info.path, build_id, shard, settings, k), schema=schema)
             for shard in shards]
    raw = parts[0]
    for part in parts[1:]:
        raw = raw.unionByName(part)
    if len(parts) > 1:
        order = Window.partitionBy(S.QUERY_ID).orderBy(F.desc(S.SIMILARITY), F.col(S.FAISS_ID))
        raw = (raw.withColumn(S.RANK, (F.row_number().over(order) - 1).cast("int"))
               .where(F.col(S.RANK) < k))
    idmap = spark.read.parquet(f"{info.path}/idmap").select(S.FAISS_ID, F.col(S.IMAGE_ID).alias(S.NEIGHBOR_ID))
    return raw.join(idmap, S.FAISS_ID).select(S.QUERY_ID, S.NEIGHBOR_ID, S.RANK, S.SIMILARITY)


def _shard_searcher(index_path: str, build_id: str, shard: int, settings, k: int):
    block = settings.query_block

    def search(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        ix.set_task_threads()
        index = ix.load_shard(index_path, build_id, shard, settings)
        pending: list[pd.DataFrame] = []
        size = 0
        for batch in batches:
            pending.append(batch)
            size += len(batch)
            if size >= block:
                yield _search_block(index, pd.concat(pending, ignore_index=True), k)
                pending, size = [], 0
        if size:
            yield _search_block(index, pd.concat(pending, ignore_index=True), k)

    return search


def _search_block(index, part: pd.DataFrame, k: int) -> pd.DataFrame:
    vectors = np.stack(part[S.EMBEDDING].to_numpy()).astype(np.float32)
    sims, ids = ix.search_shard(index, vectors, k)
    sims, ids = ix.merge_topk([sims], [ids], k)  # sorted, -1 padding last
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


def _weighted_sums(spark: SparkSession, rows: DataFrame) -> DataFrame:
    """(image_id, weight, embedding) rows -> (image_id, embedding = l2(sum weight * embedding))."""
    def combine(pdf: pd.DataFrame) -> pd.DataFrame:
        vectors = np.stack(pdf[S.EMBEDDING].to_numpy()).astype(np.float32)
        total = (pdf["weight"].to_numpy(np.float32)[:, None] * vectors).sum(axis=0)
        norm = float(np.sqrt(max(float(total @ total), 1e-12)))
        return pd.DataFrame({S.IMAGE_ID: [pdf[S.IMAGE_ID].iloc[0]], S.EMBEDDING: [(total / norm).astype(np.float32)]})

    return rows.groupBy(S.IMAGE_ID).applyInPandas(combine, schema=f"{S.IMAGE_ID} string, {S.EMBEDDING} array<float>")


def _expand_queries(spark: SparkSession, config: Config, queries: DataFrame, neighbors: DataFrame,
                    qe_k: int, alpha: float) -> DataFrame:
    """alpha-QE: q' = l2(q + sum over the qe_k best other neighbours of max(sim, 0)^alpha * d)."""
    database = store.read_table(spark, store.Workdir.of(config.workdir).embeddings(config.embed.backbone),
                                "embedding table").select(F.col(S.IMAGE_ID).alias(S.NEIGHBOR_ID),
                                                          F.col(S.EMBEDDING).alias("vector"))
    order = Window.partitionBy(S.QUERY_ID).orderBy(F.desc(S.SIMILARITY), F.col(S.NEIGHBOR_ID))
    top = (neighbors.where(F.col(S.QUERY_ID) != F.col(S.NEIGHBOR_ID))
           .withColumn("r", F.row_number().over(order)).where(F.col("r") <= qe_k))
    parts = top.join(database, S.NEIGHBOR_ID).select(
        F.col(S.QUERY_ID).alias(S.IMAGE_ID),
        F.pow(F.greatest(F.col(S.SIMILARITY), F.lit(0.0)), F.lit(float(alpha))).cast("float").alias("weight"),
        F.col("vector").alias(S.EMBEDDING))
    own = queries.select(S.IMAGE_ID, F.lit(1.0).cast("float").alias("weight"), S.EMBEDDING)
    return _weighted_sums(spark, own.unionByName(parts))


def derived_config(config: Config, name: str, **overrides) -> Config:
    """A config whose workdir is ``<workdir>/derived/<name>`` (derived tables and their index)."""
    sub = store.Workdir.of(config.workdir).join("derived", name)
    return config.with_overrides(workdir=sub, mlflow__tracking_uri=config.tracking_uri(), **overrides)


def _images_digest(images: DataFrame) -> list:
    ok = images.where(F.col(S.STATUS) == S.STATUS_OK)
    row = ok.agg(F.count(F.lit(1)).alias("n"),
                 F.sum(F.crc32(F.concat_ws("/", S.IMAGE_ID, S.CONTENT_SHA256))).alias("h")).first()
    return [int(row["n"]), int(row["h"] or 0)]


def ensure_rotated(spark: SparkSession, config: Config, rotation: int) -> str:
    """The embedding table of every image rotated by ``rotation`` degrees (built when stale)."""
    from pipeline import embed as em

    sub = derived_config(config, f"rot{rotation}", embed__rotation=rotation)
    target = store.Workdir.of(sub.workdir).embeddings(config.embed.backbone)
    images = store.read_table(spark, store.Workdir.of(config.workdir).images, "image table")
    meta = {"model": em.model_fingerprint(sub), "images": _images_digest(images)}
    meta = json.loads(json.dumps(meta))
    if store.is_committed(spark, target) and store.read_metadata(target) == meta:
        return target
    started = time.perf_counter()
    table = em.build_embedding_table(spark, sub, images.where(F.col(S.STATUS) == S.STATUS_OK))
    store.write_table(table, target, metadata=meta)
    log.info("embedded rotated (%d degrees) query variants in %.1fs", rotation, time.perf_counter() - started)
    _log_metric(f"rotation_{rotation}_embed_seconds", time.perf_counter() - started)
    return target


def ensure_dba(spark: SparkSession, config: Config) -> Config:
    """Database-side augmentation in Spark: self-search, weighted sums, a new table and index."""
    d = config.dedup
    method = config.embed.backbone
    workdir = store.Workdir.of(config.workdir)
    base = ix.IndexInfo.load(workdir.index_dir(method))
    sub = derived_config(config, "dba")
    marker = store.Workdir.of(sub.workdir).join("dba.json")
    meta = {"base_index": base.meta["created_at"], "base_embeddings": base.meta.get("embeddings"),
            "count": base.meta["count"], "k": d.dba_k, "alpha": d.dba_alpha, "index": dataclasses.asdict(config.index)}
    if store.file_exists(marker) and store.read_json(marker) == meta:
        return sub
    started = time.perf_counter()
    embeddings = store.read_table(spark, workdir.embeddings(method), "embedding table").where(
        F.col(S.STATUS) == S.STATUS_OK)
    neighbors = _search(spark, config, d.dba_k, embeddings.select(S.IMAGE_ID, S.EMBEDDING))
    vectors = embeddings.select(F.col(S.IMAGE_ID).alias(S.NEIGHBOR_ID), F.col(S.EMBEDDING).alias("vector"))
    parts = neighbors.join(vectors, S.NEIGHBOR_ID).select(
        F.col(S.QUERY_ID).alias(S.IMAGE_ID),
        F.pow(F.greatest(F.col(S.SIMILARITY), F.lit(0.0)), F.lit(float(d.dba_alpha))).cast("float").alias("weight"),
        F.col("vector").alias(S.EMBEDDING))
    augmented = _weighted_sums(spark, parts).withColumnRenamed(S.EMBEDDING, "augmented")
    table = (embeddings.join(augmented, S.IMAGE_ID)
             .withColumn(S.EMBEDDING, F.col("augmented")).select(*S.EMBEDDING_TABLE.fieldNames()))
    store.write_table(table, store.Workdir.of(sub.workdir).embeddings(method), metadata=meta)
    ix.build_index(spark, sub)
    store.write_json(marker, meta)
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
