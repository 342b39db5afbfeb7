"""The ``train`` job: learn the embedding post-processing on an image collection.

The image table is read back through petastorm (``make_batch_reader``, column batches),
embedded on the driver with the configured descriptor (``embed.*``, no post-processing),
and a PCA-whitening is fitted (``train.dim``, ``train.power``: 0 = centring only,
0.5 = full whitening; ``train.shrinkage``). The artifact is a ``.npz`` (no pickle),
written under the workdir and logged to MLflow under ``postprocess/``; ``embed`` uses it
through ``embed.postprocess`` = its path or the run id.

Learn it on a collection that is NOT the one you search (e.g. train on ukbench-dev,
search holidays-dev): the point is that it carries to new images.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from pipeline import backbones, descriptors, embed as em, schemas as S, store, tracking
from pipeline.config import Config, ConfigError

log = logging.getLogger(__name__)


def training_workdir(config: Config) -> str:
    """The training collection gets its own image table, beside (not over) the searched one."""
    return store.Workdir.of(config.workdir).join("train", store.tag_of(config.train.name))


def read_descriptors(config: Config) -> tuple[list[str], np.ndarray, float]:
    """Read the image table with petastorm into tf.data and embed it; returns ids, X, seconds."""
    from petastorm import make_batch_reader

    url = store.Workdir.of(config.workdir).images
    model = backbones.load_embedding_model(em.model_key(config))
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    started = time.perf_counter()
    with make_batch_reader(url, schema_fields=[S.IMAGE_ID, S.CONTENT, S.STATUS], num_epochs=1,
                           workers_count=1, reader_pool_type="dummy") as reader:
        for batch in reader:  # column batches (numpy); rows whose content is null are error rows
            keep = [i for i, status in enumerate(batch.status)
                    if _text(status) == S.STATUS_OK and batch.content[i] is not None]
            if not keep:
                continue
            contents = [bytes(batch.content[i]) for i in keep]
            out, errors = em.embed_contents(model, contents, config.embed.batch_size, config.ingest.max_pixels)
            for i, v, err in zip(keep, out, errors):
                if err is None:
                    ids.append(_text(batch.image_id[i]))
                    vectors.append(v)
    seconds = time.perf_counter() - started
    if len(vectors) < 2:
        raise ConfigError(f"train: {len(vectors)} usable images in {url}; need at least 2")
    return ids, np.stack(vectors).astype(np.float32), seconds


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def fit(config: Config, X: np.ndarray) -> descriptors.Whitening:
    t = config.train
    dim = min(t.dim, X.shape[1]) if t.dim else None
    if dim is None and t.power == 0:
        dim = X.shape[1]  # centring (+ rotation): nothing is amplified, so keep every dimension
    elif dim is not None and t.power > 0 and t.shrinkage == 0 and dim > X.shape[0] - 1:
        dim = X.shape[0] - 1
    w = descriptors.fit_pca_whitening(X, dim=dim, shrinkage=t.shrinkage, power=t.power)
    key = dataclasses.asdict(em.model_key(config))
    params = {**w.params, "descriptor": {k: v for k, v in key.items() if k not in ("postprocess", "postprocess_version")}}
    params["descriptor"]["scales"] = list(params["descriptor"]["scales"])
    version = descriptors._whitening_hash(w.mean, w.projection, params)
    return dataclasses.replace(w, params=params, version=version)


def train(spark, config: Config) -> dict[str, Any]:
    """Ingest ``train.input`` (if given) into a training workdir, fit, save, log to MLflow."""
    from pipeline import workflow

    inputs = list(config.train.input)
    cfg = config.with_overrides(embed__postprocess=None, embed__rotation=0)
    if inputs:
        cfg = cfg.with_overrides(workdir=training_workdir(config), ingest__input=inputs)
        workflow.validate_inputs(cfg)
    import mlflow

    nested = mlflow.active_run() is not None
    with tracking.mlflow_run(config if not nested else cfg, f"train-{store.tag_of(config.train.name)}",
                             nested=nested, tags={"job": "train"}) as run:
        metrics: dict[str, Any] = {}
        if inputs:
            metrics.update(workflow.ingest_stage(spark, cfg))
        ids, X, seconds = read_descriptors(cfg)
        w = fit(cfg, X)
        out = config.train.output or store.Workdir.of(config.workdir).join(
            "postprocess", f"{store.tag_of(config.train.name)}-{w.version}.npz")
        local = store.local_path_of(out)
        if local is not None:
            os.makedirs(os.path.dirname(local), exist_ok=True)
            w.save(local)
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                w.save(os.path.join(tmp, "w.npz"))
                with open(os.path.join(tmp, "w.npz"), "rb") as fh:
                    store.write_bytes(out, fh.read())
        if local is not None:
            mlflow.log_artifact(local, "postprocess")
        mlflow.log_params({"train.images": len(ids), "train.dim_out": w.dim, "train.version": w.version,
                           "train.input": ",".join(inputs)[:500]} if nested else
                          {"train.images": len(ids), "train.dim_out": w.dim, "train.version": w.version})
        metrics.update({"train_images": len(ids), "train_embed_seconds": seconds,
                        "train_images_per_second": len(ids) / seconds if seconds else 0.0})
        tracking.log_metrics(metrics)
        result = {"artifact": local or out, "version": w.version, "dim": w.dim, "images": len(ids),
                  "mlflow_run_id": run.info.run_id, **metrics}
        print(f"post-processing {w.version}: {w.dim}-d, learned on {len(ids)} images -> {result['artifact']} "
              f"(MLflow run {run.info.run_id}; use --set embed.postprocess=<that path or run id>)")
        return result
