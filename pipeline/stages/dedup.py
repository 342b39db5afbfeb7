"""Stage 4: kNN lists -> pairs table -> groups table (with the keep decision). Never deletes or moves files."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.config import Config, ConfigError
from pipeline.core import calibration as cal_core
from pipeline.core import pairs as P
from pipeline.core import storage
from pipeline.encoders import registry
from pipeline.stages import index as ix
from pipeline.stages import tables
from pipeline.stages.groups import (  # noqa: F401 (the groups' functions, re-exported)
    DRIVER_COMPONENTS_MAX, components_honouring, driver_components, groups_with_keep, keep_order,
    read_not_duplicates, resolve_not_duplicates, write_groups)
from pipeline.stages.search import search_neighbors

log = logging.getLogger(__name__)


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


# Pairs-table columns beyond PAIRS_TABLE (image_id_a, image_id_b, similarity = raw cosine).
SCORE = "score"          # calibrated probability that the pair is a duplicate (null: dedup.score=cosine)
LEVEL = "level"


def neighbour_levels(neighbors: DataFrame, rank: int) -> DataFrame:
    """Each query's similarity to its ``rank``-th other neighbour; the Spark twin of
    :func:`pipeline.core.calibration.neighbour_levels` (fewer neighbours: the last one)."""
    others = neighbors.where(F.col(S.QUERY_ID) != F.col(S.NEIGHBOR_ID))
    ordered = Window.partitionBy(S.QUERY_ID).orderBy(S.RANK, S.NEIGHBOR_ID)
    return (others.withColumn("pos", F.row_number().over(ordered))
            .withColumn("n", F.count(F.lit(1)).over(Window.partitionBy(S.QUERY_ID)))
            .where(F.col("pos") == F.least(F.lit(int(rank)), F.col("n")))
            .select(F.col(S.QUERY_ID).alias(S.IMAGE_ID), F.col(S.SIMILARITY).cast("double").alias(LEVEL)))


def levels_of_lists(lists: DataFrame, rank: int) -> DataFrame:
    """:func:`neighbour_levels` from :func:`neighbour_lists`' lists (no second shuffle of the rows)."""
    sims = F.col(KNN_SIMS)
    level = F.when(F.size(sims) == 0, F.lit(-1.0)).otherwise(
        F.element_at(sims, F.least(F.lit(int(rank)), F.size(sims))).cast("double"))
    return lists.select(S.IMAGE_ID, level.alias(LEVEL))


def score_pairs(candidates: DataFrame, neighbors: DataFrame, calibration: cal_core.Calibration,
                levels: DataFrame | None = None, images: int | None = None) -> DataFrame:
    """Add :data:`SCORE`: :meth:`pipeline.core.calibration.Calibration.probability` in Spark.

    The levels come from the same kNN lists as the pairs (``levels``, or computed from
    ``neighbors``): no extra search.
    """
    levels = neighbour_levels(neighbors, calibration.rank) if levels is None else levels
    if images is not None:  # one level per image: a lookup table
        levels = tables.lookup(levels, images)
    # Renamed copies, not one frame joined twice: Spark mis-resolves such self-joins.
    la = levels.select(F.col(S.IMAGE_ID).alias("_a"), F.col(LEVEL).alias("_la"))
    lb = levels.select(F.col(S.IMAGE_ID).alias("_b"), F.col(LEVEL).alias("_lb"))
    joined = (candidates.join(la, F.col(S.IMAGE_ID_A) == F.col("_a"), "left")
              .join(lb, F.col(S.IMAGE_ID_B) == F.col("_b"), "left"))
    return joined.select(S.IMAGE_ID_A, S.IMAGE_ID_B, S.SIMILARITY,
                         probability(calibration, F.col(S.SIMILARITY), F.col("_la"), F.col("_lb")).alias(SCORE))


