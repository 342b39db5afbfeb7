"""CNN encoders: a ``keras.applications`` backbone (:mod:`pipeline.encoders.backbones`) or a
user's ``.keras`` file, pooled, normalised and optionally post-processed.

The per-batch work is the plain function :func:`embed_contents` (testable without Spark):
images are decoded on a thread pool while the network runs, and same-shape images go through
the network together. The model is cached per Python worker.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.config import Config, ConfigError, local_path_of
from pipeline.core import pooling, preprocess
from pipeline.encoders import backbones, postprocess, runtimes
from pipeline.encoders.base import Encoder

log = logging.getLogger(__name__)


def model_key(config: Config) -> backbones.ModelKey:
    e = config.embed
    aspect = e.input == "aspect" and backbones.supports_any_size(e.backbone)
    uri, version = (None, None)
    if e.postprocess:
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
        runtime=e.runtime,
        precision=e.precision,
    )


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


_TRANSPOSE = {90: 2, 180: 3, 270: 4}  # PIL Image.Transpose ROTATE_90 / ROTATE_180 / ROTATE_270


def needs_quarter_turns(width: int, height: int) -> bool:
    """Whether an image's 90/270-degree views are needed to find its sideways copies in an
    all-pairs search. Between an image and its copy turned by a quarter, one is at least as
    tall as wide; its turned views find the other, and pair scores take the better direction.
    Most photos are wider than tall, so this skips most of the cost of rotated views."""
    return height >= width


def _decode_chunk(contents: Sequence[bytes], key: backbones.ModelKey, max_pixels: int, views: Sequence[int],
                  one_side: bool = False):
    """Decode a chunk: per image a list of pixel arrays (per view, per scale; None: view skipped
    by ``one_side``) or None, and errors.

    A view is the decoded (and trimmed) image rotated by that many more degrees: the same
    pixels a separate pass with ``embed.rotation`` would give, for one decode.
    """
    sides = _sides(key)
    pixels: list[list[np.ndarray] | None] = [None] * len(contents)
    errors: list[str | None] = [None] * len(contents)
    for i, content in enumerate(contents):
        try:
            image = preprocess.decode_image(content, max(sides), max_pixels, key.trim_borders, key.rotation,
                                           key.input_mode)
            skip = one_side and not needs_quarter_turns(*image.size)
            pixels[i] = [None if skip and v in (90, 270) else
                         preprocess.resized(image if v == 0 else image.transpose(_TRANSPOSE[v]), side,
                                            key.input_mode, key.size_multiple) for v in views for side in sides]
        except Exception as exc:  # a bad image is a recorded row, never a failed job
            errors[i] = f"decode failed: {exc}"
    return pixels, errors


def embed_contents(model, contents: Sequence[bytes], batch_size: int, max_pixels: int) -> tuple[list, list]:
    """Embed a list of encoded images; returns (embeddings or None, errors or None) per image.

    Images are decoded on a thread pool while the network runs; same-shape images (every
    image in ``squash`` mode, a size bucket in ``aspect`` mode) go through the network
    together in chunks of ``batch_size``.
    """
    per_view, errors = embed_views(model, contents, batch_size, max_pixels, (0,))
    return per_view[0], errors


def embed_views(model, contents: Sequence[bytes], batch_size: int, max_pixels: int,
                views: Sequence[int], one_side: bool = False) -> tuple[list[list], list]:
    """:func:`embed_contents` for several rotated views of each image, decoded once.

    Returns (per view, the embeddings or None per image; errors or None per image).
    ``one_side``: quarter-turn views (90, 270) only of images at least as tall as wide (else
    None), see :func:`needs_quarter_turns`.
    """
    key = model.key
    n_scales = len(key.scales)
    n_slots = n_scales * len(views)
    pool = _decode_pool()
    chunks = [contents[i:i + batch_size] for i in range(0, len(contents), batch_size)]
    futures = [pool.submit(_decode_chunk, chunk, key, max_pixels, tuple(views), one_side) for chunk in chunks]
    pixels: list[list[np.ndarray] | None] = []
    errors: list[str | None] = []
    pooled = np.zeros((len(contents), n_slots, model.features_dim), np.float32)
    # Per (view, scale) slot and shape, rows waiting for a full batch.
    waiting: dict[tuple, list[int]] = {}

    def run(slot: int, shape: tuple, rows: list[int]) -> None:
        batch = np.stack([pixels[r][slot] for r in rows])
        if key.input_mode == "squash":
            batch = _pad(batch, batch_size)
        pooled[rows, slot] = model(batch)[: len(rows)]

    for future in futures:
        chunk_pixels, chunk_errors = future.result()
        start = len(pixels)
        pixels.extend(chunk_pixels)
        errors.extend(chunk_errors)
        for i, p in enumerate(chunk_pixels):
            if p is None:
                continue
            for s in range(n_slots):
                if p[s] is None:
                    continue
                rows = waiting.setdefault((s, p[s].shape), [])
                rows.append(start + i)
                if len(rows) == batch_size:
                    run(s, p[s].shape, rows)
                    waiting[(s, p[s].shape)] = []
    for (s, shape), rows in waiting.items():
        if rows:
            run(s, shape, rows)
    ok = [i for i, e in enumerate(errors) if e is None]
    out: list[list] = []
    for v in range(len(views)):
        embeddings: list[np.ndarray | None] = [None] * len(contents)
        have = [i for i in ok if pixels[i][v * n_scales] is not None]
        if have:
            per_scale = pooled[have][:, v * n_scales:(v + 1) * n_scales]
            combined = per_scale[:, 0] if n_scales == 1 else pooling.combine_scales(
                [per_scale[:, s] for s in range(n_scales)])
            for i, vec in zip(have, model.postprocess(combined)):
                embeddings[i] = vec
        out.append(embeddings)
    return out, errors


def _pad(pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Fixed-size chunks: the last, short chunk is padded so the graph sees one shape."""
    if len(pixels) == batch_size:
        return pixels
    pad = np.zeros((batch_size - len(pixels),) + pixels.shape[1:], dtype=pixels.dtype)
    return np.concatenate([pixels, pad])



