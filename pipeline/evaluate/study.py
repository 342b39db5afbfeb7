"""The ``evaluate`` job: the pipeline on a labelled dataset, scored like the reference study.

UKBench: N-S score (top-4, query included). Holidays: mAP over the ``XXXX00`` queries, each
query removed from its own ranking. Both: precision and recall of the dedup pairs at the
configured threshold, their precision-recall curve (:mod:`.pairs`, a PNG in MLflow and in the
workdir for the report) and the operating point. ``mixed``: several labelled folders
searched as one collection (``evaluate.input`` + ``evaluate.mixed_with``, ground truth
merged), scored by pairs only. One MLflow parent run, one nested run per backbone.
"""
from __future__ import annotations

import csv
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import SparkSession

from pipeline import schemas as S
from pipeline.config import Config, ConfigError
from pipeline.core import metrics as M
from pipeline.core import storage
from pipeline.encoders import backbones, postprocess, registry
from pipeline.evaluate import pairs as pair_eval
from pipeline.evaluate import report
from pipeline.stages import search, steps, tables, tracking
from pipeline.stages.vocabulary import prepare as vocabulary_prepare
from pipeline.stages.timing import timed
from pipeline.train import cnn as train_job

log = logging.getLogger(__name__)

# mAP is computed over the top results only; enough for every relevant image in these sets.
MAX_RANKING = 1000


@dataclass
class GroundTruth:
    dataset: str
    group_of: dict[str, str]  # filename -> group
    queries: list[str] = field(default_factory=list)  # holidays only

    def relevant(self) -> dict[str, list[str]]:
        members: dict[str, list[str]] = {}
        for name, group in self.group_of.items():
            members.setdefault(group, []).append(name)
        return {q: [m for m in members[self.group_of[q]] if m != q] for q in self.queries}


def load_ground_truth(dataset: str, input_dir: str) -> GroundTruth:
    """Read ``groundtruth.csv`` (the format of ../shared/data)."""
    path = os.path.join(storage.local_path_of(input_dir) or input_dir, "groundtruth.csv")
    if not os.path.exists(path):
        raise ConfigError(f"{dataset}: no groundtruth.csv in {input_dir}")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    group_of = {r["filename"]: str(r["group"]) for r in rows}
    queries = [r["filename"] for r in rows if r.get("is_query") == "1"]
    if dataset == "holidays" and not queries:
        raise ConfigError(f"holidays ground truth in {path} has no is_query=1 rows")
    return GroundTruth(dataset, group_of, queries)


def merged_ground_truth(folders: list[str]) -> GroundTruth:
    """Several datasets as one collection: each folder's groups kept apart (``folder:group``)."""
    group_of: dict[str, str] = {}
    for folder in folders:
        name = posixpath.basename(folder.rstrip("/"))
        truth = load_ground_truth("mixed", folder)
        clash = set(truth.group_of) & set(group_of)
        if clash:
            raise ConfigError(f"evaluate mixed: file names in several datasets, e.g. {sorted(clash)[0]!r}")
        group_of.update({f: f"{name}:{g}" for f, g in truth.group_of.items()})
    return GroundTruth("mixed", group_of)


def score(dataset: str, truth: GroundTruth, rankings: dict[str, list[str]]) -> dict[str, float]:
    if dataset == "mixed":
        return {}  # pairs only: the rankings' metrics belong to one dataset's protocol
    if dataset == "ukbench":
        return {"ns_score": M.ns_score(rankings, truth.group_of, top=4)}
    relevant = truth.relevant()
    return {"map": M.mean_average_precision(rankings, relevant),
            "map_inria_trapezoid": M.mean_average_precision(rankings, relevant, trapezoid=True)}


def collect_rankings(neighbors, name_of: dict[str, str]) -> dict[str, list[str]]:
    """kNN rows -> {query filename: [neighbour filenames by rank]} (evaluation sets are small)."""
    rankings: dict[str, list[tuple[int, str]]] = {}
    for r in neighbors.select(S.QUERY_ID, S.NEIGHBOR_ID, S.RANK).toLocalIterator():
        rankings.setdefault(name_of[r[S.QUERY_ID]], []).append((r[S.RANK], name_of[r[S.NEIGHBOR_ID]]))
    return {q: [n for _, n in sorted(v)] for q, v in rankings.items()}


def weights_available(cfg: Config) -> bool:
    """Whether the configured weights load (ImageNet weights cached or downloadable)."""
    if cfg.embed.weights == "none":
        return True
    try:
        registry.encoder_for(cfg.with_overrides(embed__postprocess=None)).preflight()
        return True
    except backbones.WeightsUnavailableError as exc:
        log.warning("%s: %s -- timing only, with weights=none", cfg.embed.backbone, exc)
        return False


