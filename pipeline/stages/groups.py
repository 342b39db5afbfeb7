"""The groups table from the pairs: connected components, the person's "not duplicates"
decisions and the keep policy (Spark at scale; on the driver for a small table's pairs, by
the pure functions of :mod:`pipeline.core.grouping` that the Spark versions are tested
against). Never deletes or moves files."""
from __future__ import annotations

import logging
import uuid
from typing import Sequence

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.config import Config, ConfigError
from pipeline.core import grouping as G
from pipeline.core import pairs as P
from pipeline.core import storage
from pipeline.stages import tables
from pipeline.stages.components import connected_components

log = logging.getLogger(__name__)


def keep_order(policy: str = "pixels", keep_folders: Sequence[str] = ()) -> list[Column]:
    """Sort columns of the keep policy; the Spark twin of :func:`pipeline.core.grouping.keep_order_key`."""
    pixels = F.coalesce(F.col(S.WIDTH), F.lit(0)).cast("long") * F.coalesce(F.col(S.HEIGHT), F.lit(0)).cast("long")
    rank = F.lit(len(keep_folders))
    for i, folder in reversed(list(enumerate(keep_folders))):
        rank = F.when(F.col(S.PATH).startswith(folder.rstrip("/") + "/"), F.lit(i)).otherwise(rank)
    order = [rank.asc()]
    if policy == "pixels":
        lossless = F.when(F.upper(F.coalesce(F.col(S.FORMAT), F.lit(""))).isin(*sorted(G.LOSSY_FORMATS)), 0).otherwise(1)
        order += [pixels.desc(), lossless.asc(), F.col(S.MODIFICATION_TIME).asc_nulls_last()]
    elif policy == "largest":
        order += [F.col(S.SIZE_BYTES).desc(), pixels.desc()]
    elif policy == "oldest":
        order += [F.col(S.MODIFICATION_TIME).asc_nulls_last()]
    elif policy == "newest":
        order += [F.col(S.MODIFICATION_TIME).desc_nulls_last()]
    else:
        raise ValueError(f"unknown keep policy {policy!r}; one of {', '.join(G.KEEP_POLICIES)}")
    return order + [F.col(S.PATH).asc()]


def groups_with_keep(components: DataFrame, images: DataFrame, policy: str = "pixels",
                     keep_folders: Sequence[str] = ()) -> DataFrame:
    """Attach the keep decision: one image per group, by the policy in :mod:`pipeline.core.grouping`."""
    info = images.select(*[c for c in (S.IMAGE_ID, S.PATH, S.WIDTH, S.HEIGHT, S.SIZE_BYTES, S.FORMAT,
                                       S.MODIFICATION_TIME) if c in images.columns])
    for name, typ in ((S.FORMAT, "string"), (S.MODIFICATION_TIME, "timestamp")):
        if name not in info.columns:
            info = info.withColumn(name, F.lit(None).cast(typ))
    by_group = Window.partitionBy(S.GROUP_ID)
    ranked = Window.partitionBy(S.GROUP_ID).orderBy(*keep_order(policy, keep_folders), F.col(S.IMAGE_ID).asc())
    return (
        components.join(info, S.IMAGE_ID)
        .withColumn(S.GROUP_SIZE, F.count(F.lit(1)).over(by_group))
        .withColumn(S.KEEP, F.row_number().over(ranked) == 1)
        .select(S.GROUP_ID, S.IMAGE_ID, S.GROUP_SIZE, S.KEEP)
    )


def read_not_duplicates(path: str) -> list[tuple[str, str]]:
    """The ``dedup.not_duplicates`` CSV: two cells per row, image paths or image ids.

    Lines starting with ``#`` and a header row (``a,b``, ``path_a,path_b``, ``image_id_a,image_id_b``)
    are ignored; a relative path is taken relative to the CSV file's folder.
    """
    import csv
    import os

    folder = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh):
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if len(cells) != 2:
                raise ConfigError(f"dedup.not_duplicates {path}: expected two cells per row, got {row!r}")
            if tuple(c.lower() for c in cells) in (("a", "b"), ("path_a", "path_b"), ("image_id_a", "image_id_b")):
                continue
            out.append(tuple(c if os.path.isabs(c) or not os.path.exists(os.path.join(folder, c))
                             else os.path.abspath(os.path.join(folder, c)) for c in cells))
    return out


def resolve_not_duplicates(spark: SparkSession, entries: list[tuple[str, str]],
                           images: DataFrame) -> tuple[list[tuple[str, str]], int]:
    """Image id pairs for the declared rows, and how many rows named an unknown image."""
    if not entries:
        return [], 0
    values = spark.createDataFrame(sorted({v for pair in entries for v in pair}), "string").toDF("value")
    ids = images.select(S.IMAGE_ID, S.PATH)
    by_id = values.join(ids, values.value == ids[S.IMAGE_ID]).select("value", S.IMAGE_ID)
    by_path = values.join(ids, values.value == ids[S.PATH]).select("value", S.IMAGE_ID)
    id_of = {r["value"]: r[S.IMAGE_ID] for r in by_path.union(by_id).collect()}
    pairs, unmatched = [], 0
    for a, b in entries:
        if a in id_of and b in id_of:
            pairs.append(G.unordered(id_of[a], id_of[b]))
        else:
            unmatched += 1
            log.warning("dedup.not_duplicates: no image for %r", a if a not in id_of else b)
    return sorted(set(pairs)), unmatched


