"""Stage: fit a classical method's vocabulary / GMM on a training collection, in Spark.

``neardup train --method vlad-ssr --input DIR [DIR ...]`` (or ``classical.train_input``):

1. the training folders are listed and described as an image table (the ingest stage's
   own :func:`pipeline.stages.ingest.build_image_table`, never written: it is not the corpus);
2. SIFT / RootSIFT descriptors are extracted in Spark, one pandas UDF call per batch of
   images, and committed as a descriptor table under
   ``<workdir>/train_descriptors/<listing>-<sift settings>/``, so every method with the same
   SIFT settings (bow, vlad, fisher ...) reuses one extraction;
3. the driver reads the descriptors back and fits (FAISS k-means, scikit-learn GMM);
4. the artifact is written as ``<workdir>/artifacts/<method>/<version>.npz`` (version: the
   content hash of :class:`pipeline.core.classical.Artifact`) with a ``<version>.json`` beside it,
   and logged to MLflow.

A second request with the same method, options, training files (paths, sizes, mtimes) and
training settings reuses the artifact instead of training again
(``artifacts/<method>/by-key/<key>.json`` points at it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd

from pipeline.core import classical, image_source
from pipeline.encoders.base import Encoder
from pipeline.encoders.classical import decode, load_method, options_for
from pipeline.core import storage
from pipeline.stages import tables
from pipeline.config import Config, ConfigError

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    method: str
    uri: str
    version: str
    reused: bool
    train_input: list[str]
    n_images: int
    seconds: float
    training: dict[str, Any] = field(default_factory=dict)


def _listing(spark, inputs: list[str]) -> list[tuple[str, int, str]]:
    from pipeline.stages import ingest

    files = []
    for uri in inputs:
        for f in ingest.list_files(uri, True, spark):
            files.append((f.path, f.size_bytes, str(f.modification_time)))
    if not files:
        raise ConfigError(f"classical.train_input: no files under {', '.join(inputs)}")
    return sorted(set(files))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_key(name: str, params: dict[str, Any], listing_key: str, config: Config) -> str:
    c = config.classical
    return _digest([name, params, listing_key, c.max_descriptors, c.seed, c.niter, classical.ENCODING_VERSION])


def artifact_dir(config: Config, name: str) -> str:
    return storage.Workdir.of(config.workdir).artifacts(name)


def train(spark, config: Config, name: str) -> TrainResult:
    """Train ``name`` on ``classical.train_input`` (or reuse the same training's artifact)."""
    started = time.perf_counter()
    inputs = [storage.absolute_uri(p) for p in config.classical.train_input]
    if not inputs:
        raise ConfigError(f"train {name}: no training collection; pass --input DIR or set classical.train_input")
    options = options_for(config, name)
    method = classical.get_method(name, **options)
    listing = _listing(spark, inputs)
    listing_key = _digest(listing)
    key = training_key(name, method.params, listing_key, config)
    folder = artifact_dir(config, name)
    pointer = f"{folder}/by-key/{key}.json"
    if storage.file_exists(pointer):
        meta = storage.read_json(pointer)
        if storage.file_exists(meta["uri"]):
            log.info("%s: reusing artifact %s (same training set and settings)", name, meta["uri"])
            result = TrainResult(name, meta["uri"], meta["version"], True, inputs, meta.get("n_images", 0),
                                 time.perf_counter() - started, meta.get("training", {}))
            _log(result, None)
            return result

    if method.needs_training:
        per_image = training_descriptors(spark, config, method, inputs, listing_key)
        art = method.fit_descriptors(per_image, max_descriptors=config.classical.max_descriptors,
                                     seed=config.classical.seed, niter=config.classical.niter,
                                     description=",".join(inputs))
        n_images = len(per_image)
    else:
        art = method.fit([])
        n_images = 0
    art.training.update({"train_input": inputs, "n_files": len(listing), "training_key": key,
                         "listing_key": listing_key})
    uri = f"{folder}/{art.version}.npz"
    with tempfile.TemporaryDirectory() as tmp:
        local = art.save(os.path.join(tmp, f"{art.version}.npz"))
        with open(local, "rb") as fh:
            storage.write_bytes(uri, fh.read())
        result = TrainResult(name, uri, art.version, False, inputs, n_images, time.perf_counter() - started,
                             art.training)
        meta = {**asdict(result), "params": art.params, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        storage.write_json(f"{folder}/{art.version}.json", meta)
        storage.write_json(pointer, meta)
        _log(result, local)
    log.info("%s: trained on %d images in %.1f s -> %s", name, n_images, result.seconds, uri)
    return result


def _log(result: TrainResult, local_npz: str | None) -> None:
    """Params, metrics and the artifact file into the active MLflow run (if any)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    log_params({
        "train_method": result.method, "train_artifact_version": result.version,
        "train_artifact_uri": result.uri, "train_input": ",".join(result.train_input),
        "train_images": result.n_images, "train_reused": result.reused,
    })
    metrics = {"train_seconds": result.seconds}
    for k in ("n_descriptors_sampled", "n_descriptors_total", "fit_seconds"):
        if isinstance(result.training.get(k), (int, float)):
            metrics[f"train_{k}"] = float(result.training[k])
    mlflow.log_metrics(metrics)
    if local_npz is not None:
        mlflow.log_artifact(local_npz, artifact_path=f"classical/{storage.tag_of(result.method)}")


# ----------------------------------------------------------- descriptors
DESCRIPTOR_SCHEMA = "image_id string, n int, descriptors binary, error string"


def training_descriptors(spark, config: Config, method: classical.LocalDescriptorMethod, inputs: list[str],
                         listing_key: str) -> list[np.ndarray]:
    """Per-image SIFT descriptors of the training collection, extracted in Spark and cached."""
    from pyspark.sql import functions as F

    from pipeline import schemas as S
    from pipeline.stages import ingest

    p = method.params
    sift = {"max_side": int(p["max_side"]), "nfeatures": int(p["nfeatures"]), "rootsift": bool(p["rootsift"])}
    uri = storage.Workdir.of(config.workdir).train_descriptors(f"{listing_key}-{_digest(sift)}")
    if not tables.is_committed(spark, uri):
        cfg = config.with_overrides(ingest__input=list(inputs))
        images = (ingest.build_image_table(spark, cfg).where(F.col(S.STATUS) == S.STATUS_OK)
                  .select(S.IMAGE_ID, S.CONTENT, S.PATH, S.CONTENT_SHA256))
        images = images.repartition(max(2, 2 * spark.sparkContext.defaultParallelism))
        max_pixels = config.ingest.max_pixels
        name = method.name

        def extract(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            m = load_method(name, None, {k: v for k, v in p.items()})
            for batch in batches:
                out = {"image_id": [], "n": [], "descriptors": [], "error": []}
                contents = image_source.sources(batch[S.CONTENT], batch[S.PATH], batch[S.CONTENT_SHA256])
                for image_id, content in zip(batch[S.IMAGE_ID], contents):
                    try:
                        d = m.extractor(decode(content, m, max_pixels))
                        out["descriptors"].append(np.ascontiguousarray(d, dtype=np.float32).tobytes())
                        out["n"].append(len(d))
                        out["error"].append(None)
                    except Exception as exc:
                        out["descriptors"].append(None)
                        out["n"].append(0)
                        out["error"].append(f"{type(exc).__name__}: {exc}")
                    out["image_id"].append(image_id)
                yield pd.DataFrame(out)

        started = time.perf_counter()
        tables.write_table(images.mapInPandas(extract, schema=DESCRIPTOR_SCHEMA), uri)
        log.info("extracted training descriptors in %.1f s -> %s", time.perf_counter() - started, uri)
    table = tables.read_table(spark, uri, "training descriptor table")
    per_image = []
    failed = 0
    for row in table.orderBy("image_id").toLocalIterator():
        if row["error"] is not None:
            failed += 1
            continue
        per_image.append(np.frombuffer(row["descriptors"], dtype=np.float32).reshape(-1, 128))
    if failed:
        log.warning("%d training images could not be read and were left out", failed)
    if not per_image:
        raise ValueError(f"no training image yielded descriptors under {', '.join(inputs)}")
    return per_image


def prepare(spark, encoder: Encoder) -> tuple[Encoder, dict[str, Any]]:
    """Train (or reuse) what ``encoder`` needs before the embed timing starts.

    Returns the encoder that names its artifact, and metrics; records the encoder's training
    params (which artifact, which training set) in the active MLflow run.
    """
    metrics: dict[str, Any] = {}
    if encoder.needs_training:
        if not encoder.config.classical.train_input:
            encoder.preflight()  # raises the explanatory ConfigError
        started = time.perf_counter()
        result = train(spark, encoder.config, encoder.name)
        metrics["train_seconds"] = time.perf_counter() - started
        metrics["train_reused"] = float(result.reused)
        encoder = encoder.with_artifact(result.uri)
    log_params(encoder.training_params())
    return encoder, metrics


def log_params(params: dict[str, Any]) -> None:
    """Log params to the active MLflow run, if any (values cut to MLflow's length limit)."""
    import mlflow

    if params and mlflow.active_run() is not None:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