def evaluate(spark: SparkSession, config: Config) -> tuple[list[dict[str, Any]], str]:
    """Every method of ``evaluate.backbones`` on the dataset; returns one result per method and the tables."""
    ev = config.evaluate
    if not ev.input:
        raise ConfigError("evaluate needs --input DIR (a dataset folder with groundtruth.csv)")
    folders = [ev.input, *ev.mixed_with]
    truth = merged_ground_truth(folders) if ev.dataset == "mixed" else load_ground_truth(ev.dataset, ev.input)
    config = config.with_overrides(ingest__input=folders)
    results: list[dict[str, Any]] = []
    with tracking.mlflow_run(config, f"evaluate-{ev.dataset}", tags={"job": "evaluate", "dataset": ev.dataset}):
        ingest_metrics, _ = steps.ingest_step(spark, config)
        images = tables.read_table(spark, storage.Workdir.of(config.workdir).images, "image table")
        name_of = {r[S.IMAGE_ID]: posixpath.basename(r[S.PATH]) for r in images.select(S.IMAGE_ID, S.PATH).collect()}
        n_images = sum(1 for name in name_of.values() if name in truth.group_of)
        for backbone in registry.expand_names(ev.backbones):
            cfg = config.with_overrides(embed__backbone=backbone)
            cfg.validate()
            if not weights_available(cfg):
                results.append(_time_backbone(spark, cfg.with_overrides(embed__weights="none"), n_images,
                                              ingest_metrics))
                continue
            results.append(_evaluate_backbone(spark, cfg, truth, name_of, n_images, ingest_metrics))
        table = format_table(results)
        curves = "\n".join(f"{storage.tag_of(r['method'])}: {pair_eval.format_curve(r['pair_curve'])}\n"
                            f"  curve: {r['pr_curve_png']}" for r in results if r.get("pair_curve"))
        table = f"{table}\n{curves}" if curves else table
        tracking.log_text_artifact(table, "comparison.txt")
        study = report.study_table(results, config.classical.compare_with)
        tracking.log_text_artifact(study, "study_table.txt")
        tracking.log_dict_artifact(results, "results.json")
    if ev.json_out:
        storage.write_json(storage.absolute_uri(ev.json_out), results)
    return results, f"{table}\n{study}"


def _evaluate_backbone(spark, cfg: Config, truth: GroundTruth, name_of: dict[str, str], n_images: int,
                       ingest_metrics: dict[str, Any]) -> dict[str, Any]:
    backbone = cfg.embed.backbone
    with tracking.mlflow_run(cfg, storage.tag_of(backbone), nested=True, tags={"backbone": backbone}) as run:
        import mlflow

        encoder = registry.encoder_for(cfg)
        learns_postprocess = encoder.learns == "postprocess"
        m: dict[str, Any] = {}
        trained = None
        if not encoder.reranking:
            # Searched as published: no rotations or re-ranking.
            cfg = encoder.search_config()
        if not learns_postprocess:
            # A vocabulary is trained (or reused) here, so the result can name it.
            encoder, train_metrics = vocabulary_prepare(spark, registry.encoder_for(cfg))
            cfg = encoder.config
            m.update(train_metrics)
        elif cfg.evaluate.train_input:
            # The post-processing is learned on ANOTHER collection, never on the evaluated one.
            train_name = f"{storage.tag_of(backbone)}-{storage.tag_of(posixpath.basename(cfg.evaluate.train_input.rstrip('/')))}"
            trained = train_job.train(spark, cfg.with_overrides(train__input=[cfg.evaluate.train_input],
                                                                train__name=train_name))
            cfg = cfg.with_overrides(embed__postprocess=trained["artifact"])
            encoder = registry.encoder_for(cfg)
            m["train_seconds"] = trained.get("ingest_seconds", 0.0) + trained["train_embed_seconds"]
        mlflow.log_params({
            "backbone": backbone, "weights": cfg.embed.weights,
            **encoder.mlflow_params(),
            # A vocabulary's training set and artifact are logged by stages.vocabulary.prepare.
            **({} if not learns_postprocess else {
                "postprocess_version": trained["version"] if trained else (
                    _postprocess_version(cfg) if cfg.embed.postprocess else "none"),
                "train_input": cfg.evaluate.train_input or "none"}),
            "index_type": cfg.index.type, "threshold": cfg.dedup.threshold,
            "spark_master": spark.sparkContext.master, "dataset": cfg.evaluate.dataset,
            "timing_only": False,
        })
        if trained:
            mlflow.log_artifact(trained["artifact"], "postprocess")
        m.update(steps.embed_step(spark, cfg, incremental=False)[0])  # timings must be of real work
        m.update(steps.index_step(spark, cfg))
        k = 4 if cfg.evaluate.dataset == "ukbench" else min(MAX_RANKING, n_images)
        rankings: dict[str, list[str]] = {}
        with timed("search", m):
            if cfg.evaluate.dataset != "mixed":
                neighbors = search.search_neighbors(spark, cfg, k).localCheckpoint()
                rankings = collect_rankings(neighbors, name_of)
        rankings = {q: [n for n in v if n in truth.group_of] for q, v in rankings.items() if q in truth.group_of}
        scores = score(cfg.evaluate.dataset, truth, rankings)
        m.update(steps.dedup_step(spark, cfg))
        workdir = storage.Workdir.of(cfg.workdir)
        pairs = tables.read_table(spark, workdir.pairs(backbone), "pairs table").collect()
        predicted = [(name_of[r[S.IMAGE_ID_A]], name_of[r[S.IMAGE_ID_B]]) for r in pairs]
        precision, recall = M.pair_precision_recall(predicted, M.true_pairs(truth.group_of))
        scores.update({"pair_precision": precision, "pair_recall": recall})
        threshold = float(storage.read_metadata(workdir.pairs(backbone)).get("threshold", cfg.dedup.threshold))
        curve = pair_eval.pair_curves(spark, cfg, name_of, truth.group_of, threshold)
        png = pair_eval.curve_png(curve, _local_file(workdir.evaluation_file(backbone, "pr_curve.png")),
                                  f"{storage.tag_of(backbone)} on {cfg.evaluate.dataset} ({n_images} images): pairs")
        mlflow.log_artifact(png)
        tracking.log_metrics(scores)
        return {
            "dataset": cfg.evaluate.dataset,
            "method": backbone,
            "weights": cfg.embed.weights,
            "images": n_images,
            "queries": len(truth.queries) if cfg.evaluate.dataset == "holidays" else len(rankings),
            **scores,
            "threshold": cfg.dedup.threshold,
            "score": curve["score"],
            "operating_point": curve["operating_point"],
            "pair_curve": curve,
            "pr_curve_png": png,
            "embed_seconds": m["embed_seconds"],
            "images_per_second": m["images_per_second"],
            "index_seconds": m["index_seconds"],
            "dedup_seconds": m["dedup_seconds"],
            "ingest_seconds": ingest_metrics["ingest_seconds"],
            "search_seconds": m["search_seconds"],
            "train_seconds": m.get("train_seconds", 0.0),
            "embedding_dim": m["embedding_dim"],
            "options": encoder.mlflow_params(),
            "timing_only": False,
            "mlflow_run_id": run.info.run_id,
            **encoder.result_extras(),
        }


