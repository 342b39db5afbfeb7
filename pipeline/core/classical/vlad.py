"""VLAD (Jegou 2010) with SSR, intra-normalisation and PCA variants."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.core.vectors import l2_normalize, signed_power

from pipeline.core.classical.base import Artifact
from pipeline.core.classical.sift import LocalDescriptorMethod, _CentroidIndexMixin, _kmeans

logger = logging.getLogger(__name__)


def _pca(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA by SVD of centred data; returns mean, (dim, d) components, eigenvalues."""
    x = np.asarray(x, dtype=np.float64)
    if dim > min(x.shape):
        raise ValueError(f"PCA to {dim} dims needs at least {dim} training vectors of dim >= {dim}, got {x.shape}")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    eig = s[:dim] ** 2 / max(1, len(x) - 1)
    return mean.astype(np.float32), vt[:dim].astype(np.float32), eig.astype(np.float32)


class VladMethod(_CentroidIndexMixin, LocalDescriptorMethod):
    """VLAD (Jegou et al. 2010): sum of residuals to the nearest of k centroids.

    Normalisation order: signed square root (``ssr``), intra-normalisation of
    each centroid block (``intra``), global L2; then optional PCA (learned on
    the training images' VLADs, ``pca_dim``, optional ``whiten``) and L2 again.
    """

    family = "vlad"

    @property
    def dim(self) -> int:
        return int(self.params["pca_dim"] or int(self.params["k"]) * 128)

    def _set_artifact(self, artifact: Artifact) -> None:
        super()._set_artifact(artifact)
        self._centroids = artifact.arrays["centroids"]
        self._build_index(self._centroids)

    def _raw(self, desc: np.ndarray) -> np.ndarray:
        centroids = self._centroids
        k = centroids.shape[0]
        _, idx = self._assign(desc, 1)
        idx = idx[:, 0]
        v = np.zeros((k, desc.shape[1]), dtype=np.float32)
        np.add.at(v, idx, desc - centroids[idx])
        if self.params["ssr"]:
            v = signed_power(v, 0.5)
        if self.params["intra"]:
            v = l2_normalize(v, axis=1)
        return l2_normalize(v.ravel())

    def _train(self, per_image, sample, seed, niter):
        k = int(self.params["k"])
        # _raw() needs the new vocabulary before the artifact exists (for PCA training).
        self._centroids = _kmeans(sample, k, seed, niter)
        self._build_index(self._centroids)
        arrays: dict[str, np.ndarray] = {"centroids": self._centroids}
        extra: dict[str, Any] = {}
        pca_dim = self.params["pca_dim"]
        if pca_dim:
            vlads = np.stack([self._raw(d) for d in per_image if len(d)])
            mean, comps, eig = _pca(vlads, int(pca_dim))
            arrays.update(pca_mean=mean, pca_components=comps, pca_eigvals=eig)
            extra["pca_explained_variance"] = float(eig.sum() / max(1e-12, np.var(vlads, axis=0, ddof=1).sum()))
        return arrays, extra

    def _encode_one(self, desc: np.ndarray) -> np.ndarray:
        v = self._raw(desc)
        arrays = self.artifact.arrays
        if "pca_components" in arrays:
            v = (v - arrays["pca_mean"]) @ arrays["pca_components"].T
            if self.params["whiten"]:
                v = v / np.sqrt(arrays["pca_eigvals"] + 1e-9)
            v = l2_normalize(v)
        return v
