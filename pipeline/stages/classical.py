"""Classical methods (:mod:`pipeline.classical`) inside the Spark jobs.

A classical method is named wherever a backbone is (``embed.backbone``, ``evaluate
--methods``); the existing stages call into this module through small hooks:

* :func:`build_embedding_table`: the pandas UDF that encodes each image with the method and
  writes the embedding table with the SAME schema as a CNN's. Float methods give their
  L2-normalised rows; a perceptual hash gives its 64 bits as 0.0 / 1.0 floats, which the
  index stage packs back into bytes for a FAISS binary (Hamming) index.
* :func:`prepare`: before the embed timing starts, make sure a method that needs a
  vocabulary has one: ``classical.artifacts[method]`` if set, else train it (or reuse the
  cached artifact of the same training set) with :mod:`pipeline.train_classical` from
  ``classical.train_input``, which must not be the evaluated collection.
* :func:`effective_threshold`: ``dedup.hamming_bits`` for hashes, as a similarity
  ``1 - bits / 64`` on the same scale as ``dedup.threshold``.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from pipeline.core import classical
from pipeline.core import storage
from pipeline.config import Config, ConfigError

log = logging.getLogger(__name__)

# Images handed to one encode() call: bounds the decoded pixels held at once.
ENCODE_CHUNK = 32
# JPEG DCT scaling is allowed while both sides stay >= this (SIFT: the method's max_side).
HASH_DECODE_SIDE = 512


# --------------------------------------------------------------- config
def options_for(config: Config, name: str) -> dict[str, Any]:
    """Option overrides of the registry defaults for ``name`` (``classical.options``)."""
    opts = config.classical.options.get(name) or {}
    if not isinstance(opts, dict):
        raise ConfigError(f"classical.options.{name} must be a mapping of option: value, got {opts!r}")
    return dict(opts)


def artifact_uri(config: Config, name: str) -> str | None:
    path = config.classical.artifacts.get(name)
    if not path:
        return None
    return storage.absolute_uri(str(path))


def validate(config: Config) -> None:
    """Cheap checks of the ``classical`` section (no Spark, no training)."""
    c = config.classical
    for section, mapping in (("artifacts", c.artifacts), ("options", c.options)):
        for name in mapping:
            if not classical.is_classical(name):
                raise ConfigError(f"classical.{section}: unknown classical method {name!r}; "
                                  f"known: {', '.join(classical.CLASSICAL_METHODS)}")
    for name in c.options:
        try:
            classical.get_method(name, **options_for(config, name))
        except ValueError as exc:
            raise ConfigError(f"classical.options.{name}: {exc}") from exc
    for name, path in c.artifacts.items():
        local = storage.local_path_of(storage.absolute_uri(str(path)))
        if local is not None and not os.path.isfile(local):
            raise ConfigError(f"classical.artifacts.{name}: artifact not found: {path}")
    if c.max_descriptors < 1000:
        raise ConfigError(f"classical.max_descriptors must be >= 1000, got {c.max_descriptors!r}")


# ---------------------------------------------------------------- methods
_METHOD_CACHE: dict[tuple, classical.ClassicalMethod] = {}


def load_method(name: str, uri: str | None, options: dict[str, Any]) -> classical.ClassicalMethod:
    """Build the method (with its artifact) once per Python worker."""
    key = (name, uri, json.dumps(options, sort_keys=True, default=str))
    method = _METHOD_CACHE.get(key)
    if method is None:
        try:
            import cv2

            cv2.setNumThreads(1)  # Spark already runs one task per core
        except ImportError:
            pass
        if uri is None:
            method = classical.get_method(name, **options)
        else:
            local = storage.local_path_of(uri)
            if local is None:  # a remote artifact: copy it next to the worker first
                fd, local = tempfile.mkstemp(suffix=".npz", prefix="neardup-artifact-")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(storage.read_bytes(uri))
            method = classical.get_method(name, artifact_path=local, **_encode_defaults(name, options))
        _METHOD_CACHE.clear()
        _METHOD_CACHE[key] = method
    return method


def _encode_defaults(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The registry's encode-time options for ``name``, so that e.g. a ``vlad`` vocabulary
    encodes as ``vlad-ssr`` when used by ``vlad-ssr``; explicit options still win."""
    spec = classical.CLASSICAL_METHODS[name]
    encode_time = classical._ENCODE_TIME_OPTIONS[spec.family]
    return {**{k: v for k, v in spec.defaults.items() if k in encode_time}, **options}