def probability(calibration: cal_core.Calibration, cosine: Column, level_a: Column, level_b: Column) -> Column:
    """:meth:`pipeline.core.calibration.Calibration.probability` as a float column (a missing level: -1)."""
    cosine = cosine.cast("double")
    terms = calibration.spark_terms()
    level = F.greatest(F.coalesce(level_a, F.lit(-1.0)), F.coalesce(level_b, F.lit(-1.0)))
    if terms["level_cap"] is not None:
        level = F.least(level, F.lit(terms["level_cap"]))
    normalised = cosine - level
    logit = F.lit(terms["intercept"]) + F.lit(terms["cosine"]) * cosine + F.lit(terms["normalised"]) * normalised
    return (1.0 / (1.0 + F.exp(-logit))).cast("float")


def calibration_space(config: Config) -> str:
    """Which shipped calibration fits the similarities: centring and DBA change their scale."""
    return cal_core.space_of(bool(config.embed.postprocess), config.dedup.dba_k > 1)


def load_calibration(config: Config) -> cal_core.Calibration:
    """``dedup.calibration`` (an artifact path) or the one shipped for the embedding space."""
    path = config.dedup.calibration or cal_core.shipped(calibration_space(config), config.embed.backbone)
    try:
        return cal_core.Calibration.load(path)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"dedup.calibration: cannot read {path}: {exc}") from exc


def uses_calibration(config: Config) -> bool:
    """Calibrated scores apply to float embeddings that re-ranking applies to (CNNs), not hashes
    or classical vectors (their threshold stays a similarity)."""
    return config.dedup.score == "calibrated" and registry.encoder_for(config).reranking


HISTOGRAM_BINS = P.HISTOGRAM_BINS  # similarity histogram over [-1, 1] in steps of 0.01


def similarity_histograms(candidates: DataFrame, columns: Sequence[str]) -> list[dict[str, int]]:
    """:func:`similarity_histogram` of several columns from one pass over the candidates."""
    from collections import Counter

    width = 2.0 / HISTOGRAM_BINS
    bins = [F.least(F.floor((F.col(c) + 1.0) / width), F.lit(HISTOGRAM_BINS - 1)).cast("int").alias(f"_b{i}")
            for i, c in enumerate(columns)]
    rows = candidates.groupBy(*bins).count().collect()  # at most HISTOGRAM_BINS ** len(columns) rows
    out = []
    for i in range(len(columns)):
        counts: Counter = Counter()
        for r in rows:
            if r[f"_b{i}"] is not None:
                counts[r[f"_b{i}"]] += int(r["count"])
        out.append({f"{-1.0 + b * width:.2f}": n for b, n in sorted(counts.items())})
    return out


def similarity_histogram(candidates: DataFrame, column: str = S.SIMILARITY) -> dict[str, int]:
    """Counts of candidate-pair values (``column``: cosine or calibrated score) per 0.01 bin
    (key: the bin's lower edge, e.g. "0.87")."""
    return similarity_histograms(candidates, [column])[0]


def dedup(spark: SparkSession, config: Config, on_lists: Callable[[float], None] | None = None) -> dict:
    """Write the pairs and groups tables for ``config.embed.backbone``; returns counts.

    ``on_lists(threshold)`` is called once the kNN lists (and the DBA store) are written, before
    the pairs and groups: what reads only those (the incremental state) may start then.

    The pairs table is what the model found (above the threshold); the groups apply the
    person's decisions on top (``dedup.not_duplicates``, ``dedup.keep``, ``dedup.keep_folders``).
    With calibrated scores each image's kNN list (others, best first) is also written to
    ``neighbors/<tag>/`` for the incremental dedup's state (:mod:`pipeline.stages.incremental`):
    the lists the levels come from, without a second search.
    """
    workdir = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    index_meta = ix.IndexInfo.load(workdir.index_dir(method)).meta
    images = int(index_meta["count"])
    # Above the explicit broadcast limit adaptive execution must not broadcast either: at 1M
    # images it broadcast the levels while scoring the candidates and the 2 GB local driver
    # failed ("Not enough memory to build and broadcast the table").
    with tables.no_auto_broadcast(spark) if images > tables.BROADCAST_MAX_ROWS else contextlib.nullcontext(), \
            tables.sized_shuffles(spark, images):
        counts, threshold, score = _dedup(spark, config, index_meta, on_lists)
    log.info("dedup %s at %s threshold %.3f: %s", method, score, threshold, counts)
    return counts


