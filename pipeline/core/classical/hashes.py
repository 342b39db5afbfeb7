"""Perceptual hashes (``imagehash``): 64 bits, searched by Hamming distance."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import numpy as np


from pipeline.core.classical.base import Artifact, ClassicalMethod

logger = logging.getLogger(__name__)


class HashMethod(ClassicalMethod):
    """64-bit perceptual hash from ``imagehash``, packed to 8 bytes."""

    is_binary = True
    needs_training = False

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        super().__init__(name, params)
        import imagehash

        algorithms: dict[str, Callable[..., Any]] = {
            "phash": imagehash.phash,
            "dhash": imagehash.dhash,
            "ahash": imagehash.average_hash,
            "whash": imagehash.whash,
        }
        algo = self.params["algorithm"]
        if algo not in algorithms:
            raise ValueError(f"unknown hash algorithm {algo!r}; known: {sorted(algorithms)}")
        self._fn = algorithms[algo]

    @property
    def dim(self) -> int:
        return int(self.params["hash_size"]) ** 2

    def encode(self, images: Sequence[Any]) -> np.ndarray:
        out = np.zeros((len(images), self.dim // 8), dtype=np.uint8)
        for i, img in enumerate(images):
            bits = np.asarray(self._fn(img, hash_size=self.params["hash_size"]).hash, dtype=bool).ravel()
            out[i] = np.packbits(bits)
        return out

    def fit(self, images_iter: Iterable[Any], **train_options: Any) -> Artifact:
        self.artifact = Artifact(self.name, self.params, training={"note": "hashes need no training"})
        return self.artifact
