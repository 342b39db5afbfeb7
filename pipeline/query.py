"""The ``query`` job: near-duplicates of new images in an existing archive, without rebuilding it.

A small input (at most ``query.max_light_files`` files) takes the light path
(:mod:`pipeline.querylight`: no Spark, the model and the index shards loaded in this process);
a larger one, or one the light path cannot serve, goes through Spark
(:mod:`pipeline.stages.query`). Both give the same matches.

**What the similarity means.** For a new image q and an archive image b it is the score q's own
kNN list would hold for b if dedup ran with q in the archive: the best, over q's variants, of
the inner product with b's augmented vector, where q's variants are its DBA vector (the
alpha-weighted sum of the best ``dedup.dba_k`` of q itself and its raw archive neighbours) and
its embeddings rotated by each ``dedup.rotations`` angle, and b's augmented vector is the one
the archive's last dedup used. So a match at or above ``dedup.threshold`` is what dedup would
call a pair from q's side. With ``dedup.score=calibrated`` (the default) the threshold applies to
the calibrated score (:mod:`pipeline.core.calibration`, the ``score`` column) of q's top
``dedup.k`` by similarity: q's level is read from them, each archive image's level is the one
of the last dedup (its state, ``incremental/<tag>/``). What the query does not do is change the archive: b's augmented
vector does not take q in, and b's rotated queries are not run against q; ``dedup`` after
ingesting the files (incremental) does both, and may score such a pair a little higher.

This module imports no PySpark unless the Spark path runs.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline import querylight as light
from pipeline.config import Config, ConfigError
from pipeline.core import storage

log = logging.getLogger(__name__)

COLUMNS = ("query_path", "query_status", "query_error", "image_id", "path", "similarity", "score", "rank")


@dataclass
class QueryResult:
    """The matches (one dict per row of the matches table), where they were written, and how."""

    job: str
    metrics: dict[str, Any]
    tables: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    report: str = ""
    config: Config | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    path: str = ""  # light | spark

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]


def validated(config: Config) -> Config:
    """The settings checks of :func:`pipeline.api.validate`, without importing the API (PySpark)."""
    from pipeline.encoders import registry

    config.validate()
    registry.validate_settings(config)
    return config


def rotations_of(config: Config) -> list[int]:
    return sorted({int(r) for r in config.dedup.rotations if int(r) % 360})


def choose_path(config: Config) -> tuple[str, str, list | None]:
    """("light" | "spark", why, the listed files when they were listed here)."""
    q = config.query
    if q.force_path == "spark":
        return "spark", "query.force_path=spark", None
    if any(storage.local_path_of(u) is None for u in q.input) or storage.local_path_of(config.workdir) is None:
        return "spark", "inputs or workdir not on the local filesystem", None
    listed = light.list_query_files(q.input, config.ingest.follow_symlinks)
    if q.force_path != "light" and len(listed) > q.max_light_files:
        return "spark", f"{len(listed)} files > query.max_light_files={q.max_light_files}", None
    from pipeline.encoders import registry

    encoder = registry.encoder_for(config)
    if encoder.binary or not encoder.reranking:
        return "spark", f"{config.embed.backbone}: the light path serves float re-rankable encoders", None
    if config.dedup.qe_k > 0:
        return "spark", "query expansion (dedup.qe_k > 0) runs in Spark", None
    if config.dedup.dba_k > 1:
        if not light.Archive(config).state_usable():
            return "spark", "no dedup state for this index (run dedup once) to read augmented vectors from", None
    return "light", f"{len(listed)} files <= query.max_light_files={q.max_light_files}", listed


def query(config: Config, spark=None) -> QueryResult:
    """Run the query job for ``config.query.input`` against ``config.workdir``."""
    if not config.query.input:
        raise ConfigError("no input: pass --input FILES_OR_DIRS (or set query.input)")
    for uri in config.query.input:
        local = storage.local_path_of(uri)
        if local is not None and not os.path.exists(local):
            raise ConfigError(f"input not found: {uri}")
    started = time.perf_counter()
    path, why, listed = choose_path(config)
    log.info("query: %s path (%s)", path, why)
    metrics: dict[str, Any] = {}
    if path == "light":
        files, matches, paths, timings = light.run_light(config, rotations_of(config), listed)
        metrics.update(timings)
        rows = light_rows(files, matches, paths)
        uri = write_matches_arrow(config, rows)
    else:
        rows, uri = _spark_path(config, spark)
    metrics.update(summary(rows))
    metrics["query_seconds"] = time.perf_counter() - started
    return QueryResult("query", metrics, {"matches": uri}, None, format_report(rows, metrics, path, uri), config,
                       rows, path)


def _spark_path(config: Config, spark) -> tuple[list[dict], str]:
    from pipeline.stages import query as stage
    from pipeline.stages import tables
    from pipeline.stages.session import spark_session

    uri = storage.Workdir.of(config.workdir).matches(config.embed.backbone)
    if spark is not None:
        session_cm = _given(spark)
    else:
        session_cm = spark_session(config)
    with session_cm as session:
        table = stage.query_spark(session, config)
        tables.write_table(table, uri, metadata={"threshold": config.dedup.threshold, "k": config.dedup.k})
        rows = [r.asDict() for r in tables.read_table(session, uri, "matches table").collect()]
    return sort_rows(rows), uri


class _given:
    def __init__(self, spark):
        self.spark = spark

    def __enter__(self):
        return self.spark

    def __exit__(self, *exc):
        return False


def light_rows(files, matches, paths) -> list[dict[str, Any]]:
    rows = []
    for f, found in zip(files, matches):
        base = {"query_path": f.path, "query_status": f.status, "query_error": f.error}
        if not found:
            rows.append({**base, "image_id": None, "path": None, "similarity": None, "score": None, "rank": None})
        for rank, (image_id, sim, score) in enumerate(found):
            rows.append({**base, "image_id": image_id, "path": paths.get(image_id), "similarity": float(sim),
                         "score": None if score is None else float(score), "rank": rank})
    return sort_rows(rows)


def sort_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["query_path"], -1 if r["rank"] is None else r["rank"]))


def write_matches_arrow(config: Config, rows: list[dict]) -> str:
    """The matches table without Spark (local workdir): Parquet, metadata and ``_SUCCESS``, committed by rename."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = storage.Workdir.of(config.workdir).matches(config.embed.backbone)
    target = storage.local_path_of(uri)
    schema = pa.schema([("query_path", pa.string()), ("query_status", pa.string()), ("query_error", pa.string()),
                        ("image_id", pa.string()), ("path", pa.string()), ("similarity", pa.float32()),
                        ("score", pa.float32()), ("rank", pa.int32())])
    staging = f"{target}.staging-{uuid.uuid4().hex[:12]}"
    os.makedirs(staging)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(staging, "part-00000.parquet"))
    storage.write_json(os.path.join(staging, storage.METADATA_FILE), {"threshold": config.dedup.threshold,
                                                                       "k": config.dedup.k})
    open(os.path.join(staging, "_SUCCESS"), "wb").close()
    if os.path.exists(target):
        aside = f"{target}.old-{uuid.uuid4().hex[:12]}"
        os.replace(target, aside)
        os.replace(staging, target)
        shutil.rmtree(aside)
    else:
        os.replace(staging, target)
    return uri


