"""Stage 4: kNN lists -> pairs table -> groups table (with the keep decision). Never deletes or moves files."""
from __future__ import annotations

import logging
import uuid

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.config import Config
from pipeline.core import storage
from pipeline.encoders import registry
from pipeline.stages import index as ix
from pipeline.stages import tables
from pipeline.stages.components import connected_components
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


def groups_with_keep(components: DataFrame, images: DataFrame) -> DataFrame:
    """Attach the keep decision: one image per group, by the policy in :mod:`pipeline.core.grouping`."""
    info = images.select(S.IMAGE_ID, S.PATH, S.WIDTH, S.HEIGHT, S.SIZE_BYTES)
    pixels = F.coalesce(F.col(S.WIDTH), F.lit(0)).cast("long") * F.coalesce(F.col(S.HEIGHT), F.lit(0)).cast("long")
    by_group = Window.partitionBy(S.GROUP_ID)
    ranked = Window.partitionBy(S.GROUP_ID).orderBy(pixels.desc(), F.col(S.SIZE_BYTES).desc(), F.col(S.PATH).asc(),
                                                    F.col(S.IMAGE_ID).asc())
    return (
        components.join(info, S.IMAGE_ID)
        .withColumn(S.GROUP_SIZE, F.count(F.lit(1)).over(by_group))
        .withColumn(S.KEEP, F.row_number().over(ranked) == 1)
        .select(S.GROUP_ID, S.IMAGE_ID, S.GROUP_SIZE, S.KEEP)
    )


def dedup(spark: SparkSession, config: Config) -> dict:
    """Write the pairs and groups tables for ``config.embed.backbone``; returns counts."""
    workdir = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    neighbors = search_neighbors(spark, config, config.dedup.k + 1)  # +1: the query finds itself
    metric = ix.IndexInfo.load(workdir.index_dir(method)).meta.get("metric")
    threshold = registry.encoder_for(config).threshold(metric)  # dedup.hamming_bits for hashes
    pairs = pairs_from_neighbors(neighbors, threshold)
    tables.write_table(pairs, workdir.pairs(method))
    pairs = tables.read_table(spark, workdir.pairs(method), "pairs table")
    # Reliable checkpoints: a lost executor costs a recomputation, not the job.
    scratch = workdir.scratch(f"components-{uuid.uuid4().hex[:12]}")
    try:
        components = connected_components(pairs, checkpoint_dir=scratch)
        if tables.is_committed(spark, workdir.images):
            images = tables.read_table(spark, workdir.images, "image table")
        else:
            # An embedding table computed elsewhere: no sizes to choose by, keep the smallest id.
            log.warning("no image table at %s: each group keeps its smallest image id", workdir.images)
            images = components.select(S.IMAGE_ID, F.lit(None).cast("string").alias(S.PATH),
                                       *[F.lit(None).cast("long").alias(c) for c in (S.WIDTH, S.HEIGHT, S.SIZE_BYTES)])
        tables.write_table(groups_with_keep(components, images), workdir.groups(method))
    finally:
        tables.remove(spark, scratch)
    groups = tables.read_table(spark, workdir.groups(method), "groups table")
    counts = {
        "pairs": pairs.count(),
        "groups": groups.select(S.GROUP_ID).distinct().count(),
        "images_in_groups": groups.count(),
        "images_to_remove": groups.where(~F.col(S.KEEP)).count(),
    }
    log.info("dedup %s at threshold %.3f: %s", method, threshold, counts)
    return counts
