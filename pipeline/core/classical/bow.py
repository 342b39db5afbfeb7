"""Bag of visual words with tf-idf, hard or soft assignment."""
from __future__ import annotations

import logging

import numpy as np

from pipeline.core.vectors import l2_normalize, signed_power

from pipeline.core.classical.base import Artifact
from pipeline.core.classical.sift import LocalDescriptorMethod, _CentroidIndexMixin, _kmeans

logger = logging.getLogger(__name__)


class BowMethod(_CentroidIndexMixin, LocalDescriptorMethod):
    """Bag of visual words with tf-idf, hard or soft assignment.

    ``soft_k`` > 1 spreads each descriptor over its nearest words with weights
    ``exp(-d^2 / (2 sigma^2))`` (Philbin et al. 2008); ``sigma^2`` defaults to
    the mean squared distance to the nearest word on the training set.
    ``power`` < 1 damps bursty words before the final L2 normalisation.
    """

    family = "bow"

    @property
    def dim(self) -> int:
        return int(self.params["k"])

    def _train(self, per_image, sample, seed, niter):
        k = int(self.params["k"])
        centroids = _kmeans(sample, k, seed, niter)
        self._build_index(centroids)
        df = np.zeros(k, dtype=np.float64)
        nn_d2 = []
        for desc in per_image:
            if len(desc) == 0:
                continue
            d, idx = self._assign(desc, 1)
            df[np.unique(idx[:, 0])] += 1
            nn_d2.append(d[:, 0])
        n = max(1, sum(1 for d in per_image if len(d)))
        sigma2 = float(np.mean(np.concatenate(nn_d2))) if nn_d2 else 1.0
        # Document frequencies are stored rather than idf so the idf variant stays an encode-time choice.
        return (
            {"centroids": centroids, "df": df.astype(np.float32), "n_train_images": np.array(n, dtype=np.int64),
             "sigma2": np.array(sigma2, dtype=np.float32)},
            {"empty_words": int((df == 0).sum())},
        )

    @property
    def idf(self) -> np.ndarray:
        """Inverse document frequency of each word, per the ``idf`` option.

        ``"classic"`` is ``log(N / df)``, which is zero for words present in
        every training image -- common with the small vocabularies that small
        training sets allow -- so the default ``"smooth"`` adds 1 as
        scikit-learn does: ``log((N + 1) / (df + 1)) + 1``. ``"none"`` is tf only.
        """
        a = self._require_trained().arrays
        df, n = a["df"].astype(np.float64), float(a["n_train_images"])
        mode = self.params["idf"]
        if mode == "smooth":
            idf = np.log((n + 1) / (df + 1)) + 1
        elif mode == "classic":
            idf = np.log(n / np.maximum(df, 1))
        elif mode == "none":
            idf = np.ones_like(df)
        else:
            raise ValueError(f"idf must be 'smooth', 'classic' or 'none', got {mode!r}")
        return idf.astype(np.float32)

    def _set_artifact(self, artifact: Artifact) -> None:
        super()._set_artifact(artifact)
        self._build_index(artifact.arrays["centroids"])
        self._idf = self.idf

    def _encode_one(self, desc: np.ndarray) -> np.ndarray:
        art = self.artifact
        k = int(self.params["k"])
        soft_k = int(self.params["soft_k"])
        hist = np.zeros(k, dtype=np.float32)
        if soft_k <= 1:
            _, idx = self._assign(desc, 1)
            np.add.at(hist, idx[:, 0], 1.0)
        else:
            d2, idx = self._assign(desc, soft_k)
            sigma2 = self.params.get("soft_sigma2") or float(art.arrays["sigma2"])
            # Distances relative to the nearest word avoid underflow for far descriptors.
            w = np.exp(-(d2 - d2[:, :1]) / (2.0 * sigma2))
            w /= w.sum(axis=1, keepdims=True)
            np.add.at(hist, idx.ravel(), w.ravel().astype(np.float32))
        hist /= len(desc)
        hist *= self._idf
        return l2_normalize(signed_power(hist, float(self.params["power"])))