# Up to this many pairs the groups' components are computed on the driver (union-find).
DRIVER_COMPONENTS_MAX = 2_000_000


def driver_components(spark: SparkSession, pairs: DataFrame) -> tuple[DataFrame, dict[str, str]]:
    """Connected components by union-find on the driver (the oracle the Spark components are
    tested against; the same labels, the smallest image id): for few edges, instead of several
    rounds of Spark jobs. Returns the components and the labels they were made from."""
    labels = G.connected_components((r[0], r[1]) for r in pairs.select(S.IMAGE_ID_A, S.IMAGE_ID_B).collect())
    return spark.createDataFrame(sorted(labels.items()), f"{S.IMAGE_ID} string, {S.GROUP_ID} string"), labels


def components_honouring(spark: SparkSession, pairs: DataFrame, forbidden: list[tuple[str, str]],
                         checkpoint_dir: str | None = None, pair_count: int | None = None) -> tuple[DataFrame, int]:
    """Connected components in which no declared "not duplicates" pair shares a group.

    The declared pairs' edges are dropped before the components. Components that still hold a
    declared pair (joined through a chain of other images) are split on the driver by
    :func:`pipeline.core.grouping.components_with_cannot_link` (weakest links cut first);
    such components are few and small, the rest stay in Spark. Returns (components, split count).
    """
    if not forbidden:
        if (pairs.count() if pair_count is None else pair_count) <= DRIVER_COMPONENTS_MAX:
            return driver_components(spark, pairs)[0], 0
        return connected_components(pairs, checkpoint_dir=checkpoint_dir), 0
    banned = spark.createDataFrame(forbidden, f"{S.IMAGE_ID_A} string, {S.IMAGE_ID_B} string")
    pairs = pairs.join(banned, [S.IMAGE_ID_A, S.IMAGE_ID_B], "left_anti")
    comps = connected_components(pairs, checkpoint_dir=checkpoint_dir).localCheckpoint()
    # Renamed copies, not one frame joined twice: Spark mis-resolves such self-joins.
    la = comps.select(F.col(S.IMAGE_ID).alias("node_a"), F.col(S.GROUP_ID).alias("group_a"))
    lb = comps.select(F.col(S.IMAGE_ID).alias("node_b"), F.col(S.GROUP_ID).alias("group_b"))
    violated = (banned.join(la, F.col(S.IMAGE_ID_A) == F.col("node_a"))
                .join(lb, F.col(S.IMAGE_ID_B) == F.col("node_b"))
                .where(F.col("group_a") == F.col("group_b")).select(F.col("group_a").alias("g")).distinct().collect())
    bad = [r["g"] for r in violated]
    if not bad:
        return comps, 0
    affected = comps.where(F.col(S.GROUP_ID).isin(bad)).select(S.IMAGE_ID)
    edges = (pairs.join(affected.withColumnRenamed(S.IMAGE_ID, S.IMAGE_ID_A), S.IMAGE_ID_A, "left_semi")
             .collect())
    split = G.components_with_cannot_link(((r[S.IMAGE_ID_A], r[S.IMAGE_ID_B], r[S.SIMILARITY]) for r in edges),
                                          forbidden)
    fixed = spark.createDataFrame(sorted(split.items()), f"{S.IMAGE_ID} string, {S.GROUP_ID} string")
    return comps.where(~F.col(S.GROUP_ID).isin(bad)).unionByName(fixed), len(bad)