# Up to this many images the kNN lists are written and the incremental state (which needs them,
# not the scores) starts before the scoring job; on larger tables both come after the histograms.
# Small runs are chains of short jobs that overlap well: 2,794 images, dedup + state 7.2 -> 6.4 s,
# no wait for the state at the end (alternating in one application, 4 rounds, 2-core Xeon,
# 2026-12-02). At 100k the jobs are compute-bound and overlapping them cost 87 -> 94 s and a
# driver peak of 3.8 -> 4.2 GiB (`make bench-scale`). In between it is not measured: 20k is where
# the small-job regime of tables.ADAPTIVE_MIN_IMAGES ends.
EARLY_STATE_MAX_IMAGES = 20_000


def _dedup(spark: SparkSession, config: Config, index_meta: dict,
           on_lists: Callable[[float], None] | None = None) -> tuple[dict, float, str]:
    from pyspark import StorageLevel

    workdir = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    d = config.dedup
    neighbors = search_neighbors(spark, config, d.k + 1)  # +1: the query finds itself
    metric, images = index_meta.get("metric"), int(index_meta["count"])
    if images <= d.driver_max_images:
        return _dedup_on_driver(spark, config, metric, neighbors, on_lists)
    calibrated = uses_calibration(config)
    meta: dict = {"metric": metric, "k": d.k, "score": "calibrated" if calibrated else "cosine"}
    neighbors = tables.sized(neighbors, images * (d.k + 1)).persist(StorageLevel.MEMORY_AND_DISK)
    # Every kNN candidate pair, kept for the histogram of the report (where the threshold falls
    # in the distribution), then thresholded into the pairs table.
    candidates = pairs_from_neighbors(neighbors, -1.0)
    persisted: list[DataFrame] = []
    try:
        if calibrated:
            calibration = load_calibration(config)
            threshold = d.threshold
            # Each image's list, once: its level for the scores, and the incremental state's lists.
            # A list row holds k entries: partitions by entries, as the neighbour rows (1M images:
            # 2 partitions of 500k lists ran out of the 2 GB local heap while being cached).
            lists = tables.sized(neighbour_lists(neighbors, d.k), images * d.k).persist(StorageLevel.MEMORY_AND_DISK)
            persisted.append(lists)

            def lists_ready() -> None:
                if d.incremental != "never" and d.qe_k == 0:
                    tables.write_table(lists, workdir.neighbors(method), metadata={"k": d.k})
                if on_lists is not None:
                    on_lists(threshold)

            early = images <= EARLY_STATE_MAX_IMAGES
            if early:
                lists_ready()
            candidates = score_pairs(candidates, neighbors, calibration, levels_of_lists(lists, calibration.rank),
                                     images=images)
            candidates = tables.sized(candidates, images * d.k).persist(StorageLevel.MEMORY_AND_DISK)
            column = SCORE
            cosines, scores = similarity_histograms(candidates, [S.SIMILARITY, SCORE])
            meta.update({"calibration": calibration.version, "calibration_space": calibration.space,
                         "calibration_rank": calibration.rank, "cosine_histogram": cosines, "histogram": scores})
            if not early:
                lists_ready()
        else:
            threshold = registry.encoder_for(config).threshold(metric)  # dedup.hamming_bits for hashes
            candidates = tables.sized(candidates.withColumn(SCORE, F.lit(None).cast("float")),
                                      images * d.k).persist(StorageLevel.MEMORY_AND_DISK)
            column = S.SIMILARITY
            meta["histogram"] = similarity_histogram(candidates, column)
            if on_lists is not None:
                on_lists(threshold)
        meta["threshold"] = threshold
        tables.write_table(candidates.where(F.col(column) >= threshold), workdir.pairs(method), metadata=meta)
    finally:
        candidates.unpersist()
        neighbors.unpersist()
        for frame in persisted:
            frame.unpersist()
    return write_groups(spark, config, threshold, meta["score"]), threshold, meta["score"]


