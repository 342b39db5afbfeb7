"""``neardup report``: the static HTML report of a workdir's groups, logged to MLflow."""
from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.config import Config, ConfigError
from pipeline.core import storage
from pipeline.report import data, pages, plot
from pipeline.stages import thumbnails, tracking

log = logging.getLogger(__name__)

THUMBS = "thumbs"
MARKER = ".neardup-report"  # marks a folder this job wrote, so replacing it can never hit other files


@dataclass
class ReportResult:
    out_dir: str
    index: str  # path of index.html
    url: str  # file:// URL of index.html
    groups: int
    images_to_remove: int
    thumbnails: int
    thumbnail_errors: int
    pages: int
    mlflow_run_id: str | None
    report: str = ""  # the lines the CLI prints


def default_out_dir(config: Config) -> str:
    local = storage.local_path_of(storage.Workdir.of(config.workdir).root)
    if local is None:
        raise FileNotFoundError("report.out must be set when the workdir is not on the local filesystem")
    return os.path.join(local, "report")


def build_report(spark: SparkSession, config: Config, out: str | None = None, log_to_mlflow: bool = True,
                 progress=None) -> ReportResult:
    """Write the report for ``config.embed.backbone`` into ``out`` (default ``<workdir>/report``).

    The folder is replaced whole: everything the pages need (thumbnails, the plot, the
    stylesheet) is inside it, so it opens from ``file://`` and can be zipped and mailed.
    """
    out_dir = os.path.abspath(out or config.report.out or default_out_dir(config))
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, MARKER)):
        raise ConfigError(f"report.out {out_dir} is a folder that holds other files; the report replaces its "
                          "folder whole, so give a new or empty folder (or a previous report's)")
    staging = out_dir.rstrip("/") + ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, THUMBS))
    with open(os.path.join(staging, MARKER), "w", encoding="utf-8") as fh:
        fh.write("written by neardup report; the whole folder is replaced by the next report\n")
    t = data.load(spark, config)

    in_groups = t.images.join(t.groups.select(S.IMAGE_ID), S.IMAGE_ID, "left_semi")
    total = in_groups.count()
    if progress is not None:
        progress.start("thumbnails", total)
    failed_thumbs = thumbnails.write_thumbnails(
        in_groups, os.path.join(staging, THUMBS), config.report.thumb_px, config.report.thumb_quality,
        config.ingest.max_pixels, progress=progress.advance if progress is not None else None)
    if progress is not None:
        progress.finish()

    groups = pages.build_groups(data.member_rows(t))
    for g in groups:
        for m in g.members:
            if m.image_id not in failed_thumbs:
                m.thumb = f"{THUMBS}/{thumbnails.thumbnail_name(m.image_id)}"

    root = pages.shorten_paths(groups)
    histogram, note = data.histogram_of(spark, t)
    threshold = t.pairs_meta.get("threshold", config.dedup.threshold)
    calibrated = t.pairs_meta.get("score") == "calibrated"
    plot.similarity_histogram_png(histogram, threshold, os.path.join(staging, "similarity.png"),
                                  xlabel=("calibrated duplicate probability of candidate pairs" if calibrated else None))
    pr_curve = _copy_pr_curve(config, staging)
    run = data.find_dedup_run(config)
    summary = {
        "title": "neardup report",
        "root": root,
        "workdir": storage.Workdir.of(config.workdir).root,
        "method": config.embed.backbone,
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **data.status_summary(t),
        "groups": len(groups),
        "images_in_groups": sum(g.size for g in groups),
        "images_to_remove": sum(g.size - 1 for g in groups),
        "bytes_freed": sum(g.bytes_freed for g in groups),
        "pairs": t.pairs.count(),
        "threshold": threshold,
        "histogram": "similarity.png",
        "histogram_note": note,
        "score": "calibrated" if calibrated else "cosine",
        "pr_curve": pr_curve,
        "failed_total": t.images.where(F.col(S.STATUS) != S.STATUS_OK).count(),
        "mlflow_run": run,
        "tracking_uri": config.tracking_uri(),
    }
    params = (run or {}).get("params") or {k: str(v) for k, v in tracking.config_params(config).items()}
    summary["settings"] = [(k, params[k]) for k in data.SHOWN_SETTINGS if k in params]
    summary["all_params"] = sorted(params.items())
    written = pages.render_site(staging, summary, groups, data.failed_rows(t), config.report.groups_per_page)

    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    index = os.path.join(out_dir, "index.html")
    report_run = _log_to_mlflow(config, out_dir, run) if log_to_mlflow else None
    result = ReportResult(out_dir=out_dir, index=index, url=Path(index).as_uri(), groups=len(groups),
                          images_to_remove=summary["images_to_remove"], thumbnails=total - len(failed_thumbs),
                          thumbnail_errors=len(failed_thumbs),
                          pages=written["group_pages"] + written["failed_pages"] + 1, mlflow_run_id=report_run)
    result.report = (f"report: {result.groups} groups, {result.images_to_remove} images proposed for removal, "
                     f"{result.pages} pages, {result.thumbnails} thumbnails\nopen {result.url}")
    log.info("report: %s (%d groups, %d pages)", result.url, result.groups, result.pages)
    return result


def _copy_pr_curve(config: Config, staging: str) -> str | None:
    """The pairs' precision-recall curve when `evaluate` ran in this workdir (labelled data)."""
    src = storage.Workdir.of(config.workdir).evaluation_file(config.embed.backbone, "pr_curve.png")
    local = storage.local_path_of(src)
    if local is None or not os.path.isfile(local):
        return None
    shutil.copyfile(local, os.path.join(staging, "pr_curve.png"))
    return "pr_curve.png"


def _log_to_mlflow(config: Config, out_dir: str, source: dict | None) -> str:
    import mlflow

    tags = {"job": "report", **({"source_run": source["run_id"]} if source else {})}
    with tracking.mlflow_run(config, f"report-{storage.tag_of(config.embed.backbone)}", tags=tags) as run:
        mlflow.log_artifacts(out_dir, artifact_path="report")
        return run.info.run_id
