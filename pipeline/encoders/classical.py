"""Classical encoders: perceptual hashes and aggregated SIFT (BoW, VLAD, Fisher) of
:mod:`pipeline.core.classical`, one :class:`~pipeline.encoders.base.Encoder` per family.

A classical method is named wherever a backbone is (``embed.backbone``, ``evaluate
--methods``). Float methods give L2-normalised rows; a perceptual hash gives its bits as
0.0 / 1.0 floats in the same embedding table, which the index stage packs back into bytes
for a FAISS binary (Hamming) index. Methods that need a vocabulary get it from
``classical.artifacts[method]`` or from :mod:`pipeline.stages.vocabulary`, which trains one
on ``classical.train_input`` (never the evaluated collection).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline.config import Config, ConfigError
from pipeline.core import classical, imageio, storage
from pipeline.encoders.base import Encoder

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


def validate_section(config: Config) -> None:
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


# ----------------------------------------------------------------- encode
def decode(content: bytes, method: classical.ClassicalMethod, max_pixels: int):
    """Bytes -> RGB PIL image in displayed orientation, DCT-downscaled when far too large."""
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


@dataclass(frozen=True)
class ClassicalBatchEmbedder:
    """The per-batch function of a classical encoder, as shipped to the executors (picklable)."""

    name: str
    uri: str | None
    options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = 0

    def __call__(self, contents: Sequence[bytes]) -> tuple[list, list]:
        return encode_contents(load_method(self.name, self.uri, self.options), list(contents), self.max_pixels)


class ClassicalEncoder(Encoder):
    """A method of :data:`pipeline.core.classical.CLASSICAL_METHODS`."""

    kind = "classical"
    # Classical baselines are searched as published: no rotated queries or re-ranking
    # (DBA would average hash bits).
    reranking = False
    # SIFT is CPU-bound and per image: a few partitions per core even out slow images.
    partitions_per_core = 2
    learns = "vocabulary"

    def __init__(self, config: Config):
        super().__init__(config)
        self.spec = classical.CLASSICAL_METHODS[self.name]

    @property
    def options(self) -> dict[str, Any]:
        return options_for(self.config, self.name)

    @property
    def artifact(self) -> str | None:
        return artifact_uri(self.config, self.name)

    def method(self) -> classical.ClassicalMethod:
        """The method as configured, without its artifact (cheap: nothing is trained or read)."""
        return classical.get_method(self.name, **self.options)

    @property
    def needs_training(self) -> bool:
        return self.artifact is None and self.method().needs_training

    def with_artifact(self, uri: str) -> "ClassicalEncoder":
        c = self.config.classical
        return type(self)(self.config.with_overrides(classical__artifacts={**c.artifacts, self.name: uri}))

    def training_params(self) -> dict[str, Any]:
        # Flat names: the config's own params (classical.train_input ...) may be in the same run.
        params: dict[str, Any] = {"classical_method": self.name, "classical_family": self.spec.family}
        uri = self.artifact
        if uri is not None:
            art = classical.Artifact.load(io.BytesIO(storage.read_bytes(uri)))
            params.update({
                "artifact_uri": uri, "artifact_version": art.version,
                "artifact_train_input": (",".join(art.training.get("train_input", []))
                                         or art.training.get("description", "")),
                "artifact_train_images": art.training.get("n_images", ""),
            })
        return params

    def preflight(self) -> int:
        """Options valid, artifact loadable or trainable; returns the dimension (bits for a hash). Never trains."""
        try:
            method = load_method(self.name, self.artifact, self.options)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"classical method {self.name}: {exc}") from exc
        if not method.is_trained and not self.config.classical.train_input:
            raise ConfigError(
                f"classical method {self.name} needs a trained vocabulary: set classical.artifacts.{self.name}=FILE.npz "
                f"(from `neardup train --method {self.name} --input DIR`) or classical.train_input=DIR "
                f"(a collection that is not the evaluated one)"
            )
        return method.dim

    def fingerprint(self) -> dict[str, Any]:
        return {"classical": self.name, "options": self.options, "artifact": self.artifact}

    def fingerprint_files(self) -> list[str]:
        local = storage.local_path_of(self.artifact) if self.artifact else None
        return [local] if local else []

    def embed_function(self) -> ClassicalBatchEmbedder:
        method = load_method(self.name, self.artifact, self.options)
        if not method.is_trained:
            raise ConfigError(f"{self.name} has no trained artifact; run `neardup train --method {self.name}` "
                              f"or set classical.train_input")
        return ClassicalBatchEmbedder(self.name, self.artifact, self.options, self.config.ingest.max_pixels)

    def mlflow_params(self) -> dict[str, Any]:
        method = self.method()
        return {"weights": "none", "input_size": method.params.get("max_side", "native"),
                "pooling": method.params.get("algorithm", self.spec.family),
                "metric": "hamming" if self.binary else "inner_product",
                "method_options": json.dumps(method.params, sort_keys=True)[:500],
                "hamming_bits": self.config.dedup.hamming_bits}

    def result_extras(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights": "none", "family": self.spec.family,
                               "metric": "hamming" if self.binary else "inner_product"}
        uri = self.artifact
        if uri is not None:
            art = classical.Artifact.load(io.BytesIO(storage.read_bytes(uri)))
            out.update({"weights": f"artifact:{art.version}", "artifact": uri, "artifact_version": art.version,
                        "train_input": art.training.get("train_input", []),
                        "train_images": art.training.get("n_images")})
        return out


class HashEncoder(ClassicalEncoder):
    """Perceptual hashes: bits searched by Hamming distance; ``dedup.hamming_bits`` sets the threshold."""

    binary = True

    def threshold(self, metric: str | None) -> float:
        bits = self.config.dedup.hamming_bits
        if metric == "hamming" and bits is not None:
            return 1.0 - bits / self.method().dim
        return self.config.dedup.threshold

    def result_extras(self) -> dict[str, Any]:
        return {**super().result_extras(), "threshold": self.threshold("hamming"),
                "hamming_bits": self.config.dedup.hamming_bits}


class BowEncoder(ClassicalEncoder):
    """Bag of visual words (vocabulary trained by :mod:`pipeline.stages.vocabulary`)."""


class VladEncoder(ClassicalEncoder):
    """VLAD and its SSR / intra / PCA variants (vocabulary trained by :mod:`pipeline.stages.vocabulary`)."""


class FisherEncoder(ClassicalEncoder):
    """Improved Fisher vectors (GMM trained by :mod:`pipeline.stages.vocabulary`)."""