def write_groups(spark: SparkSession, config: Config, threshold: float, score: str,
                 edges: list[tuple[str, str, float]] | None = None) -> dict:
    """The groups table from the committed pairs table (full and incremental dedup); returns counts.

    ``edges``: the pairs table's (a, b, similarity) rows, already on the driver (a small
    table's dedup): the groups are then made there too, from the same pure functions."""
    workdir = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    d = config.dedup
    if edges is not None:
        return _groups_on_driver(spark, config, threshold, score, edges)
    pairs = tables.read_table(spark, workdir.pairs(method), "pairs table")
    # Reliable checkpoints: a lost executor costs a recomputation, not the job.
    scratch = workdir.scratch(f"components-{uuid.uuid4().hex[:12]}")
    try:
        if tables.is_committed(spark, workdir.images):
            images = tables.read_table(spark, workdir.images, "image table")
        else:
            # An embedding table computed elsewhere: no sizes to choose by, keep the smallest id.
            log.warning("no image table at %s: each group keeps its smallest image id", workdir.images)
            images = None
        declared = read_not_duplicates(d.not_duplicates) if d.not_duplicates and images is not None else []
        forbidden, unmatched = resolve_not_duplicates(spark, declared, images)
        n_pairs, labels = pairs.count(), None
        if not forbidden and n_pairs <= DRIVER_COMPONENTS_MAX:
            (components, labels), split = driver_components(spark, pairs), 0
        else:
            components, split = components_honouring(spark, pairs, forbidden, checkpoint_dir=scratch,
                                                     pair_count=n_pairs)
        if images is None:
            images = _no_image_info(components)
        groups = groups_with_keep(components, images, d.keep, d.keep_folders)
        tables.write_table(groups, workdir.groups(method), metadata=_groups_meta(d, threshold, score))
    finally:
        tables.remove(spark, scratch)
    if labels is not None:
        # Components made on the driver: the counts are known there (each group keeps one image),
        # without reading the groups table back (two Spark jobs of a small run's dedup).
        counts = _label_counts(n_pairs, labels)
    else:
        groups = tables.read_table(spark, workdir.groups(method), "groups table")
        row = groups.agg(F.countDistinct(S.GROUP_ID).alias("groups"), F.count(F.lit(1)).alias("images_in_groups"),
                         F.sum((~F.col(S.KEEP)).cast("long")).alias("images_to_remove")).first()
        counts = {"pairs": n_pairs, **{k: int(row[k] or 0) for k in ("groups", "images_in_groups", "images_to_remove")}}
    return _with_decisions(counts, d, forbidden, unmatched, split)


def _groups_on_driver(spark: SparkSession, config: Config, threshold: float, score: str,
                      edges: list[tuple[str, str, float]]) -> dict:
    """:func:`write_groups` from pairs held on the driver: components, the "not duplicates"
    splits and the keep policy by :mod:`pipeline.core.grouping`, the oracle of the Spark path."""
    workdir = storage.Workdir.of(config.workdir)
    d = config.dedup
    images = tables.read_table(spark, workdir.images, "image table") if tables.is_committed(spark, workdir.images) else None
    if images is None:
        log.warning("no image table at %s: each group keeps its smallest image id", workdir.images)
    declared = read_not_duplicates(d.not_duplicates) if d.not_duplicates and images is not None else []
    forbidden, unmatched = resolve_not_duplicates(spark, declared, images)
    split = 0
    if forbidden:
        banned = set(forbidden)
        plain = G.connected_components((x, y) for x, y, _ in edges if G.unordered(x, y) not in banned)
        split = len({plain[x] for x, y in forbidden if x in plain and y in plain and plain[x] == plain[y]})
        labels = G.components_with_cannot_link(edges, forbidden)
    else:
        labels = G.connected_components((x, y) for x, y, _ in edges)
    info = None
    components = spark.createDataFrame([], f"{S.IMAGE_ID} string, {S.GROUP_ID} string")
    if images is not None:
        columns = [c for c in (S.IMAGE_ID, S.PATH, S.WIDTH, S.HEIGHT, S.SIZE_BYTES, S.FORMAT, S.MODIFICATION_TIME)
                   if c in images.columns]
        info = {}
        if labels:
            rows = images.select(*columns).toPandas()
            info = {row[S.IMAGE_ID]: row for row in rows.to_dict("records") if row[S.IMAGE_ID] in labels}
        schema = groups_with_keep(components, images, d.keep, d.keep_folders).schema
    else:
        schema = groups_with_keep(components, _no_image_info(components)).schema
    groups = P.groups_with_keep(labels, info, d.keep, d.keep_folders)
    groups = groups.rename(columns={"group_id": S.GROUP_ID, "image_id": S.IMAGE_ID, "group_size": S.GROUP_SIZE,
                                    "keep": S.KEEP})
    tables.write_frame(spark, groups, schema, workdir.groups(config.embed.backbone),
                       metadata=_groups_meta(d, threshold, score))
    counts = _label_counts(len(edges), labels)
    return _with_decisions(counts, d, forbidden, unmatched, split)


def _groups_meta(d, threshold: float, score: str) -> dict:
    return {"keep": d.keep, "keep_folders": list(d.keep_folders), "not_duplicates": d.not_duplicates,
            "threshold": threshold, "score": score}


def _label_counts(n_pairs: int, labels: dict[str, str]) -> dict:
    """Counts from components made on the driver: each group keeps one image."""
    n_groups = len(set(labels.values()))
    return {"pairs": n_pairs, "groups": n_groups, "images_in_groups": len(labels),
            "images_to_remove": len(labels) - n_groups}


def _with_decisions(counts: dict, d, forbidden: list, unmatched: int, split: int) -> dict:
    if d.not_duplicates:
        counts.update({"not_duplicates_pairs": len(forbidden), "not_duplicates_unmatched": unmatched,
                       "groups_split_by_not_duplicates": split})
    return counts


def _no_image_info(components: DataFrame) -> DataFrame:
    """Image rows without sizes or paths (no image table): every group keeps its smallest id."""
    return components.select(S.IMAGE_ID, F.lit(None).cast("string").alias(S.PATH),
                             *[F.lit(None).cast("long").alias(c) for c in (S.WIDTH, S.HEIGHT, S.SIZE_BYTES)])
