"""Improved Fisher vectors: diagonal GMM on PCA-reduced SIFT."""
from __future__ import annotations

import logging
import math

import numpy as np

from pipeline.core.vectors import l2_normalize, signed_power

from pipeline.core.classical.sift import LocalDescriptorMethod, _kmeans
from pipeline.core.classical.vlad import _pca

logger = logging.getLogger(__name__)


class FisherMethod(LocalDescriptorMethod):
    """Improved Fisher vector (Perronnin et al. 2010).

    Descriptors are PCA-reduced (``desc_pca_dim``, 64 in the literature), a
    diagonal GMM with ``k`` components is fit with scikit-learn, and each image
    is the gradient w.r.t. means and standard deviations (``2 * k * D`` dims),
    followed by power (``power``) and L2 normalisation. Posteriors are computed
    here from the stored GMM arrays, so no sklearn object is ever serialised.
    """

    family = "fisher"

    @property
    def dim(self) -> int:
        return 2 * int(self.params["k"]) * int(self.params["desc_pca_dim"])

    def _train(self, per_image, sample, seed, niter):
        from sklearn.mixture import GaussianMixture

        dp = int(self.params["desc_pca_dim"])
        k = int(self.params["k"])
        mean, comps, eig = _pca(sample, dp)
        xs = (sample - mean) @ comps.T
        # Seeding EM with FAISS k-means is much faster than sklearn's own k-means init.
        means_init = _kmeans(xs, k, seed, niter)
        gmm = GaussianMixture(
            n_components=k, covariance_type="diag", means_init=means_init,
            max_iter=100, reg_covar=1e-6, random_state=seed,
        )
        gmm.fit(xs)
        arrays = {
            "pca_mean": mean, "pca_components": comps, "pca_eigvals": eig,
            "gmm_weights": gmm.weights_.astype(np.float32),
            "gmm_means": gmm.means_.astype(np.float32),
            "gmm_vars": gmm.covariances_.astype(np.float32),
        }
        return arrays, {"gmm_converged": bool(gmm.converged_), "gmm_iter": int(gmm.n_iter_)}

    def _encode_one(self, desc: np.ndarray) -> np.ndarray:
        a = self.artifact.arrays
        x = ((desc - a["pca_mean"]) @ a["pca_components"].T).astype(np.float64)
        w = a["gmm_weights"].astype(np.float64)
        mu = a["gmm_means"].astype(np.float64)
        var = a["gmm_vars"].astype(np.float64)
        prec = 1.0 / var
        # log N(x | mu_k, var_k) for all k at once: expand (x-mu)^2 / var.
        log_prob = -0.5 * (
            (x ** 2) @ prec.T - 2.0 * x @ (mu * prec).T + np.sum(mu ** 2 * prec, axis=1)
            + np.sum(np.log(var), axis=1) + x.shape[1] * math.log(2 * math.pi)
        ) + np.log(w)
        log_prob -= log_prob.max(axis=1, keepdims=True)
        gamma = np.exp(log_prob)
        gamma /= gamma.sum(axis=1, keepdims=True)
        n = len(x)
        sigma = np.sqrt(var)
        s0 = gamma.sum(axis=0)                       # (k,)
        s1 = gamma.T @ x                             # (k, D)
        s2 = gamma.T @ (x ** 2)                      # (k, D)
        g_mu = (s1 - mu * s0[:, None]) / sigma / (n * np.sqrt(w)[:, None])
        g_sig = (s2 - 2 * mu * s1 + (mu ** 2 - var) * s0[:, None]) / var / (n * np.sqrt(2 * w)[:, None])
        fv = np.concatenate([g_mu.ravel(), g_sig.ravel()]).astype(np.float32)
        return l2_normalize(signed_power(fv, float(self.params["power"])))