def summary(rows: list[dict]) -> dict[str, int]:
    files: dict[str, str] = {}
    matched = set()
    n = 0
    for r in rows:
        files[r["query_path"]] = r["query_status"]
        if r["image_id"] is not None:
            matched.add(r["query_path"])
            n += 1
    out = {"query_files": len(files), "query_matches": n, "query_files_matched": len(matched)}
    for status in ("ok", "error", "skipped"):
        out[f"query_files_{status}"] = sum(1 for s in files.values() if s == status)
    return out


def format_report(rows: list[dict], metrics: dict, path: str, uri: str, limit: int = 200) -> str:
    lines = []
    current = None
    for r in rows[:limit]:
        if r["query_path"] != current:
            current = r["query_path"]
            # repr(): names from the inputs are shown as data, control characters escaped.
            head = f"{current!r}"
            if r["query_status"] != "ok":
                lines.append(f"{head}: {r['query_status']}: {r['query_error']}")
                continue
            lines.append(head + ("" if r["image_id"] is not None else ": no match"))
        if r["image_id"] is not None:
            score = "" if r.get("score") is None else f"  p={r['score']:.3f}"
            lines.append(f"  {r['similarity']:.3f}{score}  {r['path']!r} ({r['image_id']})")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more rows in the matches table")
    lines.append(f"files: {metrics['query_files']}  ok: {metrics['query_files_ok']}  error: {metrics['query_files_error']}"
                 f"  skipped: {metrics['query_files_skipped']}; with a match: {metrics['query_files_matched']}"
                 f"  ({metrics['query_matches']} matches)")
    phases = ", ".join(f"{k[:-len('_seconds')].replace('_', ' ')} {v:.1f} s" for k, v in metrics.items()
                       if k.endswith("_seconds") and k != "query_seconds")
    lines.append(f"{path} path, {metrics.get('query_seconds', 0):.1f} s{f' ({phases})' if phases else ''}; "
                 f"matches table: {uri}")
    return "\n".join(lines)