def check_method(config: Config) -> int:
    """Driver-side check before Spark starts: options valid, artifact loadable or trainable.

    Returns the embedding dimension (bits for a hash). Never trains.
    """
    name = config.embed.backbone
    options = options_for(config, name)
    uri = artifact_uri(config, name)
    try:
        method = load_method(name, uri, options)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"classical method {name}: {exc}") from exc
    if not method.is_trained and not config.classical.train_input:
        raise ConfigError(
            f"classical method {name} needs a trained vocabulary: set classical.artifacts.{name}=FILE.npz "
            f"(from `neardup train --method {name} --input DIR`) or classical.train_input=DIR "
            f"(a collection that is not the evaluated one)"
        )
    return method.dim


def prepare(spark, config: Config) -> tuple[Config, dict[str, Any]]:
    """Train or reuse the method's artifact; returns the config that names it, and metrics.

    Also records, in the active MLflow run, which artifact and training set the method used.
    """
    from pipeline.train import vocabulary as train_classical

    name = config.embed.backbone
    metrics: dict[str, Any] = {}
    uri = artifact_uri(config, name)
    spec = classical.CLASSICAL_METHODS[name]
    # Flat names: the config's own params (classical.train_input ...) may be in the same run.
    params = {"classical_method": name, "classical_family": spec.family}
    if uri is None and classical.get_method(name, **options_for(config, name)).needs_training:
        if not config.classical.train_input:
            check_method(config)  # raises the explanatory ConfigError
        started = time.perf_counter()
        result = train_classical.train(spark, config, name)
        metrics["train_seconds"] = time.perf_counter() - started
        metrics["train_reused"] = float(result.reused)
        uri = result.uri
        config = config.with_overrides(classical__artifacts={**config.classical.artifacts, name: uri})
    if uri is not None:
        art = classical.Artifact.load(io.BytesIO(storage.read_bytes(uri)))
        params.update({
            "artifact_uri": uri, "artifact_version": art.version,
            "artifact_train_input": ",".join(art.training.get("train_input", [])) or art.training.get("description", ""),
            "artifact_train_images": art.training.get("n_images", ""),
        })
    log_params(params)
    return config, metrics


def log_params(params: dict[str, Any]) -> None:
    """Log params to the active MLflow run, if any (values cut to MLflow's length limit)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})


# ----------------------------------------------------------------- encode
def decode(content: bytes, method: classical.ClassicalMethod, max_pixels: int):
    """Bytes -> RGB PIL image in displayed orientation, DCT-downscaled when far too large."""
    from pipeline.core import imageio

    side = int(method.params.get("max_side") or HASH_DECODE_SIDE)
    return imageio.decode_rgb(content, min_size=(side, side), max_pixels=max_pixels)


def to_table_rows(method: classical.ClassicalMethod, encoded: np.ndarray) -> np.ndarray:
    """The method's vectors as embedding-table floats: hash bits become 0.0 / 1.0."""
    if method.is_binary:
        return np.unpackbits(np.asarray(encoded, dtype=np.uint8), axis=1)[:, : method.dim].astype(np.float32)
    return np.asarray(encoded, dtype=np.float32)


def encode_contents(method: classical.ClassicalMethod, contents: Sequence[bytes],
                    max_pixels: int) -> tuple[list, list]:
    """Encode a list of images; returns (vector or None, error or None) per image."""
    vectors: list[np.ndarray | None] = [None] * len(contents)
    errors: list[str | None] = [None] * len(contents)
    for start in range(0, len(contents), ENCODE_CHUNK):
        images, where = [], []
        for i in range(start, min(start + ENCODE_CHUNK, len(contents))):
            try:
                images.append(decode(contents[i], method, max_pixels))
                where.append(i)
            except Exception as exc:  # a bad image is a recorded row, never a failed job
                errors[i] = f"decode failed: {exc}"
        if not images:
            continue
        try:
            rows = to_table_rows(method, method.encode(images))
            for i, row in zip(where, rows):
                vectors[i] = row
        except Exception:  # find the culprit: encode one by one
            for i, image in zip(where, images):
                try:
                    vectors[i] = to_table_rows(method, method.encode([image]))[0]
                except Exception as exc:
                    errors[i] = f"{method.name} failed: {type(exc).__name__}: {exc}"
    return vectors, errors


