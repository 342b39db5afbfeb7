"""Stage 2: image table -> embedding table, with a pandas UDF per executor Python worker.

The per-batch work is the plain function :func:`embed_contents` (testable without Spark);
the UDF only wraps it. The model is cached per Python worker (see
:func:`pipeline.backbones.load_embedding_model`) and fed fixed-size chunks.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline import backbones, schemas as S, store
from pipeline.config import Config

log = logging.getLogger(__name__)

EMBED_RESULT = T.StructType([
    T.StructField(S.EMBEDDING, T.ArrayType(T.FloatType(), False), True),
    T.StructField(S.ERROR, T.StringType(), True),
])


def model_key(config: Config) -> backbones.ModelKey:
    e = config.embed
    return backbones.ModelKey(
        backbone=e.backbone,
        weights=e.weights,
        layer=e.layer,
        preprocess=backbones.preprocess_mode_of(e.backbone, e.preprocess),
        input_size=backbones.input_size_of(e.backbone, e.input_size),
    )


def decode_for_model(content: bytes, side: int, max_pixels: int) -> np.ndarray:
    """Bytes -> (side, side, 3) uint8, squashed like the reference study's Keras loader."""
    from PIL import Image

    from pipeline import imageio

    image = imageio.decode_rgb(content, min_size=(side, side), max_pixels=max_pixels)
    if image.size != (side, side):
        image = image.resize((side, side), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


# One decode thread pool per Python worker: PIL releases the GIL while decoding and
# resizing, so the next chunk decodes while TensorFlow runs the current one.
_DECODE_POOL: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor:
    global _DECODE_POOL
    if _DECODE_POOL is None:
        _DECODE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
    return _DECODE_POOL


def _decode_chunk(contents: Sequence[bytes], side: int, max_pixels: int):
    pixels = np.zeros((len(contents), side, side, 3), dtype=np.uint8)
    errors: list[str | None] = [None] * len(contents)
    for i, content in enumerate(contents):
        try:
            pixels[i] = decode_for_model(content, side, max_pixels)
        except Exception as exc:  # a bad image is a recorded row, never a failed job
            errors[i] = f"decode failed: {exc}"
    return pixels, errors


def embed_contents(model, contents: Sequence[bytes], batch_size: int, max_pixels: int) -> tuple[list, list]:
    """Embed a list of encoded images; returns (embeddings or None, errors or None) per image."""
    side = model.key.input_size
    chunks = [contents[i:i + batch_size] for i in range(0, len(contents), batch_size)]
    pool = _decode_pool()
    embeddings: list[np.ndarray | None] = []
    errors: list[str | None] = []
    pending = pool.submit(_decode_chunk, chunks[0], side, max_pixels) if chunks else None
    for n, _ in enumerate(chunks):
        pixels, chunk_errors = pending.result()
        if n + 1 < len(chunks):
            pending = pool.submit(_decode_chunk, chunks[n + 1], side, max_pixels)
        ok = [i for i, e in enumerate(chunk_errors) if e is None]
        vectors = model(_pad(pixels[ok], batch_size)) if ok else np.zeros((0, model.dim), np.float32)
        it = iter(vectors[: len(ok)])
        for err in chunk_errors:
            if err is None:
                embeddings.append(next(it))
                errors.append(None)
            else:
                embeddings.append(None)
                errors.append(err)
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
    marker = (store.local_path_of(store.Workdir.of(config.workdir).join("_fault_injected"))
              if fail_once_on else None)

    @F.pandas_udf(EMBED_RESULT)
    def embed_udf(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
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
    from pipeline import classical

    if classical.is_classical(config.embed.backbone):
        from pipeline import classical_stage

        return classical_stage.build_embedding_table(spark, config, images)
    ok = images.where(F.col(S.STATUS) == S.STATUS_OK).select(S.IMAGE_ID, S.CONTENT)
    # At least one partition per core, so a small corpus still uses every executor core.
    n = max(ok.rdd.getNumPartitions(), spark.sparkContext.defaultParallelism)
    ok = ok.repartition(n)
    result = make_embed_udf(config)(F.col(S.IMAGE_ID), F.col(S.CONTENT))
    return (
        ok.select(F.col(S.IMAGE_ID), result.alias("r"))
        .select(
            F.col(S.IMAGE_ID),
            F.lit(store.tag_of(config.embed.backbone)).alias(S.BACKBONE),
            F.col("r." + S.EMBEDDING).alias(S.EMBEDDING),
            F.when(F.col("r." + S.ERROR).isNull(), F.lit(S.STATUS_OK)).otherwise(F.lit(S.STATUS_ERROR)).alias(S.STATUS),
            F.col("r." + S.ERROR).alias(S.ERROR),
        )
    )


def check_model_loads(config: Config) -> int:
    """Load the backbone on the driver before any Spark work: missing weights fail in seconds.

    Returns the embedding dimension.
    """
    from pipeline import classical

    if classical.is_classical(config.embed.backbone):
        from pipeline import classical_stage

        return classical_stage.check_method(config)
    return backbones.load_embedding_model(model_key(config)).dim


def embed(spark: SparkSession, config: Config) -> dict:
    """Write the embedding table for ``config.embed.backbone``; returns counts."""
    workdir = store.Workdir.of(config.workdir)
    images = store.read_table(spark, workdir.images, "image table")
    table = build_embedding_table(spark, config, images)
    target = workdir.embeddings(config.embed.backbone)
    store.write_table(table, target)
    written = store.read_table(spark, target, "embedding table")
    counts = {r[S.STATUS]: r["count"] for r in written.groupBy(S.STATUS).count().collect()}
    log.info("embedded with %s: %s", config.embed.backbone, counts)
    return counts
