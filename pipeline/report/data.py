"""What the report shows, read from the workdir's tables in Spark and from MLflow."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.config import Config
from pipeline.core import storage
from pipeline.stages import tables
from pipeline.stages.dedup import SCORE

log = logging.getLogger(__name__)

# The settings shown on the summary page (all of them are in a collapsed table below it).
SHOWN_SETTINGS = ("ingest.input", "embed.backbone", "embed.weights", "embed.input", "embed.pooling",
                  "embed.postprocess", "index.type", "index.shards", "dedup.score", "dedup.threshold", "dedup.k", "dedup.dba_k",
                  "dedup.qe_k", "dedup.rotations", "dedup.keep", "dedup.keep_folders", "dedup.not_duplicates")
DOT = "aggregate(zip_with(e1, e2, (x, y) -> x * y), 0D, (acc, x) -> acc + x)"


@dataclass
class Tables:
    images: DataFrame
    groups: DataFrame
    pairs: DataFrame
    pairs_meta: dict[str, Any]
    embeddings: DataFrame | None


def load(spark: SparkSession, config: Config) -> Tables:
    wd = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    embeddings = None
    if tables.is_committed(spark, wd.embeddings(method)):
        embeddings = tables.read_table(spark, wd.embeddings(method), "embedding table")
    return Tables(images=tables.read_table(spark, wd.images, "image table"),
                  groups=tables.read_table(spark, wd.groups(method), "groups table"),
                  pairs=tables.read_table(spark, wd.pairs(method), "pairs table"),
                  pairs_meta=storage.read_metadata(wd.pairs(method)),
                  embeddings=embeddings)


def member_rows(t: Tables) -> list[dict[str, Any]]:
    """One dict per image in a group: file facts, keep flag, similarity to its group's kept image.

    The similarity is the pair's (from the search) when the two were matched directly; an
    image joined to the group through others has no such pair, and gets the cosine of the
    two embeddings instead (inner-product indexes only; hashes get None).
    """
    info = t.images.select(S.IMAGE_ID, S.PATH, S.WIDTH, S.HEIGHT, S.SIZE_BYTES, S.FORMAT)
    kept = t.groups.where(F.col(S.KEEP)).select(S.GROUP_ID, F.col(S.IMAGE_ID).alias("kept_id"))
    m = t.groups.join(info, S.IMAGE_ID).join(kept, S.GROUP_ID)
    lo, hi = F.least(S.IMAGE_ID, "kept_id"), F.greatest(S.IMAGE_ID, "kept_id")
    scored = SCORE in t.pairs.columns
    score_col = F.col(SCORE) if scored else F.lit(None).cast("float")
    direct = t.pairs.select(F.col(S.IMAGE_ID_A).alias("pa"), F.col(S.IMAGE_ID_B).alias("pb"),
                            F.col(S.SIMILARITY).alias("direct"), score_col.alias("direct_score"))
    m = m.join(direct, (lo == direct.pa) & (hi == direct.pb), "left")
    m = m.join(_best_link(t), [S.GROUP_ID, S.IMAGE_ID], "left")
    dot = F.lit(None).cast("double")
    if t.embeddings is not None and t.pairs_meta.get("metric", "inner_product") == "inner_product":
        ok = t.embeddings.where(F.col(S.STATUS) == S.STATUS_OK)
        e1 = ok.select(F.col(S.IMAGE_ID).alias("id1"), F.col(S.EMBEDDING).alias("e1"))
        e2 = ok.select(F.col(S.IMAGE_ID).alias("id2"), F.col(S.EMBEDDING).alias("e2"))
        m = m.join(e1, m[S.IMAGE_ID] == e1.id1, "left").join(e2, m.kept_id == e2.id2, "left")
        dot = F.when(F.col("direct").isNull() & F.col("e1").isNotNull() & F.col("e2").isNotNull(), F.expr(DOT))
    similarity = (F.when(F.col(S.KEEP), F.lit(1.0))
                  .otherwise(F.coalesce(F.col("direct").cast("double"), F.least(F.lit(1.0), dot))))
    source = (F.when(F.col(S.KEEP), F.lit("pair")).when(F.col("direct").isNotNull(), F.lit("pair"))
              .when(dot.isNotNull(), F.lit("embedding")))
    score = F.when(~F.col(S.KEEP), F.coalesce(F.col("direct_score"), F.col("best_score")).cast("double"))
    rows = m.select(S.GROUP_ID, S.IMAGE_ID, S.KEEP, S.PATH, S.WIDTH, S.HEIGHT, S.SIZE_BYTES, S.FORMAT,
                    similarity.alias("similarity"), source.alias("similarity_source"),
                    score.alias("score")).toPandas()
    rows = rows.astype(object).where(rows.notna(), None)
    return rows.to_dict("records")


def _best_link(t: Tables) -> DataFrame:
    """(group_id, image_id, best_score): each image's strongest calibrated pair inside its group."""
    if SCORE not in t.pairs.columns:
        return t.groups.select(S.GROUP_ID, S.IMAGE_ID, F.lit(None).cast("float").alias("best_score")).limit(0)
    ga = t.groups.select(F.col(S.IMAGE_ID).alias("ia"), F.col(S.GROUP_ID).alias("ga"))
    gb = t.groups.select(F.col(S.IMAGE_ID).alias("ib"), F.col(S.GROUP_ID).alias("gb"))
    inside = (t.pairs.join(ga, F.col(S.IMAGE_ID_A) == F.col("ia")).join(gb, F.col(S.IMAGE_ID_B) == F.col("ib"))
              .where(F.col("ga") == F.col("gb")))
    ends = (inside.select(F.col("ga").alias(S.GROUP_ID), F.col("ia").alias(S.IMAGE_ID), F.col(SCORE))
            .unionByName(inside.select(F.col("ga").alias(S.GROUP_ID), F.col("ib").alias(S.IMAGE_ID), F.col(SCORE))))
    return ends.groupBy(S.GROUP_ID, S.IMAGE_ID).agg(F.max(SCORE).alias("best_score"))


