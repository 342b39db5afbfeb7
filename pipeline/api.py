"""The Python API: one function per job, each returning a small result object.

>>> from pipeline import api
>>> result = api.run(input="photos/", workdir="work", threshold=0.9)   # doctest: +SKIP
>>> result.metrics["groups"], result.tables["groups"], result.mlflow_run_id  # doctest: +SKIP

Every function takes the job's main settings as keyword parameters; any other setting is a
``section__key=value`` keyword (``dedup__dba_k=0``), applied over ``config`` (a
:class:`~pipeline.config.Config`) or over the YAML file ``conf`` (default ``conf/default.yaml``).
Everything that needs no Spark is checked first (:func:`preflight`); then the function uses
the active Spark session, or starts one and stops it when done. Nothing is printed: the
``report`` of a result is the text the CLI shows.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from pyspark.sql import SparkSession

from pipeline import apply as apply_job
from pipeline import query as query_job
from pipeline.apply import ApplyResult
from pipeline.config import Config
from pipeline.query import QueryResult
from pipeline.core import storage
from pipeline.encoders import registry
from pipeline.evaluate import study
from pipeline.report import build as report_build
from pipeline.report.build import ReportResult
from pipeline.stages import incremental, progress, steps, tracking
from pipeline.stages.session import spark_session
from pipeline.stages.steps import TooManyErrors
from pipeline.train import classical as train_classical
from pipeline.train import cnn as train_cnn

__all__ = ["ApplyResult", "EvaluateResult", "JobResult", "QueryResult", "ReportResult", "TooManyErrors", "TrainResult",
           "apply", "dedup", "embed", "evaluate", "index", "ingest", "make_config", "preflight", "query", "report",
           "run", "train", "validate"]

JOBS = ("ingest", "embed", "index", "dedup", "evaluate", "train", "run", "report", "apply", "query")


@dataclass
class JobResult:
    """What a job did: its metrics (counts, seconds), the tables it wrote, its MLflow run.

    ``result["files_ok"]`` is ``result.metrics["files_ok"]``.
    """

    job: str
    metrics: dict[str, Any]
    tables: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    report: str = ""
    #: The settings the job ran with.
    config: Config | None = None

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metrics.get(key, default)


@dataclass
class EvaluateResult(JobResult):
    """One row per evaluated method (scores, speed, options), as in ``evaluate.json_out``."""

    results: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult(JobResult):
    """The learned artifact: a post-processing ``.npz`` or a classical vocabulary."""

    artifact: str = ""
    version: str = ""


# ------------------------------------------------------------------ config
def make_config(config: Config | None = None, conf: str | None = None, **settings: Any) -> Config:
    """``config`` (or the YAML ``conf``) with ``section__key=value`` settings; ``None`` values are ignored.

    Top-level keys are plain (``workdir=...``); nested ones use ``__`` (``dedup__threshold=0.9``).
    """
    base = config if config is not None else Config.load(conf)
    overrides = {k: v for k, v in settings.items() if v is not None}
    return base.with_overrides(**overrides) if overrides else base.with_overrides()


def _inputs(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [str(value)] if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) else [str(v) for v in value]


def validate(config: Config) -> Config:
    """The checks that need neither Spark nor a model: settings, then the encoder's own settings.

    Returns ``config`` (paths it names made absolute for the executors); raises ConfigError.
    """
    config.validate()
    registry.validate_settings(config)
    return config


def preflight(job: str, config: Config) -> Config:
    """Everything checkable before Spark starts, for ``job``: settings, inputs, the model loads.

    A typo or missing weights fail here in seconds, before any Spark or MLflow work. Returns
    the config the job runs with.
    """
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; one of {', '.join(JOBS)}")
    encoder = registry.encoder_for(config)
    if (job == "train" and encoder.learns == "vocabulary" and config.train.input
            and not config.classical.train_input):
        # ``train --method M --input DIR``: the folders are the method's training set.
        config = config.with_overrides(classical__train_input=config.train.input)
    validate(config)
    if job in ("ingest", "run"):
        steps.check_inputs(config)
    if job in ("embed", "run"):
        registry.encoder_for(config).preflight()
    elif job == "train":
        registry.encoder_for(config.with_overrides(embed__postprocess=None)).preflight()
    elif job == "evaluate":
        names = registry.expand_names(config.evaluate.backbones)
        for name in names:
            cfg = validate(config.with_overrides(embed__backbone=name))
            if len(names) > 1 and registry.ALL_BACKBONES in config.evaluate.backbones:
                continue  # --backbones all: a backbone without weights is timed, not refused
            registry.encoder_for(cfg.with_overrides(embed__postprocess=None)).preflight()
    return config


@contextlib.contextmanager
def _spark(config: Config, spark: SparkSession | None) -> Iterator[SparkSession]:
    if spark is not None:
        yield spark
        return
    with spark_session(config) as session:  # reuses an active session; stops only one it started
        yield session


def _tables(config: Config, *names: str) -> dict[str, str]:
    wd = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    where = {"images": wd.images, "embeddings": wd.embeddings(method), "index": wd.index_dir(method),
             "pairs": wd.pairs(method), "groups": wd.groups(method)}
    return {n: where[n] for n in names}


# -------------------------------------------------------------------- jobs
def ingest(input: str | Sequence[str] | None = None, workdir: str | None = None, *,
           max_error_fraction: float | None = None, config: Config | None = None, conf: str | None = None,
           spark: SparkSession | None = None, **settings: Any) -> JobResult:
    """List image files and write the image table (one row per file: ok, error or skipped).

    Parameters
    ----------
    input : str or list of str
        Folders or files (local paths or Hadoop URIs). Sets ``ingest.input``.
    workdir : str
        Where the tables go. Sets ``workdir``.
    max_error_fraction : float
        Fail (:class:`TooManyErrors`) when more files than this fraction cannot be read.
    config, conf, spark, **settings
        Base config, YAML file, Spark session to use, other settings (``section__key=value``).

    Returns
    -------
    JobResult
        ``metrics``: ``files_total``, ``files_ok``, ``files_error``, ``files_skipped``, changes since
        the previous ingest, ``ingest_seconds``; ``tables["images"]``; ``report``: the summary.
    """
    cfg = preflight("ingest", make_config(config, conf, workdir=workdir, ingest__input=_inputs(input),
                                          max_error_fraction=max_error_fraction, **settings))
    with _spark(cfg, spark) as session:
        with tracking.mlflow_run(cfg, "ingest", tags={"job": "ingest"}) as run:
            metrics, report = steps.ingest_step(session, cfg)
    return JobResult("ingest", metrics, _tables(cfg, "images"), run.info.run_id, report, cfg)


def embed(workdir: str | None = None, *, backbone: str | None = None, weights: str | None = None,
          batch_size: int | None = None, incremental: bool = True, config: Config | None = None,
          conf: str | None = None, spark: SparkSession | None = None, **settings: Any) -> JobResult:
    """Embed the image table with an encoder (CNN backbone, ``.keras`` file or classical method).

    Parameters
    ----------
    workdir : str
        The workdir holding the image table.
    backbone : str
        ``embed.backbone``: a backbone name, a ``.keras`` path or a classical method.
    weights : str
        ``imagenet``, ``none`` (timing only) or a weights file.
    batch_size : int
        Images per network call.
    incremental : bool
        Reuse the rows of unchanged images from the previous table of the same encoder.
    config, conf, spark, **settings
        As for :func:`ingest`.

    Returns
    -------
    JobResult
        ``metrics``: ``embeddings_ok``, ``embed_errors``, ``images_embedded``, reused / new / changed /
        deleted counts, ``embedding_dim``, ``images_per_second``; ``tables["embeddings"]``.
    """
    cfg = preflight("embed", make_config(config, conf, workdir=workdir, embed__backbone=backbone,
                                         embed__weights=weights, embed__batch_size=batch_size, **settings))
    with _spark(cfg, spark) as session:
        with tracking.mlflow_run(cfg, f"embed-{storage.tag_of(cfg.embed.backbone)}", tags={"job": "embed"}) as run:
            metrics, report, _ = steps.embed_step(session, cfg, incremental)
    return JobResult("embed", metrics, _tables(cfg, "embeddings"), run.info.run_id, report, cfg)


def index(workdir: str | None = None, *, backbone: str | None = None, type: str | None = None,
          shards: int | None = None, config: Config | None = None, conf: str | None = None,
          spark: SparkSession | None = None, **settings: Any) -> JobResult:
    """Build the sharded FAISS index from an embedding table.

    Parameters
    ----------
    workdir, backbone
        The embedding table to index.
    type : str
        ``index.type``: auto (default: exact while small, IVF sized from N and
        ``index.max_memory`` above), flat, ivf_flat, ivf_sq, ivf_pq or hnsw.
    shards : int
        ``index.shards`` (0: derived from ``index.max_memory``).
    config, conf, spark, **settings
        As for :func:`ingest`.

    Returns
    -------
    JobResult
        ``metrics``: ``index_vectors``, ``index_shards``, ``index_seconds``; ``tables["index"]``.
    """
    cfg = preflight("index", make_config(config, conf, workdir=workdir, embed__backbone=backbone,
                                         index__type=type, index__shards=shards, **settings))
    with _spark(cfg, spark) as session:
        with tracking.mlflow_run(cfg, f"index-{storage.tag_of(cfg.embed.backbone)}", tags={"job": "index"}) as run:
            metrics = steps.index_step(session, cfg)
    return JobResult("index", metrics, _tables(cfg, "index"), run.info.run_id, "", cfg)


def dedup(workdir: str | None = None, *, backbone: str | None = None, threshold: float | None = None,
          k: int | None = None, config: Config | None = None, conf: str | None = None,
          spark: SparkSession | None = None, **settings: Any) -> JobResult:
    """Search every image against the index; write the pairs and groups tables. Never deletes files.

    Parameters
    ----------
    workdir, backbone
        The index (and embedding table) to search.
    threshold : float
        ``dedup.threshold``: the expected pair precision (a pair is kept when its calibrated
        probability of being a duplicate is at least this); a cosine with ``dedup__score="cosine"``.
    k : int
        ``dedup.k``: neighbours searched per image.
    config, conf, spark, **settings
        As for :func:`ingest`.

    Returns
    -------
    JobResult
        ``metrics``: ``pairs``, ``groups``, ``images_in_groups``, ``images_to_remove``,
        ``dedup_seconds``; ``tables["pairs"]``, ``tables["groups"]``; ``report``: the largest groups.
    """
    cfg = preflight("dedup", make_config(config, conf, workdir=workdir, embed__backbone=backbone,
                                         dedup__threshold=threshold, dedup__k=k, **settings))
    with _spark(cfg, spark) as session:
        with tracking.mlflow_run(cfg, f"dedup-{storage.tag_of(cfg.embed.backbone)}", tags={"job": "dedup"}) as run:
            metrics = incremental.dedup_step(session, cfg, rebuild_index=False)
            report = steps.format_groups(session, cfg)
    return JobResult("dedup", metrics, _tables(cfg, "pairs", "groups"), run.info.run_id, report, cfg)


def run(input: str | Sequence[str] | None = None, workdir: str | None = None, *, backbone: str | None = None,
        threshold: float | None = None, k: int | None = None, config: Config | None = None,
        conf: str | None = None, spark: SparkSession | None = None, **settings: Any) -> JobResult:
    """ingest -> embed -> index -> dedup, in one MLflow run holding every stage's metrics.

    Parameters
    ----------
    input, workdir
        As for :func:`ingest`.
    backbone, threshold, k
        As for :func:`embed` and :func:`dedup`.
    config, conf, spark, **settings
        As for :func:`ingest`.

    Returns
    -------
    JobResult
        The metrics of every stage (see :func:`ingest`, :func:`embed`, :func:`index`, :func:`dedup`),
        every table, and ``report``: the ingest summary, the embed line and the largest groups.
    """
    cfg = preflight("run", make_config(config, conf, workdir=workdir, ingest__input=_inputs(input),
                                       embed__backbone=backbone, dedup__threshold=threshold, dedup__k=k,
                                       **settings))
    with _spark(cfg, spark) as session:
        with tracking.mlflow_run(cfg, f"run-{storage.tag_of(cfg.embed.backbone)}", tags={"job": "run"}) as run_:
            metrics: dict[str, Any] = {}
            ingested, ingest_report = steps.ingest_step(session, cfg)
            metrics.update(ingested)
            embedded, embed_report, cfg = steps.embed_step(session, cfg)
            metrics.update(embedded)
            metrics.update(incremental.dedup_step(session, cfg, rebuild_index=True))
            groups = steps.format_groups(session, cfg)
            metrics["mlflow_run_id"] = run_.info.run_id
    return JobResult("run", metrics, _tables(cfg, "images", "embeddings", "index", "pairs", "groups"),
                     run_.info.run_id, "\n".join([ingest_report, embed_report, groups]), cfg)


def evaluate(input: str | None = None, workdir: str | None = None, *, dataset: str | None = None,
             methods: Sequence[str] | None = None, weights: str | None = None, json_out: str | None = None,
             config: Config | None = None, conf: str | None = None, spark: SparkSession | None = None,
             **settings: Any) -> EvaluateResult:
    """Score backbones and classical methods on UKBench (N-S) or Holidays (mAP), with their speed.

    Parameters
    ----------
    input : str
        The dataset folder (images and ``groundtruth.csv``). Sets ``evaluate.input``.
    workdir : str
        Where the tables go.
    dataset : str
        ``ukbench`` or ``holidays``.
    methods : list of str
        Backbones, ``.keras`` files and classical methods; ``all`` and ``all-classical`` expand.
    weights : str
        ``embed.weights`` for the backbones.
    json_out : str
        Also write the results as JSON here.
    config, conf, spark, **settings
        As for :func:`ingest`.

    Returns
    -------
    EvaluateResult
        ``results``: one dict per method (scores, seconds, images per second, options, MLflow run
        id); ``report``: the comparison and study tables.
    """
    cfg = preflight("evaluate", make_config(
        config, conf, workdir=workdir, evaluate__input=input, evaluate__dataset=dataset,
        evaluate__backbones=list(methods) if methods is not None else None, embed__weights=weights,
        evaluate__json_out=json_out, **settings))
    with _spark(cfg, spark) as session:
        results, report = study.evaluate(session, cfg)
    return EvaluateResult("evaluate", {}, {"images": storage.Workdir.of(cfg.workdir).images}, None, report, cfg,
                          results=results)


def train(input: str | Sequence[str] | None = None, workdir: str | None = None, *, backbone: str | None = None,
          name: str | None = None, dim: int | None = None, power: float | None = None, output: str | None = None,
          config: Config | None = None, conf: str | None = None, spark: SparkSession | None = None,
          **settings: Any) -> TrainResult:
    """Learn what an encoder is trained with, on a collection that is NOT the one you search.

    For a CNN: the embedding post-processing (PCA-whitening, optional projection head). For a
    classical method (``backbone="vlad-ssr"``): its vocabulary / GMM.

    Parameters
    ----------
    input : str or list of str
        The training collection. Sets ``train.input``.
    workdir : str
        Where the training tables and artifacts go.
    backbone : str
        The encoder to train for (``embed.backbone``).
    name, dim, power, output
        ``train.name``, ``train.dim``, ``train.power``, ``train.output`` (post-processing only).
    config, conf, spark, **settings
        As for :func:`ingest`.

    Returns
    -------
    TrainResult
        ``artifact`` (path or URI), ``version``, ``metrics``, ``mlflow_run_id``.
    """
    cfg = preflight("train", make_config(config, conf, workdir=workdir, train__input=_inputs(input),
                                         embed__backbone=backbone, train__name=name, train__dim=dim,
                                         train__power=power, train__output=output, **settings))
    with _spark(cfg, spark) as session:
        if registry.encoder_for(cfg).learns == "vocabulary":
            out = train_classical.train_job(session, cfg)
            artifact, version = out["uri"], out["version"]
        else:
            out = train_cnn.train(session, cfg)
            artifact, version = out["artifact"], out["version"]
    report = out.pop("report", "")
    return TrainResult("train", out, {}, out.get("mlflow_run_id"), report, cfg, artifact=artifact, version=version)


def report(workdir: str | None = None, *, backbone: str | None = None, out: str | None = None,
           config: Config | None = None, conf: str | None = None, spark: SparkSession | None = None,
           **settings: Any) -> ReportResult:
    """Write the static HTML review report of a workdir's groups and log it to MLflow.

    Parameters
    ----------
    workdir, backbone
        The groups to show (``dedup`` or ``run`` must have written them).
    out : str
        The report folder (``report.out``; default ``<workdir>/report``). Replaced whole.
    config, conf, spark, **settings
        As for :func:`ingest`; ``report__groups_per_page``, ``report__thumb_px`` ...

    Returns
    -------
    ReportResult
        ``url`` (file:// of index.html), ``out_dir``, ``groups``, ``images_to_remove``,
        ``thumbnails``, ``pages``, ``mlflow_run_id``; ``report``: what the CLI prints.
    """
    cfg = preflight("report", make_config(config, conf, workdir=workdir, embed__backbone=backbone,
                                          report__out=out, **settings))
    with _spark(cfg, spark) as session:
        return report_build.build_report(session, cfg, progress=progress.Bar(cfg.progress))


def apply(workdir: str | None = None, *, mode: str | None = None, target: str | None = None,
          execute: bool | None = None, undo: str | None = None, backbone: str | None = None,
          config: Config | None = None, conf: str | None = None, **settings: Any) -> ApplyResult:
    """Turn the keep decisions into file actions: a dry run (plan CSV) unless ``execute``. Never deletes.

    Parameters
    ----------
    workdir, backbone
        The groups to act on.
    mode : str
        ``report`` (plan only), ``move`` (to the ``target`` quarantine folder, relative paths
        kept), ``hardlink`` or ``symlink`` (the duplicate replaced by a link to the kept file,
        its bytes moved to ``target``).
    target : str
        The quarantine folder; the plan CSV and the journal are written there.
    execute : bool
        Act (journaled). Files whose size or SHA-256 changed since ingest are refused.
    undo : str
        A journal of an earlier execution: restore everything it did, instead.
    config, conf, **settings
        As for :func:`ingest`. No Spark: the tables are read from Parquet directly.

    Returns
    -------
    ApplyResult
        ``planned``, ``planned_bytes``, ``plan_csv``, ``journal``, ``done``, ``done_bytes``, ``refused``
        (reason -> count); ``report``: what the CLI prints.
    """
    cfg = preflight("apply", make_config(config, conf, workdir=workdir, embed__backbone=backbone,
                                         apply__mode=mode, apply__target=target, apply__execute=execute,
                                         apply__undo=undo, **settings))
    return apply_job.apply(cfg)


def query(input: str | Sequence[str] | None = None, workdir: str | None = None, *, backbone: str | None = None,
          threshold: float | None = None, k: int | None = None, config: Config | None = None,
          conf: str | None = None, spark: SparkSession | None = None, **settings: Any) -> QueryResult:
    """Near-duplicates of new image files in the archive of ``workdir``, without rebuilding anything.

    Parameters
    ----------
    input : str or list of str
        New files or folders to check. Sets ``query.input``.
    workdir : str
        The archive's workdir (its index, and the state its last dedup wrote).
    backbone, threshold, k
        ``embed.backbone``, ``dedup.threshold``, ``dedup.k`` (matches kept per file).
    config, conf, spark, **settings
        As for :func:`ingest`; ``query__max_light_files``, ``query__force_path`` (auto, light, spark).

    Returns
    -------
    QueryResult
        ``rows``: the matches table (query_path, query_status, query_error, image_id, path,
        similarity, score (calibrated, else None), rank; every input file at least once), ``tables["matches"]``, ``path``
        (light: no Spark, or spark), ``metrics`` (files by status, matches, seconds).
    """
    cfg = validate(make_config(config, conf, workdir=workdir, query__input=_inputs(input), embed__backbone=backbone,
                               dedup__threshold=threshold, dedup__k=k, **settings))
    return query_job.query(cfg, spark=spark)
