"""The ``train`` job: learn the embedding post-processing on an image collection.

The image table is read back through petastorm (``make_batch_reader``, column batches),
embedded on the driver with the configured descriptor (``embed.*``, no post-processing),
and a PCA-whitening is fitted (``train.dim``, ``train.power``: 0 = centring only,
0.5 = full whitening; ``train.shrinkage``). The artifact is a ``.npz`` (no pickle),
written under the workdir and logged to MLflow under ``postprocess/``; ``embed`` uses it
through ``embed.postprocess`` = its path or the run id.

Optionally (``train.head_dim`` > 0, issue 3) a linear projection head is trained after the
whitening with an NT-Xent loss on augmented views of the training images (frozen backbone,
:func:`attach_head`) and stored in the same artifact. Measured (ukbench-dev 120 images ->
holidays-dev, mobilenet default descriptor): it does not help (0.8895 -> 0.8695 mAP at
256-d, 10 epochs; worse with more epochs), so it is off by default.

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

from pipeline import schemas as S
from pipeline.encoders import backbones
from pipeline.core import augment, image_source, imageio, vectors, whitening
from pipeline.encoders import cnn
from pipeline.core import storage
from pipeline.stages import steps, tracking
from pipeline.config import Config, ConfigError

log = logging.getLogger(__name__)


def training_workdir(config: Config) -> str:
    """The training collection gets its own image table, beside (not over) the searched one."""
    return storage.Workdir.of(config.workdir).training(config.train.name).root


def read_descriptors(config: Config) -> tuple[list[str], np.ndarray, float]:
    """Read the image table with petastorm into tf.data and embed it; returns ids, X, seconds."""
    ids, X, _, seconds = read_descriptors_and_views(config, views=0)
    return ids, X, seconds


def read_descriptors_and_views(config: Config, views: int) -> tuple[list[str], np.ndarray, np.ndarray | None, float]:
    """:func:`read_descriptors` plus ``views`` augmented views per image (:func:`augmented_view`),
    embedded the same way: returns ids, X ``(n, d)``, V ``(n, views, d)`` or None, seconds."""
    from petastorm import make_batch_reader

    url = storage.Workdir.of(config.workdir).images
    model = backbones.load_embedding_model(cnn.model_key(config))
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    view_vectors: list[np.ndarray] = []
    rng = np.random.default_rng(config.train.head_seed)
    started = time.perf_counter()
    fields = [S.IMAGE_ID, S.CONTENT, S.PATH, S.CONTENT_SHA256, S.STATUS]
    with make_batch_reader(url, schema_fields=fields, num_epochs=1,
                           workers_count=1, reader_pool_type="dummy") as reader:
        for batch in reader:  # column batches (numpy); only ok rows are images
            keep = [i for i, status in enumerate(batch.status) if _text(status) == S.STATUS_OK]
            if not keep:
                continue
            # Stored bytes, else the file read from its path (ingest.store_content: false).
            contents = image_source.sources([batch.content[i] for i in keep], [_text(batch.path[i]) for i in keep],
                                       [_text_or_none(batch.content_sha256[i]) for i in keep])
            out, errors = cnn.embed_contents(model, contents, config.embed.batch_size, config.ingest.max_pixels)
            ok = [j for j, err in enumerate(errors) if err is None]
            if views and ok:
                extra, keep_ok = embed_views(model, [contents[j] for j in ok], views, rng, config)
                ok = [j for j, good in zip(ok, keep_ok) if good]
                view_vectors.extend(extra)
            for j in ok:
                ids.append(_text(batch.image_id[keep[j]]))
                vectors.append(out[j])
    seconds = time.perf_counter() - started
    if len(vectors) < 2:
        raise ConfigError(f"train: {len(vectors)} usable images in {url}; need at least 2")
    V = np.stack(view_vectors).astype(np.float32) if views else None
    return ids, np.stack(vectors).astype(np.float32), V, seconds


# ------------------------------------------------------------ projection head (issue 3)

def augmented_view(image, rng: np.random.Generator):
    """One self-supervised near-duplicate of a PIL image: one or two random edits among
    crop (random box), half rescale, JPEG 25, brightness, colour shift, 7-degree rotation
    (:mod:`pipeline.core.augment`)."""

    def random_crop(im):
        w, h = im.size
        f = rng.uniform(0.6, 0.9)
        cw, ch = max(1, int(w * f)), max(1, int(h * f))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return im.crop((x0, y0, x0 + cw, y0 + ch))

    edits = [random_crop, augment.crop, augment.rescale, augment.jpeg, augment.brighter, augment.colour_shift,
             augment.rotate]
    for k in rng.choice(len(edits), size=int(rng.integers(1, 3)), replace=False):
        image = edits[int(k)](image)
    return image


def embed_views(model, contents: list[bytes], views: int, rng: np.random.Generator,
                config: Config) -> tuple[list[np.ndarray], list[bool]]:
    """Embed ``views`` augmented copies of each encoded image (same model, same descriptor).
    Returns one ``(views, d)`` array per image that worked, and which images worked."""
    import io

    encoded: list[bytes] = []
    for content in contents:
        # The same robust decode as the embed stage: EXIF orientation, any mode, pixel limit.
        try:
            image = imageio.decode_rgb(content, max_pixels=config.ingest.max_pixels)
        except imageio.ImageDecodeError:
            encoded.extend([b""] * views)  # empty bytes fail in embed_contents: image marked bad
            continue
        for _ in range(views):
            buf = io.BytesIO()
            augmented_view(image, rng).save(buf, "JPEG", quality=92)
            encoded.append(buf.getvalue())
    out, errors = cnn.embed_contents(model, encoded, config.embed.batch_size, config.ingest.max_pixels)
    result, good = [], []
    for i in range(len(contents)):
        rows = slice(i * views, (i + 1) * views)
        ok = all(e is None for e in errors[rows])
        good.append(ok)
        if ok:
            result.append(np.stack(out[rows]))
    return result, good


HEAD_BATCH = 64
HEAD_LEARNING_RATE = 1e-3


def nt_xent(a, b, temperature: float):
    """NT-Xent (SimCLR) loss of a batch of positive pairs ``(a_i, b_i)``; every other row
    of either side is a negative. ``a``, ``b``: L2-normalised ``(B, k)`` tensors."""
    import tensorflow as tf

    z = tf.concat([a, b], axis=0)
    n = tf.shape(a)[0]
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    logits = logits - 1e9 * tf.eye(2 * n)
    labels = tf.concat([tf.range(n, 2 * n), tf.range(0, n)], axis=0)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def fit_head(Z: np.ndarray, V: np.ndarray, head_dim: int, epochs: int, temperature: float,
             seed: int = 0) -> tuple[np.ndarray, list[float], float, float]:
    """Train a linear head ``W`` (``head_dim x d``, no bias) on whitened descriptors.

    ``Z``: ``(n, d)`` originals, ``V``: ``(n, views, d)`` their augmented views. Each epoch
    pairs every image's original or a view with another of its views (shuffled batches of
    :data:`HEAD_BATCH`, Adam). ``W`` starts as the first ``head_dim`` coordinates (the top
    principal directions after a PCA whitening). Returns W, the per-epoch mean training
    losses, and the loss on a fixed pairing (original, first view) before and after.
    """
    import tensorflow as tf

    n, d = Z.shape
    rng = np.random.default_rng(seed)
    tf.random.set_seed(seed)
    init = np.zeros((head_dim, d), np.float32)
    init[np.arange(min(head_dim, d)), np.arange(min(head_dim, d))] = 1.0
    if head_dim > d:
        init[d:] = rng.normal(0, 1 / np.sqrt(d), (head_dim - d, d))
    W = tf.Variable(init)
    opt = tf.keras.optimizers.Adam(HEAD_LEARNING_RATE)
    all_views = np.concatenate([Z[:, None], V], axis=1).astype(np.float32)  # (n, 1 + views, d)

    def project(x):
        return vectors.l2_normalize_tf(tf.matmul(x, W, transpose_b=True))

    @tf.function(reduce_retracing=True)
    def step(a, b):
        with tf.GradientTape() as tape:
            loss = nt_xent(project(a), project(b), temperature)
        opt.apply_gradients([(tape.gradient(loss, W), W)])
        return loss

    def fixed_loss() -> float:
        losses = [float(nt_xent(project(Z[i:i + HEAD_BATCH]), project(V[i:i + HEAD_BATCH, 0]), temperature))
                  for i in range(0, n, HEAD_BATCH) if min(n, i + HEAD_BATCH) - i >= 2]
        return float(np.mean(losses))

    before = fixed_loss()
    history = []
    for _ in range(epochs):
        order = rng.permutation(n)
        first = rng.integers(0, all_views.shape[1], n)
        second = (first + rng.integers(1, all_views.shape[1], n)) % all_views.shape[1]  # a different view
        losses = []
        for i in range(0, n, HEAD_BATCH):
            rows = order[i:i + HEAD_BATCH]
            if len(rows) < 2:
                continue
            losses.append(float(step(tf.constant(all_views[rows, first[rows]]),
                                     tf.constant(all_views[rows, second[rows]]))))
        history.append(float(np.mean(losses)))
    return W.numpy().astype(np.float32), history, before, fixed_loss()


def attach_head(config: Config, w: whitening.Whitening, X: np.ndarray,
                V: np.ndarray) -> tuple[whitening.Whitening, dict[str, float]]:
    """Fit the projection head on whitened originals + views and store it in the artifact."""
    t = config.train
    Z = w.apply(X)
    Zv = w.apply(V.reshape(-1, V.shape[-1])).reshape(V.shape[0], V.shape[1], -1)
    head, history, before, after = fit_head(Z, Zv, t.head_dim, t.head_epochs, t.head_temperature, t.head_seed)
    params = {**w.params, "head": {"dim": t.head_dim, "epochs": t.head_epochs, "temperature": t.head_temperature,
                                   "augmentations": t.head_augmentations, "seed": t.head_seed,
                                   "loss_before": before, "loss_after": after}}
    version = whitening._whitening_hash(w.mean, w.projection, params, head)
    w = dataclasses.replace(w, dim=t.head_dim, params=params, version=version, head=head)
    return w, {"head_initial_loss": before, "head_final_loss": after,
               "head_final_train_loss": history[-1] if history else float("nan")}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _text_or_none(value: Any) -> str | None:
    return None if value is None else _text(value)


def fit(config: Config, X: np.ndarray) -> whitening.Whitening:
    t = config.train
    dim = min(t.dim, X.shape[1]) if t.dim else None
    if dim is None and t.power == 0:
        dim = X.shape[1]  # centring (+ rotation): nothing is amplified, so keep every dimension
    elif dim is not None and t.power > 0 and t.shrinkage == 0 and dim > X.shape[0] - 1:
        dim = X.shape[0] - 1
    w = whitening.fit_pca_whitening(X, dim=dim, shrinkage=t.shrinkage, power=t.power)
    key = dataclasses.asdict(cnn.model_key(config))
    params = {**w.params, "descriptor": {k: v for k, v in key.items() if k not in ("postprocess", "postprocess_version")}}
    params["descriptor"]["scales"] = list(params["descriptor"]["scales"])
    version = whitening._whitening_hash(w.mean, w.projection, params)
    return dataclasses.replace(w, params=params, version=version)


def train(spark, config: Config) -> dict[str, Any]:
    """Ingest ``train.input`` (if given) into a training workdir, fit, save, log to MLflow.

    Returns the artifact path, its version and metrics, and ``report`` (a line for people).
    """
    inputs = list(config.train.input)
    cfg = config.with_overrides(embed__postprocess=None, embed__rotation=0)
    if inputs:
        cfg = cfg.with_overrides(workdir=training_workdir(config), ingest__input=inputs)
        steps.check_inputs(cfg)
    import mlflow

    nested = mlflow.active_run() is not None
    with tracking.mlflow_run(config if not nested else cfg, f"train-{storage.tag_of(config.train.name)}",
                             nested=nested, tags={"job": "train"}) as run:
        metrics: dict[str, Any] = {}
        if inputs:
            metrics.update(steps.ingest_step(spark, cfg)[0])
        head_dim = config.train.head_dim
        ids, X, V, seconds = read_descriptors_and_views(cfg, config.train.head_augmentations if head_dim else 0)
        w = fit(cfg, X)
        if head_dim:
            w, head_metrics = attach_head(cfg, w, X, V)
            metrics.update({**head_metrics, "head_dim": head_dim, "head_epochs": config.train.head_epochs})
        out = config.train.output or storage.Workdir.of(config.workdir).postprocess_file(config.train.name, w.version)
        local = storage.local_path_of(out)
        if local is not None:
            os.makedirs(os.path.dirname(local), exist_ok=True)
            w.save(local)
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                w.save(os.path.join(tmp, "w.npz"))
                with open(os.path.join(tmp, "w.npz"), "rb") as fh:
                    storage.write_bytes(out, fh.read())
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
        result["report"] = (f"post-processing {w.version}: {w.dim}-d, learned on {len(ids)} images -> "
                            f"{result['artifact']} (MLflow run {run.info.run_id}; use --set "
                            "embed.postprocess=<that path or run id>)")
        return result