def _local_file(uri: str) -> str:
    """A local path for ``uri`` (remote workdirs: a temporary file; the PNG is also in MLflow)."""
    local = storage.local_path_of(uri)
    if local is None:
        import tempfile

        local = os.path.join(tempfile.mkdtemp(prefix="neardup-eval-"), posixpath.basename(uri))
    return local


def _postprocess_version(cfg: Config) -> str:
    return postprocess.resolve(cfg)[1]


def _time_backbone(spark, cfg: Config, n_images: int, ingest_metrics: dict[str, Any]) -> dict[str, Any]:
    """A backbone without ImageNet weights: embed with random weights to time it; no accuracy."""
    backbone = cfg.embed.backbone
    cfg = cfg.with_overrides(embed__postprocess=None)
    with tracking.mlflow_run(cfg, storage.tag_of(backbone), nested=True,
                             tags={"backbone": backbone, "timing_only": "true"}) as run:
        import mlflow

        mlflow.log_params({"backbone": backbone, "weights": "none", **registry.encoder_for(cfg).mlflow_params(),
                           "dataset": cfg.evaluate.dataset, "timing_only": True,
                           "spark_master": spark.sparkContext.master})
        m = steps.embed_step(spark, cfg, incremental=False)[0]
        return {
            "dataset": cfg.evaluate.dataset, "method": backbone, "weights": "none", "images": n_images,
            "queries": 0, "timing_only": True,
            "embed_seconds": m["embed_seconds"], "images_per_second": m["images_per_second"],
            "ingest_seconds": ingest_metrics["ingest_seconds"], "embedding_dim": m["embedding_dim"],
            "options": registry.encoder_for(cfg).mlflow_params(), "mlflow_run_id": run.info.run_id,
        }


def format_table(results: list[dict[str, Any]]) -> str:
    """The reference study's backbone table: method, accuracy, speed."""
    header = f"{'method':<22} {'dataset':<9} {'images':>6} {'N-S':>6} {'mAP':>6} {'P@thr':>6} {'R@thr':>6} {'img/s':>7} {'embed s':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        if r.get("timing_only"):
            lines.append(f"{storage.tag_of(r['method']):<22} {r['dataset']:<9} {r['images']:>6} {'timing only (no ImageNet weights)':>34} "
                         f"{r['images_per_second']:>7.1f} {r['embed_seconds']:>8.1f}")
            continue
        ns = f"{r['ns_score']:.3f}" if "ns_score" in r else "-"
        mp = f"{r['map']:.3f}" if "map" in r else "-"
        lines.append(
            f"{storage.tag_of(r['method']):<22} {r['dataset']:<9} {r['images']:>6} {ns:>6} {mp:>6} "
            f"{r['pair_precision']:>6.3f} {r['pair_recall']:>6.3f} {r['images_per_second']:>7.1f} {r['embed_seconds']:>8.1f}"
        )
    return "\n".join(lines)
