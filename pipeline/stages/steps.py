"""Each stage as one timed step: run it, log its metrics to the active MLflow run, and return them.

The jobs (:mod:`pipeline.api`, :mod:`pipeline.evaluate`, :mod:`pipeline.train`) compose these
inside their MLflow runs. Steps return text for people (reports, group listings) instead of
printing it; the CLI prints.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.config import Config, ConfigError
from pipeline.core import storage
from pipeline.encoders import registry
from pipeline.stages import dedup as dd
from pipeline.stages import embed as em
from pipeline.stages import index as ix
from pipeline.stages import ingest as ing
from pipeline.stages import progress, tables, tracking, vocabulary
from pipeline.stages.timing import timed

log = logging.getLogger(__name__)


class TooManyErrors(RuntimeError):
    """More input files failed than ``max_error_fraction`` allows; ``report`` says which and why."""

    def __init__(self, message: str, report: str = ""):
        super().__init__(message)
        self.report = report


def check_inputs(config: Config) -> None:
    """Checks of ``ingest.input`` that need the filesystem but not Spark; run before the session starts."""
    if not config.ingest.input:
        raise ConfigError("no input: pass --input DIR (or set ingest.input)")
    for uri in config.ingest.input:
        local = storage.local_path_of(uri)
        if local is not None and not os.path.exists(local):
            raise ConfigError(f"input not found: {uri}")
        if local is not None and not os.access(local, os.R_OK):
            raise ConfigError(f"input not readable: {uri}")
        if local is not None and os.path.isdir(local):
            try:
                with os.scandir(local):
                    pass
            except OSError as exc:
                raise ConfigError(f"input folder cannot be listed: {uri} ({exc.strerror})") from exc


def ingest_step(spark: SparkSession, config: Config) -> tuple[dict[str, Any], str]:
    """Ingest; returns metrics and the report text. Raises :class:`TooManyErrors` after logging."""
    metrics: dict[str, Any] = {}
    with timed("ingest", metrics), progress.spark_stage(spark, "ingest", config.progress):
        report = ing.ingest(spark, config)
    metrics.update({
        "files_total": report.total,
        **{f"files_{status}": report.by_status.get(status, 0) for status in S.STATUSES},
        **{f"files_{change}": n for change, n in report.changes.items()},
        "error_fraction": report.error_fraction,
    })
    tracking.log_metrics(metrics)
    # Reasons are logged as JSON strings (data), never interpolated into markup.
    tracking.log_dict_artifact({"by_status": report.by_status, "top_errors": report.top_errors,
                                "top_skipped": report.top_skipped, "changes": report.changes},
                               "ingest_report.json")
    text = format_ingest_report(report)
    if report.error_fraction > config.max_error_fraction:
        raise TooManyErrors(
            f"{report.by_status.get(S.STATUS_ERROR, 0)} of {report.total} files could not be read "
            f"({report.error_fraction:.1%} > max_error_fraction {config.max_error_fraction:.1%}); "
            f"most common reasons: {'; '.join(f'{r} ({n})' for r, n in report.top_errors[:3])}", text)
    return metrics, text


def format_ingest_report(report: ing.IngestReport) -> str:
    lines = [f"files: {report.total}  " + "  ".join(f"{s}: {report.by_status.get(s, 0)}" for s in S.STATUSES)]
    if report.changes:
        lines.append("since the previous ingest: " + "  ".join(f"{k}: {v}" for k, v in report.changes.items()))
    for title, reasons in (("most common errors", report.top_errors), ("most common skip reasons", report.top_skipped)):
        if reasons:
            lines.append(f"{title}:")
        for reason, count in reasons:
            # repr(): text derived from the archive is shown as data, control characters escaped.
            lines.append(f"  {count:>6}  {reason!r}")
    return "\n".join(lines)


def embed_step(spark: SparkSession, config: Config, incremental: bool = True) -> tuple[dict[str, Any], str, Config]:
    """Embed; returns metrics, a one-line summary and the config used (it names any artifact trained here).

    ``incremental=False``: embed every image again, e.g. to time the model.
    """
    metrics: dict[str, Any] = {}
    # Train (or reuse) what the encoder needs before the embed timing starts.
    encoder, train_metrics = vocabulary.prepare(spark, registry.encoder_for(config))
    config = encoder.config
    metrics.update(train_metrics)
    with timed("model_load_driver", metrics):
        metrics["embedding_dim"] = encoder.preflight()
    items = _ok_images(spark, config) if progress.enabled(config.progress) else None
    with timed("embed", metrics), progress.spark_stage(spark, "embed", config.progress, items):
        counts = em.embed(spark, config, incremental)
    embedded = counts["embedded"]
    metrics.update({"images_embedded": embedded, "embeddings_ok": counts.get(S.STATUS_OK, 0),
                    "embed_errors": counts.get(S.STATUS_ERROR, 0), "embed_exact_copies": counts["exact_copies"],
                    **{f"embeddings_{change}": counts[change] for change in ("reused", "new", "changed", "deleted")},
                    "images_per_second": embedded / metrics["embed_seconds"] if metrics["embed_seconds"] else 0.0})
    text = (f"embeddings: {counts.get(S.STATUS_OK, 0)} ok, {counts.get(S.STATUS_ERROR, 0)} failed; computed "
            f"{embedded} ({counts['new']} new, {counts['changed']} changed), reused {counts['reused']}, "
            f"dropped {counts['deleted']}")
    tracking.log_metrics(metrics)
    return metrics, text, config


def _ok_images(spark: SparkSession, config: Config) -> int:
    images = tables.read_table(spark, storage.Workdir.of(config.workdir).images, "image table")
    return images.where(F.col(S.STATUS) == S.STATUS_OK).count()


def index_step(spark: SparkSession, config: Config) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    with timed("index", metrics), progress.spark_stage(spark, "index", config.progress):
        info = ix.build_index(spark, config)
    metrics.update({"index_vectors": info.meta["count"], "index_shards": len(info.meta["shards"])})
    tracking.log_metrics(metrics)
    tracking.log_dict_artifact(info.meta, "index.json")
    return metrics


def dedup_step(spark: SparkSession, config: Config, on_lists=None) -> dict[str, Any]:
    """``on_lists``: see :func:`pipeline.stages.dedup.dedup`."""
    metrics: dict[str, Any] = {}
    with timed("dedup", metrics), progress.spark_stage(spark, "dedup", config.progress):
        counts = dd.dedup(spark, config, on_lists)
    metrics.update(counts)
    tracking.log_metrics(metrics)
    return metrics


def format_groups(spark: SparkSession, config: Config, limit: int = 20) -> str:
    """A short, human-readable view of the groups; the full tables are in the workdir."""
    workdir = storage.Workdir.of(config.workdir)
    groups = tables.read_table(spark, workdir.groups(config.embed.backbone), "groups table")
    images = tables.read_table(spark, workdir.images, "image table").select(S.IMAGE_ID, S.PATH, S.WIDTH, S.HEIGHT)
    rows = (groups.join(images, S.IMAGE_ID)
            .orderBy(F.desc(S.GROUP_SIZE), S.GROUP_ID, F.desc(S.KEEP), S.PATH)
            .limit(limit * 10).collect())
    lines = []
    shown = 0
    current = None
    for r in rows:
        if r[S.GROUP_ID] != current:
            if shown == limit:
                break
            current = r[S.GROUP_ID]
            shown += 1
            lines.append(f"group {r[S.GROUP_ID]} ({r[S.GROUP_SIZE]} images)")
        mark = "keep  " if r[S.KEEP] else "remove"
        # repr(): names from the archive are shown as data, control characters escaped.
        lines.append(f"  {mark} {r[S.WIDTH]}x{r[S.HEIGHT]}  {r[S.PATH]!r}")
    lines.append(f"tables: {workdir.pairs(config.embed.backbone)}, {workdir.groups(config.embed.backbone)}")
    return "\n".join(lines)