def make_classical_udf(config: Config):
    from pyspark.sql import functions as F

    from pipeline.stages.embed import EMBED_RESULT
    from pipeline import schemas as S

    name = config.embed.backbone
    uri = artifact_uri(config, name)
    options = options_for(config, name)
    max_pixels = config.ingest.max_pixels

    @F.pandas_udf(EMBED_RESULT)
    def classical_udf(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        method = load_method(name, uri, options)
        for _ids, contents in batches:
            vectors, errors = encode_contents(method, list(contents), max_pixels)
            yield pd.DataFrame({S.EMBEDDING: vectors, S.ERROR: errors})

    return classical_udf


def embedding_udf(config: Config):
    """The UDF that encodes images with a trained classical method (embed.py applies it)."""
    name = config.embed.backbone
    method = load_method(name, artifact_uri(config, name), options_for(config, name))
    if not method.is_trained:
        raise ConfigError(f"{name} has no trained artifact; run `neardup train --method {name}` "
                          f"or set classical.train_input")
    return make_classical_udf(config)


# ------------------------------------------------------------------ dedup
def effective_threshold(config: Config, metric: str | None) -> float:
    """The similarity threshold for dedup; ``dedup.hamming_bits`` decides for a Hamming index."""
    bits = config.dedup.hamming_bits
    if metric == "hamming" and bits is not None:
        name = config.embed.backbone
        nbits = classical.get_method(name, **options_for(config, name)).dim if classical.is_classical(name) else 64
        return 1.0 - bits / nbits
    return config.dedup.threshold


# --------------------------------------------------------------- evaluate
def mlflow_params(config: Config) -> dict[str, Any]:
    name = config.embed.backbone
    method = classical.get_method(name, **options_for(config, name))
    return {"weights": "none", "input_size": method.params.get("max_side", "native"),
            "pooling": method.params.get("algorithm", classical.CLASSICAL_METHODS[name].family),
            "metric": "hamming" if method.is_binary else "inner_product",
            "method_options": json.dumps(method.params, sort_keys=True)[:500],
            "hamming_bits": config.dedup.hamming_bits}


def result_extras(config: Config) -> dict[str, Any]:
    """Extra keys of an evaluate result for a classical method (the rest are shared)."""
    name = config.embed.backbone
    uri = artifact_uri(config, name)
    out: dict[str, Any] = {"weights": "none", "family": classical.CLASSICAL_METHODS[name].family,
                           "metric": "hamming" if classical.is_binary_method(name) else "inner_product"}
    if uri is not None:
        art = classical.Artifact.load(io.BytesIO(storage.read_bytes(uri)))
        out.update({"weights": f"artifact:{art.version}", "artifact": uri, "artifact_version": art.version,
                    "train_input": art.training.get("train_input", []),
                    "train_images": art.training.get("n_images")})
    if classical.is_binary_method(name):
        out["threshold"] = effective_threshold(config, "hamming")
        out["hamming_bits"] = config.dedup.hamming_bits
    return out


def study_table(results: list[dict[str, Any]], compare_with: Sequence[str] = ()) -> str:
    """The reference study's table: one row per method, Holidays mAP and UKBench N-S side by side.

    ``compare_with``: JSON outputs of earlier evaluate runs (typically the other dataset).
    """
    rows = list(results)
    for path in compare_with:
        rows.extend(storage.read_json(storage.absolute_uri(path)))
    by_method: dict[str, dict[str, Any]] = {}
    for r in rows:
        m = by_method.setdefault(r["method"], {})
        m[r["dataset"]] = r
    header = (f"{'method':<18} {'Holidays mAP':>12} {'(INRIA)':>9} {'UKBench N-S':>11} "
              f"{'img/s hol':>9} {'img/s ukb':>9} {'dims':>6}")
    lines = [header, "-" * len(header)]
    for method, d in by_method.items():
        h, u = d.get("holidays", {}), d.get("ukbench", {})
        any_r = h or u
        lines.append(
            f"{storage.tag_of(method):<18} "
            f"{_fmt(h.get('map'), 12)} {_fmt(h.get('map_inria_trapezoid'), 9)} {_fmt(u.get('ns_score'), 11)} "
            f"{_fmt(h.get('images_per_second'), 9, '.1f')} {_fmt(u.get('images_per_second'), 9, '.1f')} "
            f"{any_r.get('embedding_dim', '-'):>6}"
        )
    lines.append("Holidays mAP: non-interpolated AP; (INRIA): holidays_map.py's trapezoid. "
                 "img/s: the Spark embed stage, decode included.")
    return "\n".join(lines)


def _fmt(value: Any, width: int, spec: str = ".3f") -> str:
    return f"{value:{width}{spec}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"
