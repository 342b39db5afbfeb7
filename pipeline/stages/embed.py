"""Stage 2: image table -> embedding table, with a pandas UDF per executor Python worker.

The per-batch work is the plain function :func:`embed_contents` (testable without Spark);
the UDF only wraps it. The model is cached per Python worker (see
:func:`pipeline.backbones.load_embedding_model`) and fed fixed-size chunks.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline import schemas as S
from pipeline.encoders import backbones
from pipeline.core import storage
from pipeline.stages import tables
from pipeline.config import Config

log = logging.getLogger(__name__)

EMBED_RESULT = T.StructType([
    T.StructField(S.EMBEDDING, T.ArrayType(T.FloatType(), False), True),
    T.StructField(S.ERROR, T.StringType(), True),
])


def model_key(config: Config) -> backbones.ModelKey:
    e = config.embed
    aspect = e.input == "aspect" and backbones.supports_any_size(e.backbone)
    uri, version = (None, None)
    if e.postprocess:
        from pipeline.encoders import postprocess

        uri, version = postprocess.resolve(config)
    return backbones.ModelKey(
        backbone=e.backbone,
        weights=e.weights,
        layer=e.layer,
        preprocess=backbones.preprocess_mode_of(e.backbone, e.preprocess),
        input_size=int(e.max_side) if aspect else backbones.input_size_of(e.backbone, e.input_size),
        pooling=e.pooling,
        input_mode="aspect" if aspect else "squash",
        max_side=int(e.max_side) if aspect else 0,
        size_multiple=int(e.size_multiple) if aspect else 0,
        scales=tuple(float(s) for s in e.scales),
        gem_p=float(e.gem_p) if e.pooling == "gem" else 0.0,
        rmac_levels=int(e.rmac_levels) if e.pooling == "rmac" else 0,
        trim_borders=bool(e.trim_borders),
        power_norm=float(e.power_norm),
        postprocess=uri,
        postprocess_version=version,
        rotation=int(e.rotation),
    )


def decode_for_model(content: bytes, side: int, max_pixels: int, *, mode: str = "squash",
                     trim: bool = False, rotation: int = 0, size_multiple: int = 16) -> np.ndarray:
    """Bytes -> uint8 pixels for the network.

    ``squash`` (the reference study's Keras loader): (side, side, 3). ``aspect``: the aspect
    ratio kept, the longest side ``side``, each side rounded to a multiple of
    ``size_multiple`` so that a collection yields a few distinct shapes to batch.
    ``trim`` crops plain-colour borders first; ``rotation`` rotates counter-clockwise.
    """
    image = _decode_image(content, side, max_pixels, trim, rotation)
    return _resized(image, side, mode, size_multiple)


def _decode_image(content: bytes, side: int, max_pixels: int, trim: bool, rotation: int):
    from PIL import Image

    from pipeline.core import descriptors
    from pipeline.core import imageio

    image = imageio.decode_rgb(content, min_size=(side, side), max_pixels=max_pixels)
    if trim:
        image = _trimmed(image, descriptors.content_box)
    if rotation:
        image = image.transpose({90: Image.ROTATE_90, 180: Image.ROTATE_180, 270: Image.ROTATE_270}[rotation])
    return image


def _trimmed(image, content_box):
    """Crop plain-colour borders; the box is found on a <= 512 px copy and scaled back."""
    w, h = image.size
    thumb = image
    if max(w, h) > 512:
        thumb = image.copy()
        thumb.thumbnail((512, 512))
    top, left, bottom, right = content_box(thumb)
    tw, th = thumb.size
    if (top, left, bottom, right) == (0, 0, th, tw):
        return image
    fx, fy = w / tw, h / th
    return image.crop((int(left * fx), int(top * fy), int(round(right * fx)), int(round(bottom * fy))))


def _resized(image, side: int, mode: str, size_multiple: int) -> np.ndarray:
    from PIL import Image

    if mode == "aspect":
        w, h = image.size
        s = side / max(w, h)
        m = max(1, size_multiple)
        size = (max(m, int(round(w * s / m)) * m), max(m, int(round(h * s / m)) * m))
    else:
        size = (side, side)
    if image.size != size:
        image = image.resize(size, Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _sides(key: backbones.ModelKey) -> list[int]:
    return [max(32, int(round(key.input_size * s))) for s in key.scales]


# One decode thread pool per Python worker: PIL releases the GIL while decoding and
# resizing, so the next chunk decodes while TensorFlow runs the current one.
_DECODE_POOL: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor:
    global _DECODE_POOL
    if _DECODE_POOL is None:
        _DECODE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
    return _DECODE_POOL


def _decode_chunk(contents: Sequence[bytes], key: backbones.ModelKey, max_pixels: int):
    """Decode a chunk: per image a list of pixel arrays (one per scale) or None, and errors."""
    sides = _sides(key)
    pixels: list[list[np.ndarray] | None] = [None] * len(contents)
    errors: list[str | None] = [None] * len(contents)
    for i, content in enumerate(contents):
        try:
            image = _decode_image(content, max(sides), max_pixels, key.trim_borders, key.rotation)
            pixels[i] = [_resized(image, side, key.input_mode, key.size_multiple) for side in sides]
        except Exception as exc:  # a bad image is a recorded row, never a failed job
            errors[i] = f"decode failed: {exc}"
    return pixels, errors


def embed_contents(model, contents: Sequence[bytes], batch_size: int, max_pixels: int) -> tuple[list, list]:
    """Embed a list of encoded images; returns (embeddings or None, errors or None) per image.

    Images are decoded on a thread pool while the network runs; same-shape images (every
    image in ``squash`` mode, a size bucket in ``aspect`` mode) go through the network
    together in chunks of ``batch_size``.
    """
    key = model.key
    n_scales = len(key.scales)
    pool = _decode_pool()
    chunks = [contents[i:i + batch_size] for i in range(0, len(contents), batch_size)]
    futures = [pool.submit(_decode_chunk, chunk, key, max_pixels) for chunk in chunks]
    pixels: list[list[np.ndarray] | None] = []
    errors: list[str | None] = []
    pooled = np.zeros((len(contents), n_scales, model.features_dim), np.float32)
    # Per scale and shape, rows waiting for a full batch.
    waiting: dict[tuple, list[int]] = {}

    def run(scale: int, shape: tuple, rows: list[int]) -> None:
        batch = np.stack([pixels[r][scale] for r in rows])
        if key.input_mode == "squash":
            batch = _pad(batch, batch_size)
        pooled[rows, scale] = model(batch)[: len(rows)]

    for future in futures:
        chunk_pixels, chunk_errors = future.result()
        start = len(pixels)
        pixels.extend(chunk_pixels)
        errors.extend(chunk_errors)
        for i, p in enumerate(chunk_pixels):
            if p is None:
                continue
            for s in range(n_scales):
                rows = waiting.setdefault((s, p[s].shape), [])
                rows.append(start + i)
                if len(rows) == batch_size:
                    run(s, p[s].shape, rows)
                    waiting[(s, p[s].shape)] = []
    for (s, shape), rows in waiting.items():
        if rows:
            run(s, shape, rows)
    ok = [i for i, e in enumerate(errors) if e is None]
    embeddings: list[np.ndarray | None] = [None] * len(contents)
    if ok:
        from pipeline.core import descriptors

        per_scale = pooled[ok]
        combined = per_scale[:, 0] if n_scales == 1 else descriptors.combine_scales(
            [per_scale[:, s] for s in range(n_scales)])
        final = model.postprocess(combined)
        for i, v in zip(ok, final):
            embeddings[i] = v
    return embeddings, errors


def _pad(pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Fixed-size chunks: the last, short chunk is padded so the graph sees one shape."""
    if len(pixels) == batch_size:
        return pixels
    pad = np.zeros((batch_size - len(pixels),) + pixels.shape[1:], dtype=pixels.dtype)
    return np.concatenate([pixels, pad])


def make_embed_udf(config: Config):
    key = model_key(config)
    batch_size = config.embed.batch_size
    max_pixels = config.ingest.max_pixels
    fail_once_on = config.embed.fail_once_on_image
    marker = (storage.local_path_of(storage.Workdir.of(config.workdir).join("_fault_injected"))
              if fail_once_on else None)

    threads = config.embed.tf_threads

    @F.pandas_udf(EMBED_RESULT)
    def embed_udf(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        backbones.configure_tensorflow_threads(threads)
        model = backbones.load_embedding_model(key)
        for ids, contents in batches:
            if fail_once_on is not None and fail_once_on in set(ids) and not os.path.exists(marker):
                _die_once(marker)
            vectors, errors = embed_contents(model, list(contents), batch_size, max_pixels)
            yield pd.DataFrame({
                S.EMBEDDING: [None if v is None else v.astype(np.float32) for v in vectors],
                S.ERROR: errors,
            })

    return embed_udf


def _die_once(marker: str) -> None:
    """Fault injection for the tests: kill this Python worker the first time only."""
    with open(marker, "w", encoding="utf-8") as fh:
        fh.write("worker killed once by embed.fail_once_on_image\n")
    log.warning("fault injection: killing Python worker %d", os.getpid())
    os._exit(17)


def build_embedding_table(spark: SparkSession, config: Config, images: DataFrame) -> DataFrame:
    """Embed every ok image of ``images`` (a frame with image_id, content_sha256, content).

    CNN backbones and classical methods differ only in the UDF; the table is the same.
    """
    from pipeline.core import classical

    if classical.is_classical(config.embed.backbone):
        from pipeline.stages import classical as classical_stage

        udf = classical_stage.embedding_udf(config)
        # SIFT is CPU-bound and per image: a few partitions per core even out slow images.
        partitions_per_core = 2
    else:
        udf = make_embed_udf(config)
        partitions_per_core = 1
    ok = images.where(F.col(S.STATUS) == S.STATUS_OK) if S.STATUS in images.columns else images
    ok = ok.select(S.IMAGE_ID, S.CONTENT_SHA256, S.CONTENT)
    # At least one partition per core, so a small corpus still uses every executor core.
    n = max(ok.rdd.getNumPartitions(), partitions_per_core * spark.sparkContext.defaultParallelism)
    result = udf(F.col(S.IMAGE_ID), F.col(S.CONTENT))
    return (
        ok.repartition(n)
        .select(F.col(S.IMAGE_ID), F.col(S.CONTENT_SHA256), result.alias("r"))
        .select(
            F.col(S.IMAGE_ID),
            F.col(S.CONTENT_SHA256),
            F.lit(storage.tag_of(config.embed.backbone)).alias(S.BACKBONE),
            F.col("r." + S.EMBEDDING).alias(S.EMBEDDING),
            F.when(F.col("r." + S.ERROR).isNull(), F.lit(S.STATUS_OK)).otherwise(F.lit(S.STATUS_ERROR)).alias(S.STATUS),
            F.col("r." + S.ERROR).alias(S.ERROR),
        )
    )


def check_model_loads(config: Config) -> int:
    """Load the backbone on the driver before any Spark work: missing weights fail in seconds.

    Returns the embedding dimension.
    """
    from pipeline.core import classical

    if classical.is_classical(config.embed.backbone):
        from pipeline.stages import classical as classical_stage

        return classical_stage.check_method(config)
    return backbones.load_embedding_model(model_key(config)).dim


# Embed settings that change how fast, not what, is computed.
_NOT_IN_FINGERPRINT = ("batch_size", "arrow_batch_rows", "fail_once_on_image", "tf_threads")


def model_fingerprint(config: Config) -> dict:
    """What decides an embedding besides the image bytes; committed with the embedding table.

    Every embed setting counts except those in ``_NOT_IN_FINGERPRINT`` (so a setting added
    later invalidates old embeddings by default rather than being silently ignored). A file a
    setting names (weights, model, post-processing) is identified by its size and modification
    time as well as its path, so replacing it in place invalidates the previous embeddings.
    """
    settings = {k: v for k, v in dataclasses.asdict(config.embed).items() if k not in _NOT_IN_FINGERPRINT}
    files = {}
    for value in settings.values():
        if isinstance(value, str) and value and os.path.isfile(value):
            st = os.stat(value)
            files[value] = [st.st_size, int(st.st_mtime_ns)]
    from pipeline.core import classical

    if classical.is_classical(config.embed.backbone):
        from pipeline.stages import classical as classical_stage

        name = config.embed.backbone
        artifact = classical_stage.artifact_uri(config, name)
        key = {"classical": name, "options": classical_stage.options_for(config, name), "artifact": artifact}
        if artifact and os.path.isfile(storage.local_path_of(artifact) or ""):
            st = os.stat(storage.local_path_of(artifact))
            files[artifact] = [st.st_size, int(st.st_mtime_ns)]
    else:
        key = dataclasses.asdict(model_key(config))
    return json.loads(json.dumps({"settings": settings, "model": key, "files": files,
                                  "max_pixels": config.ingest.max_pixels,
                                  "schema": S.EMBEDDING_TABLE.simpleString()}, sort_keys=True, default=str))


# Above this many images to (re-)embed, the ids to embed are joined normally instead of broadcast.
BROADCAST_LIMIT = 1_000_000


def _keys(compared: DataFrame, *kinds: str) -> DataFrame:
    keys = compared.where(F.col("kind").isin(*kinds)).select(S.IMAGE_ID, S.CONTENT_SHA256)
    # Broadcast the (image_id, sha256) keys so the rows they select, image bytes or vectors,
    # are filtered where they lie instead of being shuffled to a join.
    return F.broadcast(keys) if keys.count() <= BROADCAST_LIMIT else keys


def embed(spark: SparkSession, config: Config, incremental: bool = True) -> dict:
    """Write the embedding table for ``config.embed.backbone``; returns counts.

    Incremental: rows of a previous embedding table made by the same model are reused for
    images whose (image_id, content_sha256) is unchanged; only new and changed images go
    through the model. Counts: ok / error (rows of the table written), and reused / new /
    changed / deleted (against the previous table) and embedded (model calls this run).
    ``incremental=False`` embeds everything again (benchmarks that time the model want that).
    """
    workdir = storage.Workdir.of(config.workdir)
    images = tables.read_table(spark, workdir.images, "image table")
    target = workdir.embeddings(config.embed.backbone)
    tables.recover_table(spark, target)
    fingerprint = model_fingerprint(config)
    ok = images.where(F.col(S.STATUS) == S.STATUS_OK)
    previous = None
    if incremental and tables.is_committed(spark, target):
        if storage.read_metadata(target) == fingerprint:
            previous = tables.read_table(spark, target, "embedding table")
        else:
            log.info("previous embedding table at %s was made by another model or version: not reused", target)
    if previous is None:
        changes = {"reused": 0, "new": ok.count(), "changed": 0, "deleted": 0}
        table = build_embedding_table(spark, config, ok)
    else:
        current = ok.select(S.IMAGE_ID, S.CONTENT_SHA256)
        before = previous.select(S.IMAGE_ID, F.col(S.CONTENT_SHA256).alias("previous_sha256"))
        kind = (F.when(F.col("previous_sha256").isNull(), "new")
                .when(F.col(S.CONTENT_SHA256).isNull(), "deleted")
                .when(F.col(S.CONTENT_SHA256) == F.col("previous_sha256"), "reused")
                .otherwise("changed"))
        compared = current.join(before, S.IMAGE_ID, "full_outer").withColumn("kind", kind)
        compared = compared.localCheckpoint()  # compared once, used for the counts and the to-do list
        changes = {"reused": 0, "new": 0, "changed": 0, "deleted": 0}
        changes.update({r["kind"]: r["count"] for r in compared.groupBy("kind").count().collect()})
        todo = ok.join(_keys(compared, "new", "changed"), [S.IMAGE_ID, S.CONTENT_SHA256], "left_semi")
        kept = previous.join(_keys(compared, "reused"), [S.IMAGE_ID, S.CONTENT_SHA256], "left_semi")
        fresh = (build_embedding_table(spark, config, todo) if changes["new"] + changes["changed"]
                 else spark.createDataFrame([], S.EMBEDDING_TABLE))
        table = kept.select(*S.EMBEDDING_TABLE.fieldNames()).unionByName(fresh)
    tables.write_table(table, target, metadata=fingerprint)
    written = tables.read_table(spark, target, "embedding table")
    counts = {S.STATUS_OK: 0, S.STATUS_ERROR: 0}
    counts.update({r[S.STATUS]: r["count"] for r in written.groupBy(S.STATUS).count().collect()})
    counts.update(changes)
    counts["embedded"] = changes["new"] + changes["changed"]
    log.info("embedded with %s: %s", config.embed.backbone, counts)
    return counts