@dataclass(frozen=True)
class CnnBatchEmbedder:
    """The per-batch function of a CNN encoder, as shipped to the executors (picklable)."""

    key: backbones.ModelKey
    batch_size: int
    max_pixels: int
    tf_threads: int
    choice: runtimes.RuntimeChoice = runtimes.RuntimeChoice()

    def __call__(self, contents: Sequence[bytes]) -> tuple[list, list]:
        model = runtimes.load(self.key, self.choice, self.tf_threads)
        return embed_contents(model, list(contents), self.batch_size, self.max_pixels)

    def views(self, contents: Sequence[bytes], views: Sequence[int], one_side: bool = False) -> tuple[list[list], list]:
        """Embeddings of several rotated views of each image, decoded once (rotated queries);
        ``one_side``: see :func:`embed_views`."""
        model = runtimes.load(self.key, self.choice, self.tf_threads)
        return embed_views(model, list(contents), self.batch_size, self.max_pixels, views, one_side)


class CnnEncoder(Encoder):
    """A ``keras.applications`` backbone of :data:`pipeline.encoders.backbones.REGISTRY`."""

    kind = "cnn"
    embeds_views = True

    def validate(self) -> None:
        e = self.config.embed
        if self.name not in backbones.REGISTRY:
            raise ConfigError(f"unknown backbone {self.name!r}; known: {', '.join(sorted(backbones.REGISTRY))}, "
                              "or a path to a .keras model file, or a classical method")
        if e.preprocess is not None and e.preprocess not in backbones.PREPROCESS_MODES:
            raise ConfigError(f"embed.preprocess must be one of {', '.join(backbones.PREPROCESS_MODES)}, "
                              f"got {e.preprocess!r}")
        if e.weights not in ("imagenet", "none"):
            if "://" not in e.weights and not Path(e.weights).is_file():
                raise ConfigError(f"embed.weights must be imagenet, none or an existing weights file, got {e.weights!r}")
            if "://" not in e.weights:
                # Executors resolve relative paths against their own working folder.
                e.weights = os.path.abspath(e.weights)

    def key(self) -> backbones.ModelKey:
        return model_key(self.config)

    def preflight(self) -> int:
        return backbones.load_embedding_model(self.key()).dim

    def fingerprint(self) -> dict[str, Any]:
        # int8 vectors (mean cosine 0.997 to fp32 now, 0.90 before the overflow fix on AVX2) are not
        # mixed with fp32 / bf16 ones, or with another quantization's, in one table. fp32 and bf16
        # keep the earlier fingerprint: an archive embedded before is not embedded again (hours at
        # 1M images on 2 cores) for vectors that did not change.
        e = self.config.embed
        int8 = e.runtime != "tensorflow" and runtimes.resolve_precision(e.precision) == "int8"
        return {**dataclasses.asdict(self.key()),
                **({"precision_used": "int8", "quantization": runtimes.QUANTIZATION} if int8 else {})}

    def runtime(self) -> runtimes.RuntimeChoice:
        """The inference runtime the executors use (decided here, on the driver; see :mod:`runtimes`)."""
        e = self.config.embed
        local = local_path_of(self.config.workdir)
        cache = runtimes.default_cache_dir(os.path.abspath(local) if local else None)
        choice = runtimes.prepare(self.key(), e.runtime, e.precision, cache, e.calibration_input,
                                  self.config.ingest.max_pixels, e.calibration_images)
        log.info("embed runtime for %s: %s %s (%s)", self.name, choice.runtime, choice.precision, choice.reason)
        return choice

    def embed_function(self) -> CnnBatchEmbedder:
        e = self.config.embed
        return CnnBatchEmbedder(self.key(), e.batch_size, self.config.ingest.max_pixels, e.tf_threads,
                                self.runtime())

    def mlflow_params(self) -> dict[str, Any]:
        """The descriptor and re-ranking options of a run (analysts compare runs by these)."""
        e, d = self.config.embed, self.config.dedup
        aspect = e.input == "aspect" and backbones.supports_any_size(e.backbone)
        return {
            "input": "aspect" if aspect else "squash",
            "max_side": e.max_side if aspect else None,
            "input_size": backbones.input_size_of(e.backbone, e.input_size) if not aspect else e.max_side,
            "scales": ",".join(f"{s:g}" for s in e.scales),
            "pooling": e.pooling, "gem_p": e.gem_p if e.pooling == "gem" else None,
            "rmac_levels": e.rmac_levels if e.pooling == "rmac" else None,
            "trim_borders": e.trim_borders, "power_norm": e.power_norm,
            "postprocess": e.postprocess or "none",
            "dba_k": d.dba_k, "dba_alpha": d.dba_alpha, "qe_k": d.qe_k, "qe_alpha": d.qe_alpha,
            "rotations": ",".join(str(r) for r in d.rotations),
            "runtime": e.runtime, "precision": e.precision,
        }


class ModelFileEncoder(CnnEncoder):
    """A user's ``.keras`` model file, cut at ``embed.layer`` or its last global pooling."""

    kind = "model_file"

    def validate(self) -> None:
        e = self.config.embed
        if "://" not in self.name:
            if not Path(self.name).is_file():
                raise ConfigError(f"embed.backbone: model file not found: {self.name}")
            # Executors resolve relative paths against their own working folder.
            e.backbone = self.name = os.path.abspath(self.name)
        if e.preprocess is not None and e.preprocess not in backbones.PREPROCESS_MODES:
            raise ConfigError(f"embed.preprocess must be one of {', '.join(backbones.PREPROCESS_MODES)}, "
                              f"got {e.preprocess!r}")