# Up to ``dedup.driver_max_images`` (20k) images the pairs, lists and groups are computed on
# the driver (:mod:`pipeline.core.pairs`) from the collected kNN rows: at most 20k x (k + 1)
# rows, a few MB. The Spark version is a chain of about twenty short jobs on such tables; the
# search itself (index, rotated views, DBA) stays in Spark. The tests compare both paths' tables.
def _dedup_on_driver(spark: SparkSession, config: Config, metric: str | None, neighbors: DataFrame,
                     on_lists: Callable[[float], None] | None) -> tuple[dict, float, str]:
    """:func:`_dedup` for a small table: the same tables, schemas and metadata."""
    workdir = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    d = config.dedup
    calibrated = uses_calibration(config)
    meta: dict = {"metric": metric, "k": d.k, "score": "calibrated" if calibrated else "cosine"}
    rows = neighbors.select(S.QUERY_ID, S.NEIGHBOR_ID, S.RANK, S.SIMILARITY).toPandas()
    q, n, r, s = (rows[c].to_numpy() for c in (S.QUERY_ID, S.NEIGHBOR_ID, S.RANK, S.SIMILARITY))
    a, b, sims = cal_core.candidate_pairs(q, n, s.astype(np.float32))
    candidates = pairs_from_neighbors(neighbors, -1.0)  # not run: its schema, the Spark path's
    if calibrated:
        calibration = load_calibration(config)
        threshold = d.threshold
        ids, lists, values = P.knn_lists(q, n, r, s, d.k)
        if d.incremental != "never" and d.qe_k == 0:
            listed = pd.DataFrame({S.IMAGE_ID: ids, KNN_IDS: lists, KNN_SIMS: values})
            tables.write_frame(spark, listed, neighbour_lists(neighbors, d.k).schema, workdir.neighbors(method),
                               metadata={"k": d.k})
        if on_lists is not None:
            on_lists(threshold)
        scores = P.pair_scores(a, b, sims, P.list_levels(ids, values, calibration.rank), calibration)
        schema = score_pairs(candidates, neighbors, calibration).schema
        kept = scores.astype(np.float64) >= threshold
        meta.update({"calibration": calibration.version, "calibration_space": calibration.space,
                     "calibration_rank": calibration.rank, "cosine_histogram": P.histogram(sims),
                     "histogram": P.histogram(scores)})
    else:
        threshold = registry.encoder_for(config).threshold(metric)  # dedup.hamming_bits for hashes
        scores = np.full(len(a), np.nan, np.float32)  # NaN is written as null
        schema = candidates.withColumn(SCORE, F.lit(None).cast("float")).schema
        kept = sims.astype(np.float64) >= threshold
        meta["histogram"] = P.histogram(sims)
        if on_lists is not None:
            on_lists(threshold)
    meta["threshold"] = threshold
    table = pd.DataFrame({S.IMAGE_ID_A: a[kept], S.IMAGE_ID_B: b[kept], S.SIMILARITY: sims[kept],
                          SCORE: scores[kept]})
    tables.write_frame(spark, table, schema, workdir.pairs(method), metadata=meta)
    edges = list(zip(a[kept].tolist(), b[kept].tolist(), sims[kept].tolist()))
    return write_groups(spark, config, threshold, meta["score"], edges=edges), threshold, meta["score"]


KNN_IDS, KNN_SIMS = "knn_ids", "knn_sims"


def neighbour_lists(neighbors: DataFrame, k: int) -> DataFrame:
    """Per query: its other neighbours (self excluded), best first, at most ``k``: the lists
    :func:`neighbour_levels` reads the levels from."""
    entry = F.struct(F.col(S.RANK), F.col(S.NEIGHBOR_ID).alias("n"), F.col(S.SIMILARITY).alias("s"))
    listed = (neighbors.where(F.col(S.QUERY_ID) != F.col(S.NEIGHBOR_ID)).groupBy(S.QUERY_ID)
              .agg(F.slice(F.sort_array(F.collect_list(entry)), 1, int(k)).alias("l")))
    return listed.select(F.col(S.QUERY_ID).alias(S.IMAGE_ID), F.col("l.n").alias(KNN_IDS),
                         F.col("l.s").alias(KNN_SIMS))