def failed_rows(t: Tables) -> list[dict[str, Any]]:
    df = (t.images.where(F.col(S.STATUS) != S.STATUS_OK)
          .select(S.STATUS, S.PATH, S.ERROR, S.FORMAT, S.SIZE_BYTES).orderBy(S.STATUS, S.ERROR, S.PATH).toPandas())
    return df.astype(object).where(df.notna(), None).to_dict("records")


def status_summary(t: Tables, top: int = 10) -> dict[str, Any]:
    counts = {r[S.STATUS]: r["count"] for r in t.images.groupBy(S.STATUS).count().collect()}
    reasons = (t.images.where(F.col(S.STATUS) != S.STATUS_OK).groupBy(S.STATUS, S.ERROR).count().collect())

    def most_common(status: str) -> list[tuple[str, int]]:
        found = sorted(((r[S.ERROR] or "", r["count"]) for r in reasons if r[S.STATUS] == status),
                       key=lambda rc: (-rc[1], rc[0]))
        return found[:top]

    return {"files_total": sum(counts.values()), "by_status": {s: counts.get(s, 0) for s in S.STATUSES},
            "top_errors": most_common(S.STATUS_ERROR), "top_skipped": most_common(S.STATUS_SKIPPED)}


def histogram_of(spark: SparkSession, t: Tables) -> tuple[dict[str, int], str]:
    """The candidate-pair histogram dedup recorded, else (older workdirs) one of the pairs table."""
    if t.pairs_meta.get("histogram"):
        return t.pairs_meta["histogram"], (
            f"All candidate pairs of the search (each image's {t.pairs_meta.get('k', '?')} nearest neighbours); "
            "bars at or above the threshold are grouped.")
    from pipeline.stages.dedup import similarity_histogram

    return similarity_histogram(t.pairs), "Pairs at or above the threshold only (this workdir's dedup predates the full histogram)."


def find_dedup_run(config: Config) -> dict[str, Any] | None:
    """The latest finished ``run``/``dedup`` MLflow run of this workdir and method, if any."""
    import mlflow

    from pipeline.core.storage import tag_of

    mlflow.set_tracking_uri(config.tracking_uri())
    experiment = mlflow.get_experiment_by_name(config.mlflow.experiment)
    if experiment is None:
        return None
    names = {f"run-{tag_of(config.embed.backbone)}", f"dedup-{tag_of(config.embed.backbone)}"}
    runs = mlflow.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=500, output_format="list")
    for run in runs:
        if run.info.run_name in names:
            return {"run_id": run.info.run_id, "run_name": run.info.run_name,
                    "experiment_id": experiment.experiment_id, "params": dict(run.data.params),
                    "url": f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"}
    return None
